# Environment defaults for a GPU run, sourced by single_node.sh and multi_node.sh (and so by
# slurm.sbatch). Every variable keeps a value already set: export your own before launching.
#
# Debugging a hang: the NCCL flight recorder keeps the last TORCH_FR_BUFFER_SIZE collectives and
# p2p operations of each rank in a ring buffer and, on a watchdog timeout, writes them to
# ${TORCH_FR_DUMP_TEMP_FILE}<rank> (default $MEGALM_LOG_DIR/nccl_trace_rank_<rank>); torch's
# `torchfrtrace DIR` then names the collective that each rank was stuck in. torch 2.13 reads the
# TORCH_FR_* names and falls back to the older TORCH_NCCL_* ones; both are set, to the same values.
#
# Cluster network (no defaults: they depend on the cluster; passed through when set):
#   NCCL_SOCKET_IFNAME   interface(s) for NCCL's bootstrap and socket transport, e.g. "ib0" or "^lo,docker"
#   NCCL_IB_HCA          InfiniBand adapters to use, e.g. "mlx5_0,mlx5_1" (or "^mlx5_4" to exclude one)
#   NCCL_DEBUG           NCCL's log level: WARN (the default here), INFO to see the chosen transports
#   GLOO_SOCKET_IFNAME   the same as NCCL_SOCKET_IFNAME for the gloo group (checkpoint coordination)
mkdir -p "${MEGALM_LOG_DIR:-logs}"
MEGALM_LOG_DIR=$(cd "${MEGALM_LOG_DIR:-logs}" && pwd)  # absolute: every rank dumps to the same place
export MEGALM_LOG_DIR
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
if [[ -n "${NCCL_SOCKET_IFNAME:-}" ]]; then export NCCL_SOCKET_IFNAME; fi
if [[ -n "${NCCL_IB_HCA:-}" ]]; then export NCCL_IB_HCA; fi
if [[ -n "${GLOO_SOCKET_IFNAME:-${NCCL_SOCKET_IFNAME:-}}" ]]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}
fi
# NCCL flight recorder: record, and dump on a timeout.
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}}
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-$TORCH_FR_BUFFER_SIZE}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$MEGALM_LOG_DIR/nccl_trace_rank_}}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$TORCH_FR_DUMP_TEMP_FILE}
# The caching allocator grows segments instead of allocating new fixed-size ones: less
# fragmentation when activation shapes vary (reserved memory much above allocated).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# On SIGTERM/SIGINT torchrun forwards the signal and kills workers that have not exited after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch's default: 30); megalm's stop saves a checkpoint
# first, which takes longer than that at 13B+, so allow 15 minutes (read by torch 2.13's launcher).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}
