#!/usr/bin/env bash
# Start this node's torchrun agent of a multi-node job; run the same command on every node.
# Nodes find each other through torch's c10d rendezvous at MASTER_ADDR:MASTER_PORT (any one node
# that every node can reach; no shared filesystem needed).
#
#   NNODES=4 NPROC_PER_NODE=8 MASTER_ADDR=node001 MASTER_PORT=29500 launch/multi_node.sh configs/yuan-lm-13b.yaml
#
# Environment: NNODES (required), MASTER_ADDR (required), MASTER_PORT (29500), NPROC_PER_NODE
# (GPUs on this node), RDZV_ID (job id shared by all nodes; SLURM_JOB_ID when set), MAX_RESTARTS
# (0: restarts of the whole group after a failure), RDZV_TIMEOUT (seconds to wait for all nodes),
# MEGALM_LOG_DIR (logs), and the NCCL network, flight-recorder and allocator settings of
# launch/env.sh (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, ...; each overridable).
set -euo pipefail
if [[ $# -lt 1 || -z "${NNODES:-}" || -z "${MASTER_ADDR:-}" ]]; then
  echo "usage: NNODES=N MASTER_ADDR=HOST [MASTER_PORT=29500] [NPROC_PER_NODE=G] $0 CONFIG [key=value ...]" >&2
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
exec ${TORCHRUN:-python -m megalm.launch} \
  --nnodes "$NNODES" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-megalm}}" \
  --rdzv-conf "timeout=${RDZV_TIMEOUT:-900}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m megalm.cli train "$@"
