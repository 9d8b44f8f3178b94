# shellcheck shell=bash
# The cluster shape and the resources of every SLURM job, in one place. Each is an environment variable: set it
# to change it (CONFIG=... GPUS_PER_NODE=4 TRAIN_NODES=2 ./launch/slurm/submit.sh). submit.sh passes them to
# sbatch as options, which override the #SBATCH lines of the .sbatch files; those lines hold these same values,
# for a plain `sbatch launch/slurm/train.sbatch` (tests/test_launch.py checks that they agree).
: "${GPUS_PER_NODE:=8}"         # GPUs of a node, each job takes them all
: "${TRAIN_NODES:=1}"           # nodes of the trainer
: "${SCORE_NODES:=1}"           # nodes of the scorer pool (one worker per GPU)
: "${CPUS_PER_GPU:=8}"          # CPU cores per GPU (data loading, the host side of offload)
: "${TRAIN_MEM:=0}"             # memory per trainer node; 0: all of it
: "${SCORE_MEM:=0}"             # memory per scorer node; 0: all of it
: "${TRAIN_TIME:=2-00:00:00}"   # wall time of a trainer job (a requeue starts a new one, resuming)
: "${SCORE_TIME:=1-00:00:00}"   # wall time of a scorer job
: "${PREPARE_CPUS:=16}"         # prepare: CPU job, tokenizing with this many processes
: "${PREPARE_MEM:=64G}"
: "${PREPARE_TIME:=04:00:00}"
: "${MERGE_CPUS:=8}"            # merge: CPU job, memory about one checkpoint shard plus the adapter (`gift-dist plan`)
: "${MERGE_MEM:=32G}"
: "${MERGE_TIME:=04:00:00}"
