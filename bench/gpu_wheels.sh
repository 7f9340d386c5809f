#!/usr/bin/env bash
# Prepare .whl/ (git-ignored, carried to the GPU machine with carry: [".whl"]): what the device lacks.
#
#   bash bench/gpu_wheels.sh [--check]
#
# - Wheels for the device's Python 3.12, manylinux x86_64, no dependencies (pip download --no-deps): pyzmq,
#   setproctitle and msgspec (the wire codec; not assumed there) and pytest-asyncio (not there either). Versions are pinned to the ones this
#   project is tested with; bench/gpu_env.py checks their requirements against the device's packages at run time.
# - transformers is NOT carried: the device's 5.17.0 has what we use (its get_correct_experts_implementation reads
#   the registered experts implementations, so set_experts_implementation("promoe_offload") works; checked in
#   5.17.0's modeling_utils.py, and the CPU oracle tests pass under 5.17.0 with huggingface-hub 1.33.0). Carrying
#   5.25 would drag in huggingface-hub 2.x and kernels, which the device's packages do not fit.
# - .whl/data/deepseek-v2-lite-routing.npz: the routing trace (../shared/traces does not travel with the checkout).
#
# --check: install the wheels into a fresh --target and import them with a local Python 3.12 if there is one
# (pyenv's), else only the pure-Python ones with this Python.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=("pyzmq==27.3.0" "setproctitle==1.3.8" "msgspec==0.23.0" "pytest-asyncio==1.5.0")
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform manylinux_2_5_x86_64)
TRACE=../shared/traces/deepseek-v2-lite-routing.npz
PY="${PYTHON:-python3}"

mkdir -p .whl/data
grep -qx '/.whl/' .gitignore || echo "warning: /.whl/ is not in .gitignore: carry needs an ignored path" >&2
for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"
    rm -f .whl/"${name//-/_}"-*.whl .whl/"$name"-*.whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$spec"
done
if [ -f "$TRACE" ]; then
    cp -f "$TRACE" .whl/data/ && chmod u+w .whl/data/*
else
    echo "warning: $TRACE not found: the trace routing source will fail on the device" >&2
fi
ls -la .whl .whl/data
du -sh .whl

if [ "${1:-}" = "--check" ]; then
    target=$(mktemp -d)
    trap 'rm -rf "$target"' EXIT
    py312=""
    for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3.12; do
        if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then
            py312="$candidate"; break
        fi
    done
    if [ -n "$py312" ]; then  # exactly the device's install command, with a Python of the device's version
        "$py312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
            .whl/*.whl
        PYTHONPATH="$target" "$py312" -c "import sys, zmq, setproctitle, msgspec; print('imports under', \
sys.version.split()[0], ': zmq', zmq.__version__, 'libzmq', zmq.zmq_version(), '| setproctitle', \
setproctitle.__version__, '| msgspec', msgspec.__version__)"
        PYTHONPATH="$target" "$py312" -c "import pytest_asyncio; print('pytest_asyncio ok')" 2>/dev/null \
            || echo "pytest_asyncio: not importable without pytest in this Python 3.12 (the device has pytest)"
    else
        echo "no Python 3.12 here: installing and importing only the pure-Python wheel"
        "$PY" -m pip install -q --no-index --no-deps --target "$target" .whl/pytest_asyncio-*.whl
        PYTHONPATH="$target" "$PY" -c "import pytest_asyncio; print('pytest_asyncio ok')"
    fi
fi
