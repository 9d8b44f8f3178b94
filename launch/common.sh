# shellcheck shell=bash
# Sourced by the launch scripts: fail early, naming the missing value.
set -euo pipefail

require_var() {
  local name="$1" hint="$2"
  if [[ -z "${!name:-}" ]]; then
    echo "error: $name is not set ($hint)" >&2
    exit 2
  fi
}

require_file() {
  local path="$1" what="$2"
  if [[ ! -f "$path" ]]; then
    echo "error: $what not found: $path" >&2
    exit 2
  fi
}

# run_trainer LAUNCHER ARGS...: run torchrun / deepspeed and end with 75 when the workers saved a checkpoint
# because of a signal. The launchers themselves exit 1 when signalled (torchrun raises SignalException), so a
# scheduler would see a failure; the trainer's rank 0 writes $GIFT_PREEMPT_MARKER once its checkpoint is saved.
# The launcher runs in a process group of its own, and a SIGTERM/SIGINT sent to this script (PID 1 of a
# container, or the job step) goes to that whole group: DeepSpeed's `deepspeed` runner would die of it without
# passing it on to its workers. The script returns only once every process of the group is gone.
run_trainer() {
  local marker code
  marker="$(mktemp -u "${TMPDIR:-/tmp}/gift_preempted.XXXXXX")"
  export GIFT_PREEMPT_MARKER="$marker"
  setsid "$@" &
  local launcher=$!
  trap 'kill -TERM -- "-$launcher" 2>/dev/null || true' TERM INT
  set +e
  wait "$launcher"
  code=$?
  # A trapped signal ends the first wait early: wait for the launcher's real exit, then for its group.
  while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher"
    code=$?
  done
  while kill -0 -- "-$launcher" 2>/dev/null; do
    sleep 1
  done
  set -e
  trap - TERM INT
  if [[ -f "$marker" ]]; then
    echo "PREEMPTED: $(cat "$marker"); rerun with RESUME=1 to continue" >&2
    rm -f "$marker"
    exit 75
  fi
  exit "$code"
}

# activate_env: the Python environment named by VENV (a virtualenv folder) or CONDA_ENV (a conda environment's
# name or prefix), when one is set; else the gift-dist already on PATH.
activate_env() {
  if [[ -n "${VENV:-}" ]]; then
    require_file "$VENV/bin/activate" "virtualenv (VENV)"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  elif [[ -n "${CONDA_ENV:-}" ]]; then
    if ! command -v conda >/dev/null; then
      echo "error: CONDA_ENV=$CONDA_ENV is set but conda is not on PATH" >&2
      exit 2
    fi
    eval "$(conda shell.bash hook)"
    conda activate "$CONDA_ENV"
  fi
}

