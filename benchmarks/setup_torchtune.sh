#!/usr/bin/env bash
# Create an isolated virtual environment holding torchtune 0.6.1, the peer the benchmark
# compares against. It lives beside the repo in .venv-torchtune (ignored by git) so the global
# environment, where `finetune` runs, is never touched.
#
# torchtune 0.6.1 (its last release) only imports with torchao <= 0.15 and peft <= 0.18.1,
# so both are pinned. torch is installed first and pinned to the same CPU build the project
# uses; pinning it again in the second install stops pip from swapping in a CUDA build.
#
# Usage: bash benchmarks/setup_torchtune.sh [VENV_DIR]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-torchtune}"
torch_version="2.13.0"

if [[ ! -x "$venv/bin/python" ]]; then
    python3.11 -m venv "$venv"
fi
py="$venv/bin/python"

"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "torch==$torch_version"
"$py" -m pip install --quiet "torch==$torch_version" "torchtune==0.6.1" "torchao<=0.15" \
    "peft<=0.18.1" torchdata

# Fail loudly if pip replaced torch with anything but the CPU build we asked for.
"$py" - <<PY
import torch
assert torch.__version__.split("+")[0] == "$torch_version", torch.__version__
assert torch.version.cuda is None, f"a CUDA build of torch was installed: {torch.version.cuda}"
PY

TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 "$py" -c "import torchtune, torchao; print('torchtune', torchtune.__version__, 'torchao', torchao.__version__)"
TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 "$venv/bin/tune" --help > /dev/null
echo "torchtune venv ready: $venv"
