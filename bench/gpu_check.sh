#!/usr/bin/env bash
# The prepared GPU check, from the repository root of a fresh GPU machine, within a wall-clock budget:
#   1. install the wheels brought along in .whl/ (bench/gpu_wheels.sh made them) into /tmp/site
#   2. print the versions, CUDA, the GPU, /dev/shm, ulimit -l, memory; check the carried wheels' requirements
#   3. python -m pytest -m gpu (bounded)
#   4. bench/gpu.py: every row it can fit in what is left of the budget
# Everything lands in one folder: --out DIR, else $OUT when set, else out/gpu-check. At most 8 files, flat:
#   check.log (all this script printed), pytest.log, bench.log, runtime.log, gpu-<device>.{json,txt,png}
# The time each phase took is printed, then the table, last.
#
#   bash bench/gpu_check.sh                      # on the GPU machine (the README gives the exact device call)
#   bash bench/gpu_check.sh --rehearse --out D   # the same steps on the CPU at tiny dimensions (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-out/gpu-check}"
REHEARSE=0
BUDGET_S=420          # 7 minutes: the check must leave room for a rerun in the session's 15 minutes of device time
PYTEST_MAX_S=150      # pytest -m gpu gets at most this, and never so much that the benchmark is left < BENCH_MIN_S
BENCH_MIN_S=240
SUMMARY_S=15          # kept back at the end for the summary
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="$2"; shift 2 ;;
        --rehearse) REHEARSE=1; shift ;;
        --budget-s) BUDGET_S="$2"; shift 2 ;;
        *) echo "usage: $0 [--out DIR] [--rehearse] [--budget-s S]" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
START=$(date +%s)
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/check.log "$OUT_DIR"/pytest.log "$OUT_DIR"/bench.log "$OUT_DIR"/runtime.log "$OUT_DIR"/gpu-*

left() { echo $(( START + BUDGET_S - $(date +%s) )); }
PHASES=""
phase_done() {  # name, seconds it started at
    local took=$(( $(date +%s) - $2 ))
    PHASES="${PHASES}phase $1: ${took} s\n"
    echo "==== phase $1 took ${took} s ($(( $(date +%s) - START )) s of ${BUDGET_S} s used)"
}

main() {
    local status=0 t
    export PYTHONUNBUFFERED=1
    echo "==== promoe GPU check $(date -u +%FT%TZ), rehearse=${REHEARSE}, budget ${BUDGET_S} s, out ${OUT_DIR}"

    t=$(date +%s)
    if [ "$REHEARSE" = 1 ]; then
        echo "install: skipped (--rehearse uses this machine's packages)"
    elif ls .whl/*.whl >/dev/null 2>&1; then
        timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "install of .whl/*.whl FAILED"; status=1; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        ls .whl/*.whl
    else
        echo "install: no .whl/*.whl (run bench/gpu_wheels.sh and carry .whl): pyzmq and setproctitle may be missing"
    fi
    phase_done install "$t"

    t=$(date +%s)
    echo "PYTORCH_CUDA_ALLOC_CONF='${PYTORCH_CUDA_ALLOC_CONF:-}' (unset for the runtime: CUDA IPC needs plain blocks)"
    unset PYTORCH_CUDA_ALLOC_CONF
    timeout 60 "$PY" bench/gpu_env.py --wheels .whl || status=1
    if command -v nvidia-smi >/dev/null; then
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,pcie.link.gen.current,pcie.link.width.current --format=csv
    else
        echo "nvidia-smi: not here"
    fi
    df -h /dev/shm
    echo "ulimit -l: $(ulimit -l); cores: $(nproc)"
    free -g | head -2
    phase_done environment "$t"

    t=$(date +%s)
    local pytest_s=$PYTEST_MAX_S
    [ $(( $(left) - BENCH_MIN_S - SUMMARY_S )) -lt "$pytest_s" ] && pytest_s=$(( $(left) - BENCH_MIN_S - SUMMARY_S ))
    [ "$pytest_s" -lt 30 ] && pytest_s=30
    local plugin=()
    "$PY" bench/gpu_env.py --plugin-ok pytest-asyncio || plugin=(-p no:asyncio)
    local gpu_tests
    gpu_tests=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')  # collect only the modules with GPU tests
    echo "pytest -m gpu ${gpu_tests}(at most ${pytest_s} s) ${plugin[*]:-}"
    # shellcheck disable=SC2086
    timeout -k 10 "$pytest_s" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${plugin[@]}" $gpu_tests \
        > "$OUT_DIR/pytest.log" 2>&1
    local pytest_rc=$?
    tail -n 25 "$OUT_DIR/pytest.log"
    case $pytest_rc in
        0) ;;
        124|137) echo "pytest -m gpu: STOPPED at its ${pytest_s} s limit"; status=1 ;;
        *) echo "pytest -m gpu: exit code ${pytest_rc}"; status=1 ;;
    esac
    phase_done "pytest -m gpu" "$t"

    t=$(date +%s)
    local bench_s=$(( $(left) - SUMMARY_S ))
    local mode=()
    [ "$REHEARSE" = 1 ] && mode=(--rehearse)
    local bench_rc=0
    if [ "$bench_s" -lt 90 ]; then
        echo "bench/gpu.py: SKIPPED, only ${bench_s} s left of the budget"
        bench_rc=3
    else
        echo "bench/gpu.py ${mode[*]:-} (budget $(( bench_s - 30 )) s, killed at ${bench_s} s)"
        timeout -k 10 "$bench_s" "$PY" bench/gpu.py "${mode[@]}" --out "$OUT_DIR" --budget-s $(( bench_s - 30 )) \
            > /dev/null 2> "$OUT_DIR/bench.log"
        bench_rc=$?
    fi
    grep -E "phase|skipped|Error|error" "$OUT_DIR/bench.log" 2>/dev/null | tail -n 40
    case $bench_rc in
        0) ;;
        124|137) echo "bench/gpu.py: STOPPED at its ${bench_s} s limit (its JSON and table hold the rows done)"
                 status=1 ;;
        *) echo "bench/gpu.py: exit code ${bench_rc} (see bench.log)"; status=1 ;;
    esac
    phase_done benchmark "$t"

    echo "==== summary"
    printf "%b" "$PHASES"
    echo "total $(( $(date +%s) - START )) s of ${BUDGET_S} s; status ${status}"
    ls -la "$OUT_DIR"
    echo "==== the table"
    cat "$OUT_DIR"/gpu-*.txt 2>/dev/null || echo "(no table: the benchmark wrote nothing)"
    return $status
}

main 2>&1 | tee "$OUT_DIR/check.log"
exit "${PIPESTATUS[0]}"
