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
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # PYTHON, DS, quiet_launcher, ...
quiet_launcher error "$@"
one_thread_per_rank_on_cpu
# shellcheck disable=SC2086
exec "${DS[@]}" ${DS_LAUNCHER_ARGS:-} --num_gpus "$N" --master_port "${MASTER_PORT:-29500}" \
  --module es_llm.cli train "$@"
