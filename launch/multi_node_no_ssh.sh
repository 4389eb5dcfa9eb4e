#!/usr/bin/env bash
# Several nodes without ssh: run this once on every node (by hand, a scheduler, k8s, ...):
#   NODE_RANK=<0..NUM_NODES-1> MASTER_ADDR=<node 0 address> \
#     launch/multi_node_no_ssh.sh HOSTFILE [es-llm train flags...]
# HOSTFILE: the same file on every node, one line per node, `<name> slots=<ranks there>`, in
# node-rank order (with --no_ssh the names are only labels: nothing connects to them, and
# each must be distinct). Every node starts its own ranks; global rank = slots of the nodes
# before it + local rank. MASTER_ADDR must be reachable from every node, MASTER_PORT
# (default 29500) free on node 0. DS_LAUNCHER_ARGS: extra launcher flags.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: NODE_RANK=r MASTER_ADDR=host $0 HOSTFILE [es-llm train flags...]" >&2
  exit 2
fi
: "${NODE_RANK:?set NODE_RANK to this node's index in the hostfile}"
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
HOSTFILE=$1
shift
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # PYTHON, DS, quiet_launcher, ...
quiet_launcher warning "$@"
one_thread_per_rank_on_cpu
# shellcheck disable=SC2086
exec "${DS[@]}" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" ${DS_LAUNCHER_ARGS:-} \
  --module es_llm.cli train "$@"
