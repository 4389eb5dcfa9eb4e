#!/usr/bin/env bash
# The GPU check, for one GPU: `bash launch/gpu_check.sh [OUT_DIR] [es_llm.tools.gpu_check flags...]`.
# Default profile (fits one short call: the check stops itself after 410 s, builds included):
# the Triton kernel parity tests on the GPU, 100 steps each of `es-llm train` (uniform, es) with
# the shipped zero1_bf16 config and gpt2-124m, a plain PyTorch loop of the same model and batch,
# host-sync counts, a few ES steps through the Megatron-core driver (`--engine megatron`, TP=1)
# and a short `es-llm compare`, in that order; a piece starts only if its
# estimated time still fits. `--full` runs the long profile (300 steps, every kernel test, a
# longer compare, no time limit); `--budget-s S` sets the limit. OUT_DIR/gpu_check.{json,md}
# (default OUT_DIR: runs/gpu_check) is rewritten as each piece starts and ends, so a killed
# check still leaves its numbers. Needs no network: the data is the embedded corpus. See
# docs/gpu.md for the pieces, their time budgets and what each column means.
# es-llm must be importable by $PYTHON (default python3): `pip install -e .` in this checkout,
# or an offline install (see docs/gpu.md). Everything runs with the output directory as the
# working directory, so this checkout's es_llm/ folder never shadows an installed package.
# `--cpu-smoke` checks the script itself with a tiny model on the CPU (numbers meaningless).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="runs/gpu_check"
if [[ $# -gt 0 && "$1" != -* ]]; then
  OUT=$1
  shift
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [[ "$OUT" == "$REPO" ]]; then
  echo "gpu_check: choose an output directory other than the checkout root (its es_llm/ folder would shadow the installed package)" >&2
  exit 2
fi
PYTHON=${PYTHON:-python3}
cd "$OUT"
# find the modules without importing them: importing torch and triton here would cost a
# start-up of the check's time budget
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('es_llm.tools.gpu_check') and u.find_spec('es_llm.kernels')))" 2>/dev/null; then
  echo "gpu_check: es-llm is not importable by $PYTHON: run 'pip install -e $REPO' or the offline setup (docs/gpu.md)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m es_llm.tools.gpu_check "$OUT" --repo "$REPO" "$@"
