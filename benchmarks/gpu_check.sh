#!/usr/bin/env bash
# The prepared GPU check of issue 18 (see benchmarks/gpu_check.py for what it measures).
#
#   bash benchmarks/gpu_check.sh              # lent H100/H200, no network: <= 8 minutes
#   bash benchmarks/gpu_check.sh --rehearse   # CPU, toy sizes (tests/test_gpu_check.py)
#
# Writes benchmarks/results/<date>-<device>.{md,json} under $OUT (or benchmarks/results/ when
# OUT is unset). The machine has no network: packages it lacks (jaxopt, diffusers) travel as
# wheels in the ignored .whl/ folder and are installed with --no-index --no-deps into a private
# target; the project itself is used from this checkout through PYTHONPATH (no resolver runs).
# Prepare the wheels here, where pip reaches PyPI:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl jaxopt==0.8.5 diffusers==0.42.1
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/rfmpc-gpu-check-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { echo "gpu_check: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
OUT_DIR="${OUT:-benchmarks/results}"
[ -n "${OUT:-}" ] && OUT_DIR="$OUT/benchmarks/results"
# 470 s hard stop (the script's own deadline is 440 s): the whole check stays under 8 minutes.
timeout -k 5 470 "$PY" -m benchmarks.gpu_check --out "$OUT_DIR" "$@"
