"""Communication the planner counts: the bytes of a pipeline message, and the seconds of a ring all-reduce, a
reduce-scatter / all-gather and context parallelism's key/value exchange (megalm.plan.model uses them for its
pipeline, tensor-, data- and context-parallel terms)."""

from __future__ import annotations

from megalm.config import ModelConfig
from megalm.plan.cluster import Cluster
from megalm.plan.layout import ACTIVATION_BYTES, Layout, projection_widths


def all_reduce_time(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: 2 (n-1)/n of the bytes over each link, 2 (n-1) latency steps."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency


def ring_half_time(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring reduce-scatter or all-gather of `nbytes` (the full buffer): half a ring all-reduce."""
    return all_reduce_time(nbytes, ranks, bandwidth, latency) / 2


def context_exchange_time(model: ModelConfig, layout: Layout, cluster: Cluster, precision: str) -> float:
    """Seconds of one layer's key/value all-gather over the cp group for one micro-batch (its backward
    reduce-scatter costs the same): each rank receives the other (cp - 1) / cp of the [2, b, K/t, S, d]
    keys and values, over NVLink when the group's tp x cp consecutive ranks fit in a node, else the
    network. megalm does not overlap it with compute (megalm.parallel.context: one gather, then SDPA)."""
    if layout.cp == 1:
        return 0.0
    _, kv = projection_widths(model, layout.tp)  # 2 K_local d per token
    gathered = ACTIVATION_BYTES[precision] * model.seq_length * layout.micro_batch_size * kv
    return ring_half_time(gathered, layout.cp, *cluster.link(layout.tp * layout.cp))


def p2p_message_bytes(model: ModelConfig, layout: Layout, precision: str) -> int:
    """Bytes of one pipeline message (an activation or its gradient: [s/cp, b, h] in the activation dtype,
    [s/cp/tp, b, h] per tp rank under sequence parallel), as megalm.parallel.pipeline sends it."""
    sp = layout.tp if layout.sequence_parallel else 1
    tokens = layout.local_tokens(model.seq_length) * layout.micro_batch_size
    return ACTIVATION_BYTES[precision] * tokens * model.hidden_size // sp
