#!/usr/bin/env bash
# Everything measured on a CUDA machine, in one script so a short GPU lease is spent in one go:
# the `gpu` tests, then side-by-side benchmarks against torchtune.
#
#   bash benchmarks/gpu_session.sh STAGE...      (stages: probe tests bench_1b_full bench_1b_lora
#                                                   bench_8b_lora bench_8b_qlora)
#
# Packages the machine lacks are installed from wheels staged beforehand in .whl/ours (torchao for
# our QLoRA, int4 and 8-bit optimizer paths) and .whl/tt (torchtune 0.6.1, its torchao <= 0.15 and
# its other requirements). They go to separate folders so each library sees the torchao it needs:
# ours is on PYTHONPATH for every process, torchtune's is put first by the /tmp/tt_python wrapper.
# Logs and results go to $OUT (default runs/gpu). The 8B cells need about 35 GB of free disk.
#
# Staging the wheels (on a machine with a package index; the GPU machine may have none):
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   pip download $P -d .whl/ours torchao==0.18.0
#   pip download $P -d .whl/tt torchtune==0.6.1 torchao==0.15.0 torchdata==0.11.0 datasets==5.2.0 dill==0.4.1 \
#       multiprocess==0.70.19 omegaconf==2.4.0 blobfile==3.3.0 pycryptodomex==3.24.2 kagglehub==1.0.2 \
#       kagglesdk==0.1.37 peft==0.18.1 pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 \
#       typing_inspection==0.4.5 truststore==0.10.5
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1

install_wheels() {
    local dir="$1" target="$2"
    [[ -d "$dir" ]] || return 0
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$dir"/*.whl
}
install_wheels .whl/ours /tmp/site_ours
install_wheels .whl/tt /tmp/site_tt
export PYTHONPATH="$PWD:/tmp/site_ours${PYTHONPATH:+:$PYTHONPATH}"
cat > /tmp/tt_python <<EOF
#!/bin/sh
PYTHONPATH=/tmp/site_tt:\$PYTHONPATH exec $PY "\$@"
EOF
chmod +x /tmp/tt_python

bench() {
    local name="$1"; shift
    echo "=== bench $name: $*"
    "$PY" benchmarks/bench_finetune.py --torchtune-python /tmp/tt_python --work-dir /tmp/bench \
        --docs "$OUT/sections.md" --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/bench_$name.log"
    # The runs' saved models (16 GB each at 8B) would fill the disk; the shared weights stay.
    find /tmp/bench -mindepth 2 -maxdepth 2 -type d -name '*_b*_s*' -exec rm -rf {} +
}

for stage in "$@"; do
    case "$stage" in
    probe)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        "$PY" -c "import torch, torchao; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'torchao', torchao.__version__)"
        /tmp/tt_python -c "import torchtune, torchao; from torchtune.training import FullModelHFCheckpointer; print('torchtune', torchtune.__version__, 'torchao', torchao.__version__)"
        ;;
    tests)
        echo "=== gpu tests"
        "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
        ;;
    bench_1b_full)
        bench 1b_full --model llama3_2_1b --method full --batch-size 4 --seq-len 2048 --steps 5 --warmup-steps 3 --repeats 2
        ;;
    bench_1b_lora)
        bench 1b_lora --model llama3_2_1b --method lora --batch-size 4 --seq-len 2048 --steps 5 --warmup-steps 3 --repeats 2
        ;;
    bench_8b_lora)
        bench 8b_lora --model llama3_1_8b --method lora --batch-size 2 --seq-len 2048 --steps 4 --warmup-steps 2 \
            --repeats 1 --activation-checkpointing
        ;;
    bench_8b_qlora)
        bench 8b_qlora --model llama3_1_8b --method qlora --batch-size 2 --seq-len 2048 --steps 4 --warmup-steps 2 \
            --repeats 1 --activation-checkpointing
        ;;
    *)
        echo "unknown stage $stage"; exit 2 ;;
    esac
done
