#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (pdsh/ssh from the first node to every host in the hostfile).
#
#   CONFIG=run.yaml HOSTFILE=hostfile ./launch/deepspeed_hostfile.sh [section.key=value ...]
#
# hostfile lines look like "node-1 slots=8". Every host must see the same paths (shared filesystem).
# Optional: MASTER_ADDR (default: first host of the hostfile), MASTER_PORT (29500), RESUME=1 to resume.
source "$(dirname "$0")/common.sh"
require_var CONFIG "path of the run config YAML"
require_var HOSTFILE "DeepSpeed hostfile: one 'host slots=N' line per node"
require_file "$CONFIG" "run config"
require_file "$HOSTFILE" "hostfile"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
MASTER_PORT="${MASTER_PORT:-29500}"
resume=()
[[ "${RESUME:-0}" == "1" ]] && resume=(--resume)

run_trainer deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --no_local_rank --module gift_dist.cli train --config "$CONFIG" "${resume[@]}" "$@"
