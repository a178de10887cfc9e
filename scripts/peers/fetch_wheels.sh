#!/usr/bin/env bash
# Download the side by side's peers (scripts/peers/requirements.txt: Megatron-Core, torchtitan and the few
# pure-Python packages they import that a CUDA torch image lacks) into DIR, for a GPU machine that reaches
# no package registry. Run it where PyPI is reachable; carry DIR (about 15 MB) to the GPU machine, where
# scripts/gpu_check.sh (PEER_WHEELS=DIR) installs them offline with scripts/peers/install_wheels.sh.
#
#   scripts/peers/fetch_wheels.sh DIR
#
# pip download --no-deps: exactly the pinned files, nothing they would pull in (torch above all). megatron-core
# ships a compiled helper (cp3XX wheels): one per Python of PY_VERSIONS (default "3.10 3.11 3.12 3.13") for
# PLATFORM (default manylinux_2_28_x86_64); the others are pure-Python, fetched once. PYTHON picks the pip.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -eq 1 && "$1" != -h && "$1" != --help ]] || { echo "usage: $0 DIR" >&2; exit 2; }
DIR=$1
PY=${PYTHON:-python3}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
mkdir -p "$DIR"
pins=$(grep -v '^\s*#' "$HERE/requirements.txt" | sed 's/#.*//' | tr -s ' ' | grep -v '^\s*$')
compiled=$(grep '^megatron-core==' <<<"$pins")
pure=$(grep -v '^megatron-core==' <<<"$pins")
# shellcheck disable=SC2086 # one argument per pin
"$PY" -m pip download --quiet --no-deps --dest "$DIR" $pure
for version in ${PY_VERSIONS:-3.10 3.11 3.12 3.13}; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --platform "$PLATFORM" \
    --python-version "$version" --dest "$DIR" $compiled
done
cp "$HERE/requirements.txt" "$DIR/requirements.txt"
echo "fetch_wheels: $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR" >&2
