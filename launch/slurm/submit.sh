#!/usr/bin/env bash
# Submit a whole GIFT run on SLURM: prepare (a CPU job), then the scorer pool and the trainer together (on their
# own partitions) once prepare succeeded, then the merge after the trainer succeeded. Nothing heavy runs here.
#
#   CONFIG=/shared/run.yaml SCORE_PARTITION=inference SCORE_NODES=2 \
#   TRAIN_PARTITION=train TRAIN_NODES=4 GPUS_PER_NODE=8 ./launch/slurm/submit.sh
#
# The cluster shape and every job's resources (GPUS_PER_NODE, TRAIN_NODES, SCORE_NODES, CPUS_PER_GPU, *_MEM,
# *_TIME, PREPARE_CPUS, MERGE_CPUS) are variables with their defaults in defaults.sh; they reach sbatch as
# options. Optional: PREPARE_PARTITION and MERGE_PARTITION (default: TRAIN_PARTITION), VENV (a virtualenv folder)
# or CONDA_ENV (a conda environment) activated here and in every job, GPUS_PER_REPLICA (tensor-parallel scoring,
# see score.sbatch), EXTRA_SBATCH_ARGS (e.g. "--account=abc --qos=high").
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/../common.sh"
# shellcheck source=launch/slurm/defaults.sh
source "$here/defaults.sh"
require_var CONFIG "run config YAML on storage every node sees"
require_var SCORE_PARTITION "partition of the scoring pool"
require_var TRAIN_PARTITION "partition of the trainer"
require_file "$CONFIG" "run config"
activate_env
# sbatch runs a copy of each script from its spool folder: tell them where launch/ is. The jobs get this
# environment (--export=ALL): the activated one, CONFIG and the GPUs per node.
LAUNCH_DIR="$(cd "$here/.." && pwd)"
export LAUNCH_DIR CONFIG GPUS_PER_NODE
read -r -a extra <<< "${EXTRA_SBATCH_ARGS:-}"

submit() {  # submit ARGS... SCRIPT: the job id (--parsable prints "id" or "id;cluster")
  local id
  id=$(sbatch --parsable "${extra[@]}" --export=ALL "$@")
  echo "${id%%;*}"
}

prepare_id=$(submit --partition="${PREPARE_PARTITION:-$TRAIN_PARTITION}" --cpus-per-task="$PREPARE_CPUS" \
  --mem="$PREPARE_MEM" --time="$PREPARE_TIME" "$here/prepare.sbatch")
score_id=$(submit --partition="$SCORE_PARTITION" --nodes="$SCORE_NODES" --ntasks-per-node="$GPUS_PER_NODE" \
  --gpus-per-task=1 --cpus-per-task="$CPUS_PER_GPU" --mem="$SCORE_MEM" --time="$SCORE_TIME" --requeue \
  --dependency="afterok:$prepare_id" "$here/score.sbatch")
train_id=$(submit --partition="$TRAIN_PARTITION" --nodes="$TRAIN_NODES" --ntasks-per-node=1 \
  --gpus-per-node="$GPUS_PER_NODE" --cpus-per-task="$((CPUS_PER_GPU * GPUS_PER_NODE))" --mem="$TRAIN_MEM" \
  --time="$TRAIN_TIME" --requeue --dependency="afterok:$prepare_id" "$here/train.sbatch")
merge_id=$(submit --partition="${MERGE_PARTITION:-$TRAIN_PARTITION}" --cpus-per-task="$MERGE_CPUS" \
  --mem="$MERGE_MEM" --time="$MERGE_TIME" --dependency="afterok:$train_id" "$here/merge.sbatch")
echo "prepare job $prepare_id; scorer job $score_id ($SCORE_NODES x $GPUS_PER_NODE GPUs) and trainer job" \
  "$train_id ($TRAIN_NODES x $GPUS_PER_NODE GPUs) after it; merge job $merge_id after the trainer"
