#!/bin/sh
# Install finetune from this folder (editable), with the extras given, e.g. `sh install.sh "[dev]"`.
#
# PyPI's Linux torch is the CUDA build (torch plus about 3 GB of nvidia-* packages). On a machine
# with no NVIDIA driver (no nvidia-smi) and no torch yet, the CPU build is installed first from
# PyTorch's CPU index, and pip keeps it; with a GPU, or a torch already installed, pip does as usual.
set -e
extras="${1:-}"
python=python
command -v python >/dev/null 2>&1 || python=python3
if ! $python -c "import torch" >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "install.sh: no NVIDIA GPU found: installing the CPU build of torch first"
    $python -m pip install torch --index-url https://download.pytorch.org/whl/cpu ||
        echo "install.sh: PyTorch's CPU index could not be reached; torch comes from the default index"
fi
$python -m pip install -e ".${extras}"
