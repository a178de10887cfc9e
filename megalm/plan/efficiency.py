"""What a GPU achieves below its peak: small GEMMs, FP8 quantisation passes, host launch cost, overlapped TP comm.

Used by megalm.plan.model's step time. The constants live in the cluster file (megalm.plan.cluster:
`gemm_half_dim`, `kernel_launch_us`, `fp8_peak_tflops`); docs/plan.md "Step time: launches, small GEMMs" says where
their values come from.

- **Small GEMMs.** A GEMM [M, K] x [K, N] runs at matmul_efficiency x m / (m + gemm_half_dim) of the peak, m =
  min(M, N, K): a GEMM with a narrow dimension fills fewer tiles per SM and reads more bytes per FLOP. Backward's
  two GEMMs of a linear have the same three dimensions, so the same efficiency.
- **FP8 linears** (`train.fp8` tensorwise or rowwise: the tensor-parallel column and row linears through
  torch._scaled_mm with dynamic scaling): their GEMMs run at `fp8_peak_tflops` (the same curve), and each linear
  adds memory-bound quantisation passes: forward reads its input and weight for the amax and again for the cast,
  writing 1-byte copies; backward does the same for the output gradient and writes the transposed fp8 copies the
  two backward GEMMs need (torch._scaled_mm wants a row-major first and a column-major second operand); plus the
  kernels of those passes.
- **Launch cost.** Every kernel costs the host `kernel_launch_us` (Python, autograd, dispatcher, the CUDA
  launch); the host runs ahead of the GPU, so over a micro-batch the slower of the two sets the pace: only the
  host time beyond the GPU's is exposed.
- **TP comm overlap** (`parallel.tp_comm_overlap` under sequence parallel): a collective split into k chunks,
  each overlapped with the GEMM of its neighbouring chunk, exposes its first (or last) chunk and whatever of the
  rest outlasts the GEMM: comm / k + max(0, comm (k - 1) / k - gemm).
"""

from __future__ import annotations

from megalm.config import ModelConfig
from megalm.plan.cluster import Cluster, PlanError
from megalm.plan.kernels import KernelCounts
from megalm.plan.layout import Layout, layer_gemms

FP8_MODES = ("none", "tensorwise", "rowwise")
# kernels one FP8 linear adds to a bf16 one (forward, backward), eager: amax, scale, clamp and cast of each
# operand, the transposed copies backward's GEMMs read, the token padding to 16 rows; rowwise also its per-row
# power-of-two scales. Counted from megalm.parallel.fp8 (megalm.plan.kernels.count_fp8_kernels; a test recounts)
FP8_KERNELS = {"none": (0, 0), "tensorwise": (17, 27), "rowwise": (23, 47)}


def gemm_efficiency(cluster: Cluster, m: int, k: int, n: int) -> float:
    """Achieved fraction of peak of an [m, k] x [k, n] GEMM: matmul_efficiency, less for a narrow dimension."""
    narrow = min(m, k, n)
    return cluster.matmul_efficiency * narrow / (narrow + cluster.gemm_half_dim)


def gemm_seconds(cluster: Cluster, m: int, k: int, n: int, fp8: bool = False) -> float:
    """Seconds of one [m, k] x [k, n] GEMM (bf16/fp16 peak, or the FP8 peak)."""
    peak = fp8_peak(cluster) if fp8 else cluster.peak_tflops
    return 2.0 * m * k * n / (peak * 1e12 * gemm_efficiency(cluster, m, k, n))


def fp8_peak(cluster: Cluster) -> float:
    if not cluster.fp8_peak_tflops:
        raise PlanError(f"cluster {cluster.name!r} has no fp8_peak_tflops (a GPU without FP8 tensor cores): "
                        f"set train.fp8=none, or add fp8_peak_tflops to the cluster file")
    return cluster.fp8_peak_tflops


def fp8_quantisation_bytes(m: int, k: int, n: int, act_bytes: int) -> tuple[float, float]:
    """(forward, backward) bytes of the quantisation passes of one FP8 linear [m, k] x [k, n]: per operand an amax
    read and a cast (read, write 1 byte); backward: the output gradient's amax and cast, and transposed 1-byte copies
    of the input, the gradient and the weight (the weight's a fresh cast of the high-precision one)."""
    inputs, weight, grad = m * k, k * n, m * n
    forward = (2 * act_bytes + 1) * (inputs + weight)
    backward = (2 * act_bytes + 1) * grad + 2 * (inputs + grad) + (2 * act_bytes + 1) * weight
    return float(forward), float(backward)


