"""The analytic model: memory per pipeline stage and time per step of a layout on a cluster.

Everything follows the model spec's fields (norm, mlp, num_kv_heads, head_dim, bias, qkv_bias,
tie_embeddings): no test of a family name.

Memory (bytes per GPU, for the worst rank of each stage): weights, gradients and optimizer state
from the exact parameter geometry (`megalm.plan.layout`: RMSNorm without bias, SwiGLU's three matrices,
GQA's smaller key_value, replicated on tp / kv_heads ranks when tp > kv_heads, an untied output layer
on the last stage), activations per layer as megalm's layers
keep them on CUDA or CPU kernels (measured: megalm.plan.measure; Megatron numerics: the Korthikanti
et al. (2022) breakdown) times the micro-batches in flight on that stage for the chosen schedule,
the embedding / logits working set on the first / last stage, and communication buffers.

Time (seconds per optimizer step) on the slowest stage, which sets the pipeline's pace:
- compute: GEMMs (megalm.plan.flops: the spec's matrices) at `matmul_efficiency` x peak, less for narrow ones
  (megalm.plan.efficiency; FP8 linears at the FP8 peak plus their quantisation passes), plus memory-bound
  element-wise kernels (LayerNorm, bias/GeLU/dropout/residual, the loss's passes over the logits, and the
  [s, s] attention scores unless attention is fused) at `memory_efficiency` x HBM bandwidth; backward = 2x
  forward; recompute adds forward work;
- launch: the host's kernel launches (megalm.plan.kernels: counted from megalm's layer code) beyond the GPU's
  time over a micro-batch;
- tensor-parallel collectives: 2 all-reduces (or all-gather + reduce-scatter under sequence
  parallel, the same bytes; with tp_comm_overlap split into chunks beside their GEMMs) per layer in each
  forward, backward and recomputed forward; under
  sequence parallel backward also all-gathers the QKV, fc1 and logits input shards again for the
  weight gradients, launched before the input-gradient GEMM it overlaps: only what outlasts that
  GEMM counts;
- bubble: (pp - 1) / (m * v) of the busy time (the schedules' common formula, see
  megalm.parallel.schedules.analytic_bubble);
- pipeline p2p: one activation send forward and one gradient send backward per micro-batch and
  virtual stage, not overlapped;
- data-parallel gradient sync: ring all-reduce of the gradients (ZeRO-1: reduce-scatter), hidden
  behind the last backward when overlapped except for the last bucket; ZeRO-1's all-gather of the
  updated parameters in their dtype, hidden behind the next forward (megalm) except for the first
  bucket, or after the optimizer step;
- tied embeddings at pp > 1: the two copies' gradients summed between the first and last stage (an
  untied output layer needs none); tp > kv_heads: the key_value gradients summed over each kv head's
  tp / kv_heads replicas once per step;
- optimizer step: memory-bound AdamW over the local (or sharded) parameters.

Context parallelism (cp > 1, megalm.parallel.context): each rank holds seq_length / cp tokens of every sample,
so every per-token activation, GEMM, element-wise and tensor-parallel term is divided by cp and the attention
core costs 1/cp of the whole (local queries against every key, the load-balanced split); each layer also
keeps the all-gathered keys and values of the whole sequence, and the layers share one additive
[b or 1, 1, S/cp, S] mask over global positions per micro-batch. Time adds the key/value all-gather per
layer in forward and its reduce-scatter in backward (again in a recomputed forward), over the cp group's
link and not overlapped (`context_comm`).
Gradients are reduced, and ZeRO-1 sharded, over the dp x cp group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megalm.config import ModelConfig
from megalm.model.attention import masked_attention, uses_dense_prefix_mask
from megalm.parallel.context import dense_causal_mask
from megalm.parallel.schedules import analytic_bubble
from megalm.plan.cluster import Cluster, Numerics, PlanError
from megalm.plan.collectives import all_reduce_time, context_exchange_time, p2p_message_bytes, ring_half_time
from megalm.plan.efficiency import (
    exposed_launch, fp8_layer_seconds, gemm_seconds, layer_gemm_times, layer_launches, tp_layer_comm,
)
from megalm.plan.flops import layer_matmul_flops, training_flops_per_token
from megalm.plan.kernels import kernel_counts
from megalm.plan.layout import (
    ACTIVATION_BYTES, Layout, bucket_sizes, padded, projection_widths, rank_param_count, recomputed_layers,
    stage_chunks, zero1_shard_params,
)

GiB = 2**30


# ---- micro-batches in flight ---------------------------------------------------------------------


def in_flight(layout: Layout, pp_rank: int) -> int:
    """Most model chunks forwarded but not yet backwarded on a pipeline rank.

    Closed forms of megalm.parallel.schedules' lists (tests check them against `simulate`).
    """
    m, pp, v = layout.num_microbatches, layout.pp, layout.virtual_stages
    if layout.schedule == "gpipe" or pp == 1 and layout.schedule != "interleaved":
        return m if layout.schedule == "gpipe" else 1
    if layout.schedule == "1f1b":
        return min(pp - pp_rank, m)
    if m == pp:
        return m * v
    return min((pp - pp_rank - 1) * 2 + (v - 1) * pp + 1, m * v)


# ---- memory --------------------------------------------------------------------------------------


@dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    pp_rank: int
    layers: int
    params: int  # parameter count of the rank
    weights: int
    grads: int
    optimizer: int
    activations: int
    embedding_logits: int
    buffers: int
    reserved: int
    in_flight: int

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.activations + self.embedding_logits
                + self.buffers + self.reserved)


KERNELS = ("cuda", "cpu")  # whose kernels megalm's activation model describes (docs/plan.md "Activation memory")


def _korthikanti_layer_bytes(model: ModelConfig, layout: Layout, act_bytes: int) -> tuple[int, int, int]:
    """(kept by every layer, the attention core's own saves, what selective recompute keeps of it) under
    Megatron-LM's CUDA kernels: Korthikanti et al. (2022), materialised scores, 1-byte dropout masks."""
    s, b, h, f, a, t = (layout.local_tokens(model.seq_length), layout.micro_batch_size, model.hidden_size,
                        model.ffn_size(), model.num_heads, layout.tp)
    sp = t if layout.sequence_parallel else 1
    sbh = s * b * h
    hidden_mask = sbh // sp if model.hidden_dropout > 0 else 0
    replicated = 4 * act_bytes * sbh // sp + 2 * hidden_mask  # LN1 in, QKV in, LN2 in, fc1 in; dropout masks
    split = (4 * act_bytes * sbh + 2 * act_bytes * s * b * f) // t  # Q, K, V, proj in; GeLU in, fc2 in
    elements = a * s * model.seq_length * b // t  # local queries x every key
    scores = act_bytes * elements + ((act_bytes + 1) * elements if model.attention_dropout > 0 else 0)
    return replicated + split, scores, 0


def norm_saved_bytes(model: ModelConfig, tokens: int, act_bytes: int, kernels: str) -> int:
    """What one norm over `tokens` rows keeps for backward (parameters aside).

    layernorm: its input and fp32 mean and 1/std (on CPU, low-precision weight and bias as fp32 copies);
    rmsnorm (statistics in fp32, as transformers computes them): the fp32 input (the input itself in fp32,
    an fp32 copy otherwise), the fp32 1/rms per row, and the normalised rows cast back to the activation
    dtype, which the weight's product keeps."""
    h = model.hidden_size
    if model.norm == "rmsnorm":
        return (4 + act_bytes) * tokens * h + 4 * tokens
    kept = act_bytes * tokens * h + 2 * 4 * tokens
    if kernels == "cpu" and act_bytes != 4:
        kept += 2 * 4 * h  # megalm's CPU LayerNorm hands low-precision weight and bias over as fp32 copies
    return kept


def mlp_saved_bytes(model: ModelConfig, tokens: int, act_bytes: int, tp: int) -> int:
    """The MLP's split activations kept for backward, beyond its (shared) input: gelu: the GeLU input and
    fc2's input; swiglu: gate and up outputs, silu(gate) and the product (down's input)."""
    f = model.ffn_size()
    return (4 if model.mlp == "swiglu" else 2) * act_bytes * tokens * f // tp


def _megalm_layer_bytes(model: ModelConfig, layout: Layout, act_bytes: int, kernels: str) -> tuple[int, int, int]:
    """(kept by every layer, the attention core's own saves, what selective recompute keeps of it) of
    megalm's TransformerLayer on `kernels`, as megalm.plan.measure measures it with saved-tensor hooks.

    Under context parallelism (cp > 1) a rank holds seq_length / cp tokens of each sample: every per-token
    term is divided by cp; the attention core is `_context_parallel_core`'s."""
    s, b, h, t = layout.local_tokens(model.seq_length), layout.micro_batch_size, model.hidden_size, layout.tp
    sp = t if layout.sequence_parallel else 1
    sbh, heads = s * b * h, model.num_heads // t
    query, kv = projection_widths(model, t)  # per rank: H d / t query, 2 K_local d key + value
    cpu = kernels == "cpu"
    norms = 2 * norm_saved_bytes(model, s * b // sp, act_bytes, kernels)  # the layer's two norms
    # attention and MLP inputs (the query and key_value linears share one, so do gate and up): under
    # sequence parallel a column-parallel linear keeps only its [s/tp, b, h] input shard and all-gathers it
    # again in backward for the weight gradient (as Megatron does); with train.fp8 the column linears gather with
    # the plain conjugate and keep the whole gathered [s, b, h] input (megalm.parallel.tensor)
    linear_inputs = 2 * act_bytes * sbh // (1 if layout.fp8 != "none" else sp)
    split = act_bytes * s * b * query + mlp_saved_bytes(model, s * b, act_bytes, t)  # proj input; the MLP's
    # hidden dropout masks: torch's CUDA dropout keeps a bool mask, its CPU one the scaled mask in the activation dtype
    masks = 2 * (act_bytes if cpu else 1) * sbh // sp if model.hidden_dropout > 0 else 0
    # q, k, v as the core receives them: views of the fused QKV output (multi-head), or the query output
    # and views of the key_value output (grouped). Rotary makes q and k new tensors (keeping none of its
    # inputs: the tables need no gradient); v still keeps the whole QKV or key_value output alive, while a
    # grouped layer's rotated-away query output is freed. Selective recompute keeps exactly these (and the
    # shared mask).
    rotated = 0
    if model.position_embedding == "rotary":
        rotated = kv // 2 + (0 if model.grouped_attention() else query)
    qkv = act_bytes * s * b * (query + kv + rotated)
    if layout.cp > 1:
        return norms + linear_inputs + split + masks, _context_parallel_core(model, layout, act_bytes, kernels), qkv
    if cpu and model.attention_dropout > 0:
        # SDPA's math path (CPU, dropout): fp32 q*scale and k^T copies with v still a view of the QKV output
        # (fp32), or fp32 copies of all three (bf16/fp16); softmax output, dropout mask and dropped
        # probabilities [b, a/t, s, s] all in fp32. Grouped: k and v repeated to every query head, so fp32
        # q*scale, k and v copies all of the query width
        if model.grouped_attention():
            copies = 3 * 4 * s * b * query
        elif act_bytes == 4:
            copies = 4 * s * b * (query + kv // 2) + act_bytes * s * b * (query + kv)
        else:
            copies = 4 * s * b * (query + kv)
        core = copies + 3 * 4 * b * heads * s * s
    else:
        # fused SDPA kernels keep q, k, v, the output and the fp32 logsumexp (dropout: a few bytes of RNG
        # state). The output shares its storage with the projection's input when it comes out in q's
        # [s, b, heads, d] memory order: the CPU flash kernel and CUDA's flash and cuDNN kernels allocate it
        # in q's layout (empty_like keeps a strided tensor's dimension order), CUDA's memory-efficient
        # kernel (fp32, or any attention mask) writes [b, s, heads, d]; with b = 1 both orders coincide.
        efficient = not cpu and (act_bytes == 4 or uses_dense_prefix_mask(model, kernels))
        output = act_bytes * s * b * query if efficient and b > 1 else 0
        logsumexp = 4 * b * heads * (-(-s // 32) * 32 if efficient else s)
        core = qkv + output + logsumexp + prefix_additive_mask_bytes(model, layout, act_bytes, kernels)
    return norms + linear_inputs + split + masks, core, qkv


def _context_parallel_core(model: ModelConfig, layout: Layout, act_bytes: int, kernels: str) -> int:
    """What megalm's context-parallel attention core (megalm.parallel.context) keeps per layer at cp > 1.

    The keys and values of the whole sequence, all-gathered over the cp group into one [2, b, K/t, S, d]
    buffer that SDPA keeps for backward (cp times the local ones); q as the core receives it (a view of
    the fused QKV output, which stays alive, without rotary; the rotated q, or the query output, otherwise:
    the local k and v only feed the gather, which keeps nothing); SDPA with a dense mask over global
    positions (also for plain causal: a rank's tokens are two non-contiguous chunks), additive and shared by
    the layers (`context_mask_bytes`, per micro-batch; a per-layer copy only where CUDA pads it,
    `prefix_additive_mask_bytes`), the output where the kernel writes it apart (CUDA's memory-efficient
    kernel, b > 1) and the fp32 logsumexp of the local queries. Attention dropout (on CPU, SDPA's math path)
    is not modelled at cp > 1."""
    s, b = layout.local_tokens(model.seq_length), layout.micro_batch_size
    heads = model.num_heads // layout.tp
    query, kv = projection_widths(model, layout.tp)
    cpu = kernels == "cpu"
    local = query + (kv if not model.grouped_attention() and model.position_embedding != "rotary" else 0)
    gathered = act_bytes * b * model.seq_length * kv  # [2, b, K/t, S, d]
    output = act_bytes * s * b * query if not cpu and b > 1 else 0
    logsumexp = 4 * b * heads * (s if cpu else -(-s // 32) * 32)
    return act_bytes * s * b * local + gathered + output + logsumexp + prefix_additive_mask_bytes(
        model, layout, act_bytes, kernels)


def layer_activation_bytes(model: ModelConfig, layout: Layout, act_bytes: int, flash: bool = True,
                           kernels: str = "cuda") -> tuple[int, int]:
    """(stored per layer and micro-batch, working set of one layer being recomputed/backwarded).

    flash True: megalm's layers on `kernels` ("cuda" or "cpu"; CPU kernels keep more, see
    `_megalm_layer_bytes`); flash False: Megatron-LM's CUDA kernels with materialised attention."""
    if kernels not in KERNELS:
        raise PlanError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if flash:
        kept, core, core_inputs = _megalm_layer_bytes(model, layout, act_bytes, kernels)
    elif kernels == "cuda":
        kept, core, core_inputs = _korthikanti_layer_bytes(model, layout, act_bytes)
    else:
        raise PlanError("materialised attention (megatron numerics) describes Megatron's CUDA kernels: use kernels='cuda'")
    sp = layout.tp if layout.sequence_parallel else 1
    if layout.recompute == "full":
        tokens = layout.local_tokens(model.seq_length) * layout.micro_batch_size
        return act_bytes * tokens * model.hidden_size // sp, kept + core
    if layout.recompute == "selective":  # the rerun core materialises what it saves beyond its kept inputs
        return kept + core_inputs, core - core_inputs
    return kept + core, 0


def dense_mask_shape(model: ModelConfig, layout: Layout, kernels: str) -> Optional[tuple[int, int, int]]:
    """(batch, query rows, key columns) of the dense attention mask megalm builds once per micro-batch, or None
    where it builds none: PrefixLM's (or per-document attention's) [b, 1, s, s] under SDPA; at cp > 1 always
    one over global positions, [b, 1, s/cp, s] (causal: [1, 1, s/cp, s], every sample alike)."""
    s, b = model.seq_length, layout.micro_batch_size
    if layout.cp > 1:
        return (b if masked_attention(model) else 1), layout.local_tokens(s), s
    if not uses_dense_prefix_mask(model, kernels):
        return None
    return b, s, s


def prefix_additive_mask_bytes(model: ModelConfig, layout: Layout, act_bytes: int, kernels: str) -> int:
    """The dense mask (`dense_mask_shape`) as the fused SDPA kernels keep it, in every layer: the bool mask
    becomes an additive mask in the activation dtype (CUDA's memory-efficient kernel pads rows to 16).
    FlexAttention keeps no mask (its block mask is [b, 1, s/128, s/128] ints). At cp > 1 the layers share one
    additive mask (`context_mask_bytes`): only CUDA's padding of rows not a multiple of 16 copies it per layer."""
    shape = dense_mask_shape(model, layout, kernels)
    if shape is None:
        return 0
    b, rows, keys = shape
    if layout.cp > 1 and (kernels == "cpu" or keys % 16 == 0):
        return 0
    return act_bytes * b * rows * (keys if kernels == "cpu" else -(-keys // 16) * 16)


def context_mask_bytes(model: ModelConfig, layout: Layout, act_bytes: int, kernels: str = "cuda") -> int:
    """cp > 1: the additive mask of a rank's queries over the whole sequence ([b or 1, 1, S/cp, S] in the activation
    dtype, megalm.parallel.context.context_parallel_mask), built once per micro-batch and model chunk and shared
    by its layers, which keep it for backward (or, recomputing, hold it for the rerun). 0 at cp = 1, and 0 for
    plain causal attention on CUDA (each chunk runs under a lower-right causal bias, no mask:
    megalm.parallel.context.dense_causal_mask)."""
    if layout.cp == 1:
        return 0
    causal = model.family == "lm" and not model.document_mask
    if causal and not dense_causal_mask(kernels):
        return 0
    b, rows, keys = dense_mask_shape(model, layout, "cuda")
    return act_bytes * b * rows * keys


def prefix_mask_bytes(model: ModelConfig, layout: Layout, kernels: str = "cuda") -> int:
    """PrefixLM's (or per-document attention's) dense [b, 1, s, s] bool mask, kept once per micro-batch and model
    chunk by recompute's checkpoints (without recompute the layers keep only their additive copies,
    `_megalm_layer_bytes`)."""
    if layout.cp > 1 or not uses_dense_prefix_mask(model, kernels) or layout.recompute == "none":
        return 0  # at cp > 1 the bool mask only leads to the additive one (context_mask_bytes)
    return layout.micro_batch_size * model.seq_length ** 2


def document_bytes(model: ModelConfig, layout: Layout, first: bool) -> int:
    """What per-document attention (model.document_mask) keeps per micro-batch and model chunk besides its mask
    (counted as PrefixLM's): rotary, the cos and sin rows of each token [s, b, 1, d] fp32 in place of the
    model's shared [s, 1, 1, d] tables (under full recompute the checkpoints hold them without saving them);
    learned, on the first stage, the [s, b] int64 positions the table gather keeps."""
    if not model.document_mask:
        return 0
    s, b = layout.local_tokens(model.seq_length), layout.micro_batch_size
    if model.position_embedding == "rotary":
        return 2 * 4 * s * b * model.head_size()
    return 8 * s * b if first else 0


def context_position_bytes(model: ModelConfig, layout: Layout, first: bool) -> int:
    """cp > 1 without per-document positions (`document_bytes` counts those): rotary, the rows of this rank's
    global positions cut from the cos and sin tables ([s/cp, 1, 1, d] fp32 each) per micro-batch and chunk;
    learned, on the first stage, the [s/cp] int64 global positions the table gather keeps."""
    if layout.cp == 1 or model.document_mask:
        return 0
    s = layout.local_tokens(model.seq_length)
    if model.position_embedding == "rotary":
        return 2 * 4 * s * model.head_size()
    return 8 * s if first else 0


def stage_memory(model: ModelConfig, layout: Layout, cluster: Cluster, numerics: Numerics,
                 precision: str, pp_rank: int, kernels: str = "cuda") -> StageMemory:
    """Memory of the most loaded rank (dp rank 0) of pipeline stage `pp_rank` (activations as `kernels` keep them)."""
    act_bytes = ACTIVATION_BYTES[precision]
    numerics = numerics.for_precision(precision)
    chunks = stage_chunks(model, layout, pp_rank)
    params = rank_param_count(model, layout, pp_rank)
    buckets = bucket_sizes(model, layout, pp_rank)
    dp = layout.dp * layout.cp  # the dp x cp group reduces the gradients and shards ZeRO-1
    weights = params * numerics.param_bytes
    buffers = 0
    if numerics.name == "megalm":  # exact: GradientSync (megalm.parallel.data), MixedPrecisionOptimizer
        if layout.zero_stage == 1:  # fp32 buckets + fp32 reduce-scatter output of the shard
            grads = 4 * sum(padded(n, dp) for n in buckets) + 4 * sum(padded(n, dp) // dp for n in buckets)
            # fp32 master (bf16/fp16; an fp32 parameter is its own) + 2 moments of the shard
            optimizer = (numerics.master_bytes + 8) * zero1_shard_params(buckets, dp, 0)
            # parameters live in per-bucket buffers padded like the gradients, all-gathered in place
            buffers += numerics.param_bytes * sum(padded(n, dp) - n for n in buckets)
        else:
            grads = 4 * sum(buckets)  # fp32 main gradients
            optimizer = (numerics.master_bytes + 8) * params  # fp32 masters (bf16/fp16 only) + 2 moments
    else:
        grads = params * numerics.grad_bytes
        kept = -(-params // dp) if layout.zero_stage == 1 else params
        optimizer = kept * (numerics.master_bytes + numerics.moment_bytes)
    stored, working = layer_activation_bytes(model, layout, act_bytes, numerics.flash_attention, kernels)
    # full recompute of only the first recompute_layers layers of a chunk: the rest store everything
    stored_plain, _ = layer_activation_bytes(model, dataclasses.replace(layout, recompute="none"), act_bytes,
                                             numerics.flash_attention, kernels)
    flight = in_flight(layout, pp_rank)
    per_chunk = 0
    for layers, _, _ in chunks:
        rerun = recomputed_layers(layout, len(layers)) if layout.recompute == "full" else len(layers)
        per_chunk = max(per_chunk, rerun * stored + (len(layers) - rerun) * stored_plain)
    first_stage = any(first for _, first, _ in chunks)
    masks = (prefix_mask_bytes(model, layout, kernels) + document_bytes(model, layout, first_stage)
             + context_mask_bytes(model, layout, act_bytes, kernels) + context_position_bytes(model, layout, first_stage))
    activations = flight * (per_chunk + masks) + working
    s, b, h = layout.local_tokens(model.seq_length), layout.micro_batch_size, model.hidden_size
    sp = layout.tp if layout.sequence_parallel else 1
    embedding_logits = 0
    if any(first for _, first, _ in chunks):
        embedding_logits += flight * act_bytes * s * b * h // sp  # embedding output kept for backward
    if any(last for _, _, last in chunks):
        # one micro-batch's vocab-split logits: the output in the activation dtype and the loss's one fp32
        # working copy (which becomes the softmax and then, in place, the gradient); measured on CPU by
        # tests/parallel/test_cross_entropy_memory.py and through the CUDA allocator by tests/test_gpu.py
        embedding_logits += s * b * model.padded_vocab_size(layout.tp) // layout.tp * (act_bytes + 4)
        embedding_logits += act_bytes * s * b * h // sp  # final LayerNorm output
    if layout.pp > 1:
        # p2p send and receive; GPipe and 1F1B also the next action's receive posted early (measured at the start
        # of a backward: one message more on every 1F1B stage and every GPipe stage but the last)
        early = layout.schedule == "1f1b" or (layout.schedule == "gpipe" and pp_rank < layout.pp - 1)
        buffers += (3 if early else 2) * p2p_message_bytes(model, layout, precision)
    return StageMemory(pp_rank, sum(len(c[0]) for c in chunks), params, weights, grads, optimizer, activations,
                       embedding_logits, buffers, int(cluster.reserved_gib * GiB), flight)


# ---- time ----------------------------------------------------------------------------------------


@dataclass
class StepTime:
    """Seconds per optimizer step, by part, and the throughput they imply."""

    compute: float
    bubble: float
    pipeline_comm: float
    tensor_comm: float
    data_comm: float
    optimizer: float
    tokens_per_s: float = 0.0
    model_tflops: float = 0.0  # per GPU, model FLOPs (no recompute), metrics.training_flops_per_token
    hardware_tflops: float = 0.0  # per GPU, recompute included (Megatron-LM 2021 counts this)
    mfu: float = 0.0
    parts: dict = field(default_factory=dict)
    context_comm: float = 0.0  # cp > 1: the key/value all-gathers and their reduce-scatters, not overlapped
    launch: float = 0.0  # host time launching kernels beyond the GPU's time (small models; megalm.plan.efficiency)

    @property
    def total(self) -> float:
        return (self.compute + self.bubble + self.pipeline_comm + self.tensor_comm + self.context_comm
                + self.data_comm + self.optimizer + self.launch)

    def shares(self) -> dict[str, float]:
        """Each part's share of the step (context_comm only where cp > 1 gives it time, launch where exposed)."""
        context = ("context_comm",) if self.context_comm else ()
        launch = ("launch",) if self.launch else ()
        names = ("compute", *launch, "bubble", "pipeline_comm", "tensor_comm", *context, "data_comm", "optimizer")
        return {name: getattr(self, name) / self.total for name in names}


def layer_forward_time(model: ModelConfig, layout: Layout, cluster: Cluster, numerics: Numerics, act_bytes: int) -> tuple[float, float]:
    """(seconds of one layer's forward for one micro-batch on one GPU, of which the attention core's part).

    At cp > 1 a rank computes its seq_length / cp tokens, whose queries attend to every key: 1/cp of the
    attention (the load-balanced split gives every rank the same share). Weight GEMMs by shape
    (`layer_gemm_times`), FP8's forward quantisation passes included."""
    s, b, h, f, t = layout.local_tokens(model.seq_length), layout.micro_batch_size, model.hidden_size, model.ffn_size(), layout.tp
    a = model.num_heads
    sp = t if layout.sequence_parallel else 1
    matmul_rate = cluster.peak_tflops * 1e12 * cluster.matmul_efficiency
    memory_rate = cluster.hbm_bandwidth_gbs * 1e9 * cluster.memory_efficiency
    _, core_per_token = layer_matmul_flops(model, t)  # per rank: SwiGLU's 3 matrices, GQA's kv
    gemm = sum(layer_gemm_times(model, layout, cluster)) + fp8_layer_seconds(model, layout, cluster, act_bytes)[0]
    query, kv = projection_widths(model, t)
    dropout = model.hidden_dropout > 0
    # element-wise traffic on [s, b, h]: 2 norms (read + write), 2 bias-dropout-residual adds (read 2,
    # write 1, mask); on the split parts: Q/K/V layout copies (2 per element), the MLP's activation on
    # [s, b, f/t]: bias + GeLU (read, write) or SwiGLU's silu (read, write) and product (read 2, write 1)
    activation = 5 if model.mlp == "swiglu" else 2
    elementwise = ((10 * act_bytes + (2 if dropout else 0)) * s * b * h / sp
                   + (2 * act_bytes * (query + kv) + activation * act_bytes * f / t) * s * b)
    scores = 0.0
    if not numerics.flash_attention:
        # QK^T writes the scores, fused scale-mask-softmax reads and writes them, AV reads them; dropout adds r/w + mask
        per_element = 4 * act_bytes + ((2 * act_bytes + 1) if model.attention_dropout > 0 else 0)
        scores = per_element * a * s * model.seq_length * b / t / memory_rate
    # what selective recompute reruns: the attention core, its two matmuls (QK^T, PV) and the scores' traffic
    core = s * b * core_per_token / matmul_rate + scores
    return gemm + s * b * core_per_token / matmul_rate + elementwise / memory_rate + scores, core


def step_time(model: ModelConfig, layout: Layout, cluster: Cluster, numerics: Numerics, precision: str) -> StepTime:
    """Predicted time of one optimizer step and the throughput it implies."""
    act_bytes = ACTIVATION_BYTES[precision]
    numerics = numerics.for_precision(precision)
    s, b, h, t = layout.local_tokens(model.seq_length), layout.micro_batch_size, model.hidden_size, layout.tp
    m, pp, v, dp, cp = layout.num_microbatches, layout.pp, layout.virtual_stages, layout.dp, layout.cp
    sp = t if layout.sequence_parallel else 1
    matmul_rate = cluster.peak_tflops * 1e12 * cluster.matmul_efficiency
    forward, core = layer_forward_time(model, layout, cluster, numerics, act_bytes)
    fp8_forward, fp8_backward = fp8_layer_seconds(model, layout, cluster, act_bytes)
    layer_time = 3 * forward - 2 * fp8_forward + fp8_backward  # backward: 2x the forward's GEMMs and traffic
    recompute = {"none": 0.0, "selective": core, "full": forward}[layout.recompute]
    # tensor-parallel collectives: tp ranks are consecutive, so the group spans tp ranks
    bandwidth, latency = cluster.link(t)
    collective = all_reduce_time(act_bytes * s * b * h, t, bandwidth, latency)
    layer_comm, forward_comm = tp_layer_comm(model, layout, cluster, collective)  # per layer; a recomputed forward
    recompute_comm = forward_comm if layout.recompute == "full" else 0.0
    vocab = model.padded_vocab_size(t) // t
    counts = kernel_counts(model, precision)
    # the logits GEMMs and the loss's element-wise kernels over the [s b, V/t] logits (measured bytes per element)
    logits = (3 * gemm_seconds(cluster, s * b, h, vocab)
              + counts.loss_bytes_per_logit * s * b * vocab / (cluster.hbm_bandwidth_gbs * 1e9 * cluster.memory_efficiency))
    logits_comm = collective if t > 1 and layout.sequence_parallel else 0.0
    regather, logits_regather = 0.0, 0.0
    if t > 1 and layout.sequence_parallel:
        # backward's second all-gather of a column-parallel input shard (half an all-reduce's time) runs
        # beside the input-gradient GEMM ([s b, out/t] x [out/t, h]); the rest of it is exposed
        def exposed(local_out_features: float) -> float:
            return max(0.0, collective / 2 - 2 * s * b * h * local_out_features / matmul_rate)

        query, kv = projection_widths(model, t)  # the query and key_value (or fused QKV) linears share one gather
        column_mlp = (2 if model.mlp == "swiglu" else 1) * model.ffn_size() / t  # gate and up share one too
        regather = exposed(query + kv) + exposed(column_mlp)
        logits_regather = exposed(model.padded_vocab_size(t) / t)
    exchange = context_exchange_time(model, layout, cluster, precision)
    layer_kernels, rerun_kernels = layer_launches(model, layout, counts)  # per layer; per recomputed layer
    # the slowest pipeline rank sets the pace
    compute_per_mb, comm_per_mb, context_per_mb, launch_per_mb = 0.0, 0.0, 0.0, 0.0
    for pp_rank in range(pp):
        chunks = stage_chunks(model, layout, pp_rank)
        layers = sum(len(c[0]) for c in chunks)
        rerun = sum(recomputed_layers(layout, len(c[0])) for c in chunks) if layout.recompute == "full" else layers
        last = any(c[2] for c in chunks)
        c = layers * layer_time + rerun * recompute + (logits if last else 0.0)
        last_comm = logits_comm + logits_regather if last else 0.0
        k = layers * (layer_comm + regather) + rerun * recompute_comm + last_comm
        # cp: the all-gather of keys and values in forward, its reduce-scatter in backward, and the gather
        # again in each recomputed forward (full, or selective: the core it reruns starts with the gather)
        x = (2 * layers + (rerun if layout.recompute != "none" else 0)) * exchange
        # the host launches ahead of the GPU: only launch time beyond the micro-batch's GPU time shows
        kernels = layers * layer_kernels + rerun * rerun_kernels + (counts.head_forward + counts.head_backward
                                                                    if last else 0)
        host = exposed_launch(kernels, c + k + x, cluster)
        if c + k + x + host > compute_per_mb + comm_per_mb + context_per_mb + launch_per_mb:
            compute_per_mb, comm_per_mb, context_per_mb, launch_per_mb = c, k, x, host
    compute, tensor_comm, context_comm = m * compute_per_mb, m * comm_per_mb, m * context_per_mb
    launch = m * launch_per_mb
    busy = compute + tensor_comm + context_comm + launch
    bubble = busy * (pp - 1) / (m * v)  # = busy x bubble / (1 - bubble)
    assert abs(bubble - busy * analytic_bubble(pp, m, v) / (1 - analytic_bubble(pp, m, v))) < 1e-6 * (1 + bubble)
    pipeline_comm = 0.0
    if pp > 1:
        p2p_bandwidth, p2p_latency = cluster.link(t * cp * dp + 1)  # neighbours are tp*cp*dp ranks apart
        send = p2p_message_bytes(model, layout, precision) / p2p_bandwidth + p2p_latency
        pipeline_comm = 2 * m * v * send
    # data parallel: the stage with the most gradient bytes, reduced (and ZeRO-1 sharded) over the dp x cp group
    data_comm = 0.0
    params_max = max(rank_param_count(model, layout, r) for r in range(pp))
    reducers = dp * cp  # the dp x cp group: tp x cp x dp consecutive ranks (rank order tp, cp, dp, pp)
    if reducers > 1:
        dp_bandwidth, dp_latency = cluster.link(t * reducers)
        buckets = bucket_sizes(model, layout, pp - 1)
        zero1 = layout.zero_stage == 1

        def reduction(elements: float) -> float:  # of the gradients: ZeRO-1 reduce-scatters them
            collective = ring_half_time if zero1 else all_reduce_time
            return collective(elements * numerics.grad_bytes, reducers, dp_bandwidth, dp_latency)

        full = reduction(params_max)
        if numerics.overlap_grad_sync:
            window = compute_per_mb * 2 / 3  # the last micro-batch's backward
            data_comm = max(full - window, reduction(min(buckets)))
        else:
            data_comm = full
        if zero1:
            def gather(elements: float) -> float:  # the updated parameters, in their own dtype
                return ring_half_time(elements * numerics.param_bytes, reducers, dp_bandwidth, dp_latency)

            if numerics.overlap_param_gather:
                # launched bucket by bucket in forward order, each block's forward waits for its own: the
                # first micro-batch's forward hides all but the first bucket (the tied embedding's, or the
                # first layers')
                data_comm += max(gather(params_max) - compute_per_mb / 3, gather(buckets[-1]))
            else:
                data_comm += gather(params_max)
    if pp > 1 and model.tie_embeddings:  # tied embedding gradient summed between the first and last stage
        emb = model.padded_vocab_size(t) // t * h * numerics.grad_bytes
        bw, lat = cluster.link(t * reducers * pp)
        data_comm += all_reduce_time(emb, 2, bw, lat)
    replicas = t // model.kv_heads() if t > model.kv_heads() else 1
    if replicas > 1:
        # tp > kv heads: each kv head lives on tp / kv_heads consecutive ranks, whose key_value gradients are
        # summed once per step so the copies stay equal (a ring all-reduce within the node)
        layers = max(sum(len(c[0]) for c in stage_chunks(model, layout, r)) for r in range(pp))
        _, kv = projection_widths(model, t)
        kv_grads = layers * kv * (h + (1 if model.has_qkv_bias() else 0)) * numerics.grad_bytes
        data_comm += all_reduce_time(kv_grads, replicas, *cluster.link(replicas))
    # AdamW: read param, grad, 2 moments (+ master), write them back; memory-bound
    memory_rate = cluster.hbm_bandwidth_gbs * 1e9 * cluster.memory_efficiency
    kept = params_max / reducers if layout.zero_stage == 1 else params_max
    per_param = 2 * (numerics.param_bytes + numerics.master_bytes + numerics.moment_bytes) + numerics.grad_bytes
    optimizer = kept * per_param / memory_rate
    result = StepTime(compute, bubble, pipeline_comm, tensor_comm, data_comm, optimizer, context_comm=context_comm,
                      launch=launch)
    tokens = layout.global_batch_size * model.seq_length
    result.tokens_per_s = tokens / result.total
    gpus = layout.gpus
    model_flops = training_flops_per_token(model)
    extra = {"none": 0.0, "full": model_flops / 3 - 2 * h * model.vocab_size,
             "selective": layer_matmul_flops(model)[1] * model.num_layers}[layout.recompute]  # recomputed forward FLOPs per token
    if layout.recompute == "full":  # only recompute_layers of each chunk
        chunks = [c for r in range(pp) for c in stage_chunks(model, layout, r)]
        extra *= sum(recomputed_layers(layout, len(c[0])) for c in chunks) / model.num_layers
    result.model_tflops = model_flops * result.tokens_per_s / gpus / 1e12
    result.hardware_tflops = (model_flops + extra) * result.tokens_per_s / gpus / 1e12
    result.mfu = result.model_tflops / cluster.peak_tflops
    result.parts = {"per_layer_forward_s": forward, "attention_core_s": core, "tp_collective_s": collective,
                    "microbatches": m, "layer_kernels": layer_kernels}
    if cp > 1:
        result.parts["cp_exchange_s"] = exchange
    return result


def days_to_train(step: StepTime, tokens: float) -> float:
    return tokens / step.tokens_per_s / 86400
