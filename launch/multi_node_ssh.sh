#!/usr/bin/env bash
# Several nodes from one head node over passwordless ssh (pdsh when installed):
#   launch/multi_node_ssh.sh HOSTFILE [es-llm train flags...]
# HOSTFILE lines: `<hostname> slots=<gpus on that host>`; the launcher starts
# deepspeed.launcher.launch on every host listed, with the same command line.
# Environment: MASTER_ADDR (default: the first host's `hostname -I`), MASTER_PORT (29500),
# LAUNCHER (pdsh | openmpi | mvapich | slurm ..., default pdsh), DS_LAUNCHER_ARGS (extra
# launcher flags). Variables listed in ./.deepspeed_env or ~/.deepspeed_env (NAME=VALUE
# lines) are exported on every node; put NCCL_* / ES_LLM_CACHE / PATH there.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 HOSTFILE [es-llm train flags...]" >&2
  exit 2
fi
HOSTFILE=$1
shift
ARGS=(--hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${MASTER_ADDR:-}" ]]; then
  ARGS+=(--master_addr "$MASTER_ADDR")
fi
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # PYTHON, DS, quiet_launcher, ...
quiet_launcher warning "$@"
# shellcheck disable=SC2086
exec "${DS[@]}" "${ARGS[@]}" ${DS_LAUNCHER_ARGS:-} --module es_llm.cli train "$@"
