#!/usr/bin/env bash
# Install the peers offline from a fetch_wheels.sh directory into TARGET (default .peer-packages in the
# checkout), beside the Python environment rather than into it: the side by side puts TARGET on the peer
# runners' PYTHONPATH only, so megalm's own runs never see these packages.
#
#   scripts/peers/install_wheels.sh DIR [TARGET]        (PYTHON: the interpreter, default python3)
#
# pip install --no-index --no-deps --find-links DIR of the pins in scripts/peers/requirements.txt: nothing
# is fetched, nothing resolved (a pin missing from DIR fails here, by name). Prints TARGET.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 1 && $# -le 2 && "$1" != -h && "$1" != --help ]] || { echo "usage: $0 DIR [TARGET]" >&2; exit 2; }
DIR=$1
TARGET=${2:-$HERE/../../.peer-packages}
PY=${PYTHON:-python3}
[[ -d "$DIR" ]] || { echo "install_wheels: no wheel directory $DIR (make it with scripts/peers/fetch_wheels.sh)" >&2; exit 2; }
mkdir -p "$TARGET"
pins=$(grep -v '^\s*#' "$HERE/requirements.txt" | sed 's/#.*//' | tr -s ' ' | grep -v '^\s*$')
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install_wheels: Python < 3.11: torchtitan 0.3 needs 3.11; installing Megatron-Core alone" >&2
  pins=$(grep -Ev '^(torchtitan|spmd_types|tyro|docstring_parser|typeguard)==' <<<"$pins")
fi
# shellcheck disable=SC2086 # one argument per pin
"$PY" -m pip install --quiet --no-index --no-deps --upgrade --find-links "$DIR" --target "$TARGET" $pins >&2
cd "$TARGET" && pwd
