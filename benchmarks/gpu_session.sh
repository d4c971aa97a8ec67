#!/usr/bin/env bash
# Everything measured on a CUDA machine, in one script so a short GPU lease is spent in one go:
# the `gpu` tests, then the five benchmark cells side by side with torchtune, compile off and on.
#
#   bash benchmarks/gpu_session.sh                   (probe, prepare + tests, then the cells, in order)
#   bash benchmarks/gpu_session.sh STAGE...          (probe prepare tests 8b_qlora 8b_full 8b_lora 1b_full 1b_lora)
#   bash benchmarks/gpu_session.sh --cpu-smoke       (every stage on CPU with a tiny model: catches typos)
#
# Time: the whole script keeps to BUDGET_S seconds (default 540). The 8B checkpoint is written
# while the tests run (neither is timed); the tests get at most TESTS_S (180) seconds and each test
# 75; a cell starts only if the time left covers its estimate (seconds below, from the H100/H200
# runs), so the most important cells come first, and what was skipped is said at the end. Each
# cell runs ours and torchtune with compile off (full runs: start, steps, final save), then with
# compile on (ended at the last timed step: throughput and memory only).
#
# Files left in $OUT (default runs/gpu), at most 8: session.log (all output), tests.log,
# sections.md (the markdown for docs/benchmarks.md) and one JSON per cell that ran (written after
# every run, so a stopped session keeps what it measured).
#
# Packages the machine lacks are installed from wheels staged beforehand in .whl/ours (torchao for
# our QLoRA, int4 and 8-bit optimizer paths) and .whl/tt (torchtune 0.6.1, its torchao <= 0.15 and
# its other requirements). They go to separate folders so each library sees the torchao it needs:
# ours is on PYTHONPATH for every process, torchtune's is put first by the /tmp/tt_python wrapper.
# The 8B cells need about 35 GB of free disk.
#
# Staging the wheels (on a machine with a package index; the GPU machine has none):
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   pip download $P -d .whl/ours torchao==0.18.0
#   pip download $P -d .whl/tt torchtune==0.6.1 torchao==0.15.0 torchdata==0.11.0 datasets==5.2.0 dill==0.4.1 \
#       multiprocess==0.70.19 omegaconf==2.4.0 blobfile==3.3.0 pycryptodomex==3.24.2 kagglehub==1.0.2 \
#       kagglesdk==0.1.37 peft==0.18.1 pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 \
#       typing_inspection==0.4.5 truststore==0.10.5
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; shift; fi
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-540}"
TESTS_S="${TESTS_S:-180}"
WORK="${WORK:-/tmp/bench}"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
exec > >(tee -a "$OUT/session.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
say() { echo "[$(elapsed) s] $*"; }

install_wheels() {
    local dir="$1" target="$2"
    [[ -d "$dir" ]] || return 0
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$dir"/*.whl
}

if (( SMOKE )); then
    # A tiny model on CPU in place of each GPU shape; torchtune from benchmarks/setup_torchtune.sh's venv.
    TT_PY="${TT_PYTHON:-$PWD/.venv-torchtune/bin/python}"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    COMMON=(--model tiny --device cpu --dtype fp32 --batch-size 2 --seq-len 64 --steps 1 --warmup-steps 1 --repeats 1)
    SHAPE_1B=("${COMMON[@]}"); SHAPE_8B=("${COMMON[@]}" --activation-checkpointing)
    COMPILE_LIGHT=(--compile off)  # compiling on CPU takes minutes: one cell (8b_qlora) covers --compile both
else
    install_wheels .whl/ours /tmp/site_ours
    install_wheels .whl/tt /tmp/site_tt
    export PYTHONPATH="$PWD:/tmp/site_ours${PYTHONPATH:+:$PYTHONPATH}"
    cat > /tmp/tt_python <<EOF
#!/bin/sh
PYTHONPATH=/tmp/site_tt:\$PYTHONPATH exec $PY "\$@"
EOF
    chmod +x /tmp/tt_python
    TT_PY=/tmp/tt_python
    SHAPE_1B=(--model llama3_2_1b --batch-size 4 --seq-len 2048 --steps 3 --warmup-steps 2 --repeats 1)
    SHAPE_8B=(--model llama3_1_8b --batch-size 2 --seq-len 2048 --steps 3 --warmup-steps 2 --repeats 1
              --activation-checkpointing)
    COMPILE_LIGHT=(--compile both)
fi

# name | estimated seconds on one H200 (both libraries, compile off and on) | arguments
declare -A CELL_S=([8b_qlora]=200 [8b_full]=230 [8b_lora]=190 [1b_full]=110 [1b_lora]=100)
cell_args() {
    case "$1" in
    8b_qlora) echo "${SHAPE_8B[*]} --method qlora --compile both" ;;
    8b_full) echo "${SHAPE_8B[*]} --method full ${COMPILE_LIGHT[*]}" ;;
    8b_lora) echo "${SHAPE_8B[*]} --method lora ${COMPILE_LIGHT[*]}" ;;
    1b_full) echo "${SHAPE_1B[*]} --method full ${COMPILE_LIGHT[*]}" ;;
    1b_lora) echo "${SHAPE_1B[*]} --method lora ${COMPILE_LIGHT[*]}" ;;
    esac
}

