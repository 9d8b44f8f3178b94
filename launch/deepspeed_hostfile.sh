#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher, in one of two modes:
#
#   pdsh/ssh (default): run once, on the first node; DeepSpeed reaches every host of the hostfile over ssh.
#     CONFIG=run.yaml HOSTFILE=hostfile ./launch/deepspeed_hostfile.sh [section.key=value ...]
#   one launcher per node (Kubernetes, SLURM without ssh between nodes): run it on every node with its rank.
#     CONFIG=run.yaml HOSTFILE=hostfile NO_SSH=1 NODE_RANK=i MASTER_ADDR=node-1 ./launch/deepspeed_hostfile.sh
#
# hostfile lines look like "node-1 slots=8". Every host must see the same paths (shared filesystem).
# Optional: MASTER_ADDR (default: first host of the hostfile), MASTER_PORT (29500), RESUME=1 to continue from the
# latest checkpoint when there is one (--resume-if-exists: a first start or a restart alike).
# SIGTERM to this script reaches every rank on this node; they save a checkpoint and the script ends with 75.
source "$(dirname "$0")/common.sh"
require_var CONFIG "path of the run config YAML"
require_var HOSTFILE "DeepSpeed hostfile: one 'host slots=N' line per node"
require_file "$CONFIG" "run config"
require_file "$HOSTFILE" "hostfile"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
MASTER_PORT="${MASTER_PORT:-29500}"
resume=()
[[ "${RESUME:-0}" == "1" ]] && resume=(--resume-if-exists)
mode=()
if [[ "${NO_SSH:-0}" == "1" ]]; then
  require_var NODE_RANK "this node's rank, 0.. in hostfile order"
  mode=(--no_ssh --node_rank "$NODE_RANK")
fi

run_trainer deepspeed --hostfile "$HOSTFILE" "${mode[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --no_local_rank --module gift_dist.cli train --config "$CONFIG" "${resume[@]}" "$@"