def overlapped(comm: float, gemm: float, chunks: int) -> float:
    """Exposed seconds of a collective split into `chunks` pieces overlapped with a GEMM of `gemm` seconds."""
    if chunks <= 1:
        return comm
    return comm / chunks + max(0.0, comm * (chunks - 1) / chunks - gemm)


def exposed_launch(kernels: float, busy: float, cluster: Cluster) -> float:
    """Host seconds of launching `kernels` beyond `busy` GPU seconds over the same stretch (a micro-batch)."""
    return max(0.0, kernels * cluster.kernel_launch_us * 1e-6 - busy)


def layer_gemm_times(model: ModelConfig, layout: Layout, cluster: Cluster) -> list[float]:
    """Seconds of each weight GEMM of one layer's forward for one micro-batch on one GPU (megalm.plan.efficiency:
    narrow GEMMs below matmul_efficiency; FP8 linears at the FP8 peak), in `layer_gemms`' order."""
    tokens = layout.local_tokens(model.seq_length) * layout.micro_batch_size
    fp8 = layout.fp8 != "none"
    return [gemm_seconds(cluster, m, k, n, fp8) for m, k, n in layer_gemms(model, layout.tp, tokens)]


def fp8_layer_seconds(model: ModelConfig, layout: Layout, cluster: Cluster, act_bytes: int) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's FP8 quantisation passes for one micro-batch (0 without FP8)."""
    if layout.fp8 == "none":
        return 0.0, 0.0
    tokens = layout.local_tokens(model.seq_length) * layout.micro_batch_size
    memory_rate = cluster.hbm_bandwidth_gbs * 1e9 * cluster.memory_efficiency
    passes = [fp8_quantisation_bytes(m, k, n, act_bytes) for m, k, n in layer_gemms(model, layout.tp, tokens)]
    return sum(f for f, _ in passes) / memory_rate, sum(b for _, b in passes) / memory_rate


def tp_layer_comm(model: ModelConfig, layout: Layout, cluster: Cluster, collective: float) -> tuple[float, float]:
    """(seconds of one layer's tensor-parallel collectives in forward and backward, of a recomputed forward's) for
    one micro-batch, `collective` being one all-reduce of the layer's [s, b, h] activations: 2 per forward and 2
    per backward (under sequence parallel an all-gather and a reduce-scatter each, the same time).

    With parallel.tp_comm_overlap under sequence parallel each all-gather (before the attention-input and MLP-input
    GEMMs) and reduce-scatter (after the output projection and the MLP's output GEMM), half an all-reduce each, is
    split into parallel.tp_comm_overlap_chunks pieces overlapped with its GEMM's neighbouring piece (`overlapped`);
    backward's reverse collectives likewise beside the input-gradient GEMMs, which take the forward GEMMs' time."""
    if not layout.overlaps_tp_comm:
        return 4 * collective, 2 * collective
    gemms = layer_gemm_times(model, layout, cluster)
    attention_in = 2 if model.grouped_attention() else 1
    beside = [sum(gemms[:attention_in]), gemms[attention_in], sum(gemms[attention_in + 1:-1]), gemms[-1]]
    forward = sum(overlapped(collective / 2, gemm, layout.tp_overlap_chunks) for gemm in beside)
    return 2 * forward, forward


def layer_launches(model: ModelConfig, layout: Layout, counts: KernelCounts) -> tuple[int, int]:
    """(kernels one layer launches per micro-batch in forward and backward, a recomputed layer's): megalm's own
    (megalm.plan.kernels), the FP8 passes', and the tensor-parallel collectives' (4 all-reduces; under sequence
    parallel 4 all-gathers or reduce-scatters and backward's 2 second gathers; overlapped: each of the 8 in k
    pieces beside k GEMM pieces, 2 k - 1 launches instead of 1). Selective recompute reruns the attention kernel."""
    t, linears = layout.tp, len(layer_gemms(model, layout.tp, 1))
    fp8 = FP8_KERNELS[layout.fp8]
    comm = 0
    if t > 1:
        comm = 4 if not layout.sequence_parallel else 8 * (2 * layout.tp_overlap_chunks - 1 if layout.overlaps_tp_comm else 1) + 2
    layer = counts.layer_forward + counts.layer_backward + linears * sum(fp8) + comm
    rerun = {"none": 0, "selective": 1, "full": counts.layer_forward + linears * fp8[0]}[layout.recompute]
    return layer, rerun
