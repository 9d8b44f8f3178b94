#!/usr/bin/env bash
# Multi-node training with torchrun: run this same command on every node (by hand, mpirun, or a scheduler).
#
#   CONFIG=run.yaml NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 ./launch/torchrun_multinode.sh
#
# Optional: MASTER_PORT (29500), RESUME=1 to continue from the latest checkpoint when there is one
# (--resume-if-exists: a first start or a restart alike).
source "$(dirname "$0")/common.sh"
require_var CONFIG "path of the run config YAML"
require_var NNODES "number of nodes"
require_var NODE_RANK "this node's rank, 0..NNODES-1"
require_var MASTER_ADDR "address of the node with NODE_RANK=0"
require_var GPUS_PER_NODE "processes (GPUs) per node"
require_file "$CONFIG" "run config"
MASTER_PORT="${MASTER_PORT:-29500}"
resume=()
[[ "${RESUME:-0}" == "1" ]] && resume=(--resume-if-exists)

run_trainer torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m gift_dist.cli train --config "$CONFIG" "${resume[@]}" "$@"
