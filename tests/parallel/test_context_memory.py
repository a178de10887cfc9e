"""Context parallelism halves the activations each rank keeps for backward (issue 24, point 6), measured.

One training forward of a 2-layer GQA model over a 2048-token sequence, bytes saved for backward counted with
saved-tensor hooks (megalm.plan.measure.SavedBytes: each storage once, parameters left out), at cp=1 on one
process and at cp=2 on each of two ranks. Everything that scales with the rank's tokens halves; what cp adds
on top is known exactly: the additive mask of the rank's queries over the whole sequence ([1, 1, S/2, S] in
the activations' dtype, once per micro-batch, shared by the layers) and, per layer, the gathered keys and
values of the whole sequence where cp=1 kept its own (the same bytes: cp=2 keeps S/2 tokens' worth more).
"""

from __future__ import annotations

import torch

from megalm.config import ModelConfig
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model.gpt import build_model
from megalm.parallel.context import cp_split
from megalm.plan.measure import SavedBytes
from megalm.testing import run_distributed
from megalm.topology import Topology

SEQ, HIDDEN, HEADS, KV_HEADS, LAYERS = 2048, 512, 4, 2, 2


def _config() -> ModelConfig:
    return ModelConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS, vocab_size=256,
                       seq_length=SEQ, position_embedding="rotary", hidden_dropout=0.0, attention_dropout=0.0)


def saved_bytes(groups: ParallelGroups) -> int:
    """Bytes one training forward (loss included) saves for backward on this rank."""
    model = build_model(_config(), groups, 3)
    model.train()
    generator = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, 256, (1, SEQ), generator=generator) for _ in range(2))
    tokens, labels = (cp_split(t, groups.cp_size, groups.cp_rank, 1) for t in (tokens, labels))
    with SavedBytes(model) as saved:
        losses = model(tokens, labels=labels)
    losses.sum().backward()  # the graph is a usable one
    return saved.total


def _worker(rank: int, world_size: int) -> int:
    return saved_bytes(build_parallel_groups(Topology(cp=world_size), rank, torch.device("cpu")))


def test_activation_bytes_per_rank_at_cp2_are_half_of_cp1_plus_the_exchange() -> None:
    one = saved_bytes(ParallelGroups.single())
    two = run_distributed(_worker, 2, timeout=300)
    assert two[0] == two[1]  # the load-balanced split: both ranks keep the same bytes
    mask = (SEQ // 2) * SEQ * 4  # fp32 additive mask of 1024 queries over 2048 keys, once
    head_dim = HIDDEN // HEADS
    gathered_extra = LAYERS * 2 * KV_HEADS * head_dim * (SEQ // 2) * 4  # per layer: K and V of the other rank's tokens
    expected = one / 2 + mask + gathered_extra
    print(f"saved for backward per rank: cp1 {one / 2**20:.2f} MiB, cp2 {two[0] / 2**20:.2f} MiB "
          f"(ratio {two[0] / one:.3f}); cp1/2 + mask {mask / 2**20:.2f} MiB + gathered K/V "
          f"{gathered_extra / 2**20:.2f} MiB = {expected / 2**20:.2f} MiB; without them: "
          f"{(two[0] - mask - gathered_extra) / one:.3f} of cp1")
    assert abs(two[0] - expected) <= 0.05 * expected, (one, two[0], expected)
    assert two[0] - mask - gathered_extra <= 0.52 * one
