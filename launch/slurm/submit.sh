#!/usr/bin/env bash
# Submit a whole GIFT run on SLURM: prepare once, then the scorer pool and the trainer together (on their own
# partitions), then the merge after the trainer succeeded.
#
#   CONFIG=/shared/run.yaml SCORE_PARTITION=inference SCORE_NODES=2 \
#   TRAIN_PARTITION=train TRAIN_NODES=4 ./launch/slurm/submit.sh
#
# Optional: MERGE_PARTITION (default: TRAIN_PARTITION), EXTRA_SBATCH_ARGS (e.g. "--account=abc --time=24:00:00").
source "$(dirname "$0")/../common.sh"
require_var CONFIG "run config YAML on storage every node sees"
require_var SCORE_PARTITION "partition of the scoring pool"
require_var SCORE_NODES "number of scoring nodes"
require_var TRAIN_PARTITION "partition of the trainer"
require_var TRAIN_NODES "number of trainer nodes"
require_file "$CONFIG" "run config"
here="$(cd "$(dirname "$0")" && pwd)"
# sbatch runs a copy of each script from its spool folder: tell them where launch/ is.
LAUNCH_DIR="$(cd "$here/.." && pwd)"
export LAUNCH_DIR
read -r -a extra <<< "${EXTRA_SBATCH_ARGS:-}"
export CONFIG

gift-dist prepare --config "$CONFIG"
score_id=$(sbatch --parsable "${extra[@]}" --partition "$SCORE_PARTITION" --nodes "$SCORE_NODES" \
  --export=ALL "$here/score.sbatch")
train_id=$(sbatch --parsable "${extra[@]}" --partition "$TRAIN_PARTITION" --nodes "$TRAIN_NODES" \
  --export=ALL "$here/train.sbatch")
merge_id=$(sbatch --parsable "${extra[@]}" --partition "${MERGE_PARTITION:-$TRAIN_PARTITION}" \
  --dependency "afterok:$train_id" --export=ALL "$here/merge.sbatch")
echo "scorer job $score_id, trainer job $train_id, merge job $merge_id (after the trainer)"
