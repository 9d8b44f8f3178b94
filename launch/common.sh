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
