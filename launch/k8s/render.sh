#!/usr/bin/env bash
# Print manifests of launch/k8s with the cluster's shape and resources filled in (the ${NAME}s of the files;
# values.env has every name with its default, each overridable from the environment), for kubectl:
#
#   GPUS_PER_NODE=8 TRAIN_NODES=4 STORAGE_CLASS=filestore-rwx ./launch/k8s/render.sh train-pytorchjob.yaml \
#     | kubectl apply -f -
#
# Without arguments: every manifest. A name left unfilled, or a shape that cannot work, is an error.
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/../common.sh"
# shellcheck source=launch/k8s/values.env
source "$here/values.env"
names=(IMAGE RUN_CONFIG STORAGE_CLASS STORAGE_SIZE GPUS_PER_NODE TRAIN_NODES SCORE_WORKERS SCORE_TENSOR_NODES
       GPUS_PER_REPLICA CPUS_PER_GPU MEMORY_GIB_PER_GPU PREPARE_CPUS PREPARE_MEMORY MERGE_CPUS MERGE_MEMORY
       TRAIN_WORKERS NODE_CPU NODE_MEMORY GPU_MEMORY)
for name in GPUS_PER_NODE TRAIN_NODES SCORE_WORKERS SCORE_TENSOR_NODES GPUS_PER_REPLICA CPUS_PER_GPU \
            MEMORY_GIB_PER_GPU PREPARE_CPUS MERGE_CPUS; do
  if ! [[ "${!name}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $name=${!name} is not a positive whole number" >&2
    exit 2
  fi
done
(( $# )) || set -- "$here"/*.yaml
for file in "$@"; do
  [[ -f "$file" ]] || file="$here/$file"
  require_file "$file" "manifest"
  text="$(<"$file")"
  # Only the tensor-parallel scorer groups a node's GPUs into replicas: a 1-GPU node trains and scores one by one.
  if [[ "$text" == *'${GPUS_PER_REPLICA}'* ]] && (( GPUS_PER_NODE % GPUS_PER_REPLICA != 0 )); then
    echo "error: $file: GPUS_PER_REPLICA=$GPUS_PER_REPLICA does not divide GPUS_PER_NODE=$GPUS_PER_NODE" >&2
    exit 2
  fi
  for name in "${names[@]}"; do
    text="${text//"\${$name}"/"${!name}"}"
  done
  if [[ "$text" =~ \$\{[A-Za-z_]+\} ]]; then
    echo "error: $file: ${BASH_REMATCH[0]} has no value (values.env)" >&2
    exit 2
  fi
  printf -- '---\n%s\n' "$text"
done
