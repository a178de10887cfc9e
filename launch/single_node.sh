#!/usr/bin/env bash
# Train on one machine with torchrun: one process per GPU (or NPROC_PER_NODE CPU processes).
#   NPROC_PER_NODE=8 launch/single_node.sh configs/yuan-lm-13b.yaml optim.lr=1e-4
# Environment: NPROC_PER_NODE (GPUs on this machine), MAX_RESTARTS (0), MEGALM_LOG_DIR (logs), and
# the NCCL, flight-recorder and allocator defaults of launch/env.sh (each overridable).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: [NPROC_PER_NODE=N] $0 CONFIG [key=value ...] [--dry-run]" >&2
  exit 2
fi
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
# megalm.launch is torchrun that exits 0 on a clean signal stop (SIGTERM/SIGINT: every worker saved
# and exited 0), where torchrun itself exits 1, so a scheduler does not count the stop as a failure.
# TORCHRUN may hold several words, e.g. "python -m torch.distributed.run" (plain torchrun).
# shellcheck disable=SC2086
exec ${TORCHRUN:-python -m megalm.launch} --standalone --nproc-per-node "$NPROC_PER_NODE" \
  --max-restarts "${MAX_RESTARTS:-0}" -m megalm.cli train "$@"
