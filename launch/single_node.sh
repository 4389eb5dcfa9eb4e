#!/usr/bin/env bash
# One node, N ranks: `launch/single_node.sh N [es-llm train flags...]`.
# GPUs: one rank per GPU. CPU-only machines: N processes on the CPU (gloo/shm), useful for
# tests and debugging. Environment: MASTER_PORT (default 29500), DS_LAUNCHER_ARGS (extra
# flags for the deepspeed launcher, e.g. "--include localhost:0,1").
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 NUM_RANKS [es-llm train flags...]" >&2
  exit 2
fi
N=$1
shift
# The launcher: $DEEPSPEED when set (e.g. "python3 -m deepspeed.launcher.runner"), else the
# `deepspeed` script, else the same launcher through $PYTHON (default python3) when the script
# is not on PATH (wheels installed with --target, some images).
PYTHON=${PYTHON:-python3}
if [[ -n "${DEEPSPEED:-}" ]]; then
  read -r -a DS <<<"$DEEPSPEED"
elif command -v deepspeed >/dev/null 2>&1; then
  DS=(deepspeed)
else
  DS=("$PYTHON" -m deepspeed.launcher.runner)
fi
# On CPU two ranks on few cores thrash with one OpenMP pool each; keep one thread per rank
# unless the caller chose.
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
# shellcheck disable=SC2086
exec "${DS[@]}" ${DS_LAUNCHER_ARGS:-} --num_gpus "$N" --master_port "${MASTER_PORT:-29500}" \
  --module es_llm.cli train "$@"
