#!/usr/bin/env bash
# One GPU lease, one command: install the carry set offline, run the GPU-marked tests, then the
# benchmark within its time budget. Everything it writes goes to $OUT (scripts/results without it).
#
#   python scripts/build_carry.py                 # here, once: .carry/ (diffusers, torchao, sageattention, us)
#   PYTHON=.venv/bin/python bash scripts/gpu_lease.sh --dry-run   # here: the plan and its budget, nothing run
#   bash scripts/gpu_lease.sh                     # there, from the checkout's root, with .carry/ carried
#
# Budget (seconds; one lease command may run 600): install ~15, tests <= TESTS_S (120), benchmark
# BUDGET_S (420) planned, killed at BUDGET_S + 30. Override with the environment, e.g. BUDGET_S=300.
set -uo pipefail

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT="${OUT:-scripts/results}"
PYTHON="${PYTHON:-python3}"
CARRY="${CARRY:-.carry}"
BUDGET_S="${BUDGET_S:-420}"
TESTS_S="${TESTS_S:-120}"
# The image has pytest and pytest-timeout but not pytest-asyncio: pyproject's asyncio settings are
# then unknown options, which must not fail the run; only the engine's and models' tests are collected.
TESTS=("$PYTHON" -m pytest -m gpu -p no:asyncio -p no:cacheprovider -W ignore::pytest.PytestConfigWarning
       -o "timeout=$TESTS_S" -q tests/pipelines tests/models)
# `fast` before `quality`: if the compiles leave room for one only, the preset with the unknowns
# (FP8, step caching: speed and fidelity) is the one measured.
BENCH=("$PYTHON" scripts/bench_gpu.py --target cuda --models svd-xt --budget-s "$BUDGET_S" --batch-sizes 1,2
       --presets reference,fast,quality,reference+sage,fast+sage --option inductor_tuning=false --out-dir "$OUT")

if [[ $DRY_RUN == 1 ]]; then
    echo "# install: $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $CARRY/*.whl"
    echo "# tests (at most ${TESTS_S} s): ${TESTS[*]}"
    echo "# benchmark (planned ${BUDGET_S} s, killed at $((BUDGET_S + 30)) s): ${BENCH[*]}"
    exec "${BENCH[@]}" --dry-run
fi

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/*.whl \
    || { echo "offline install of $CARRY failed"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, diffusers, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__)" \
    | tee -a "$OUT/gpu.txt"

timeout "$((TESTS_S + 10))" "${TESTS[@]}" 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
timeout "$((BUDGET_S + 30))" "${BENCH[@]}" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "# gpu tests: exit $tests_rc; benchmark: exit $bench_rc (124: killed at its limit; the JSON holds every finished row)"
[[ $tests_rc == 0 && $bench_rc == 0 ]]
