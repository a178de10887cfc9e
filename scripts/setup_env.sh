#!/usr/bin/env bash
# Create (or reuse) .venv and install megalm into it with the CPU build of torch.
# Sourced by examples/quickstart.sh and scripts/test.sh; EXTRAS=dev adds the test tools.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build on a CPU machine.
# (GPU clusters: install the CUDA build of torch yourself, then `pip install -e .`.)
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