SKIPPED=()
run_cell() {
    local name="$1"
    local estimate=$(( SMOKE ? 0 : CELL_S[$name] ))
    if (( $(left) < estimate || $(left) <= 0 )); then
        say "skip cell $name: $(left) s left, it needs about $estimate s"
        SKIPPED+=("$name")
        return
    fi
    say "cell $name: $(cell_args "$name")"
    # shellcheck disable=SC2046
    timeout --signal=INT -k 20 "$(left)" "$PY" benchmarks/bench_finetune.py --torchtune-python "$TT_PY" --work-dir "$WORK" \
        --docs "$OUT/sections.md" --json "$OUT/$name.json" --stop-compiled-runs $(cell_args "$name") \
        || { say "cell $name failed or ran out of time (exit $?)"; SKIPPED+=("$name (incomplete)"); }
    # The runs' saved models (16 GB each at 8B) would fill the disk; the shared weights stay.
    find "$WORK" -mindepth 2 -maxdepth 2 -type d -name '*_b*_s*' -exec rm -rf {} +
    say "cell $name done"
}

run_tests() {
    say "gpu tests (at most $TESTS_S s, 75 s per test)"
    local pytest_args=(-q -p no:cacheprovider -m gpu --durations=0)
    if (( SMOKE )); then
        pytest_args+=(--collect-only)  # without CUDA they would only be skipped: check that they import
    else
        pytest_args+=(--timeout=75)
    fi
    timeout --signal=INT -k 10 "$TESTS_S" "$PY" -m pytest "${pytest_args[@]}" tests > "$OUT/tests.log" 2>&1
    say "gpu tests exit $?: $(tail -1 "$OUT/tests.log")"
}

prepare() {
    # The 8B weights (random, bf16) are written once and shared by the 8B cells; the 1B ones are small.
    for shape in 8B 1B; do
        local -n args="SHAPE_$shape"
        "$PY" benchmarks/bench_finetune.py --work-dir "$WORK" --prepare-only "${args[@]}" --method full || return 1
    done
}

STAGES=("$@")
(( ${#STAGES[@]} )) || STAGES=(probe prepare+tests 8b_qlora 8b_full 8b_lora 1b_full 1b_lora)
say "stages: ${STAGES[*]}; budget $BUDGET_S s; smoke $SMOKE"
for stage in "${STAGES[@]}"; do
    case "$stage" in
    probe)
        if (( SMOKE )); then
            "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
        else
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
            "$PY" -c "import torch, torchao; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'torchao', torchao.__version__)"
        fi
        "$TT_PY" -c "import torchtune, torchao; from torchtune.training import FullModelHFCheckpointer; print('torchtune', torchtune.__version__, 'torchao', torchao.__version__)"
        ;;
    prepare+tests)
        say "writing the benchmark weights while the tests run"
        prepare > "$WORK.prepare.log" 2>&1 &
        preparing=$!
        run_tests
        wait "$preparing" || { say "preparing the weights failed:"; tail -20 "$WORK.prepare.log"; }
        say "weights ready"
        ;;
    prepare) prepare ;;
    tests) run_tests ;;
    8b_qlora | 8b_full | 8b_lora | 1b_full | 1b_lora) run_cell "$stage" ;;
    *)
        echo "unknown stage $stage"; exit 2 ;;
    esac
done
say "finished in $(elapsed) s of $BUDGET_S; skipped: ${SKIPPED[*]:-none}"
ls -la "$OUT"
