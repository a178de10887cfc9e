"""Per-document attention (model.document_mask) against each document run as a sequence of its own.

A packed sample of several documents (each eos ends one) must give every token the loss, and every
parameter the gradient, that the documents give when each runs alone from position 0: fp32, within 1e-5,
with learned and rotary positions, the dense SDPA mask and FlexAttention (eagerly on CPU, its device
check lifted as in tests/model/test_flex.py), for boundaries on and off the 128-token tile edges, a
one-token document, a document longer than two tiles and a sample without eos. The plain causal model
(no document mask) fails the same comparison. Through the Trainer, tp=2 with sequence parallel and pp=2
equal the single process.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from megalm.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.data.batch import document_ids
from megalm.data.dataset import Sample
from megalm.data.pipeline import document_eos_id
from megalm.data.sampler import BatchSampler
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model.attention import (
    describe_attention, document_attention_mask, document_block_mask, document_mask_mod, document_positions,
    uses_dense_prefix_mask,
)
from megalm.model import gpt
from megalm.model.gpt import build_model
from megalm.testing import full_weights, run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer
from tests.model.test_flex import lift_cpu_flex_check
from tests.parallel.test_llama_parity import _rel

EOS, VOCAB, SEQ, TOLERANCE = 1, 64, 384, 1e-5
# Eos positions of each sample's inputs (3 tiles of 128): 127 ends a document on a tile edge and 128 is a
# one-token document (an eos alone) starting on one; 200 is off the edges, 255 ends tile 1, 383 ends the
# sample; a 343-token document (longer than two tiles) after 40; no eos at all.
LAYOUTS = ([127, 128, 200, 255, 383], [40], [])


def packed_batch(seq: int = SEQ, layouts=LAYOUTS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) [len(layouts), seq]: ids other than eos, with eos at the layouts' positions."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(EOS + 1, VOCAB, (len(layouts), seq + 1), generator=generator)
    for row, ends in enumerate(layouts):
        tokens[row, ends] = EOS
    return tokens[:, :-1], tokens[:, 1:]


def model_config(positions: str, document_mask: bool = True, kernel: str = "auto", seq: int = SEQ) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=VOCAB, seq_length=seq,
                       position_embedding=positions, document_mask=document_mask, prefix_attention=kernel)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def packed_run(cfg: ModelConfig, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Per-token losses [b, s] of the packed batch, and the gradients of their sum."""
    model = build_model(cfg, ParallelGroups.single(), seed=5)
    losses = model(inputs, labels=labels, document_ids=document_ids(inputs, EOS) if cfg.document_mask else None)
    losses.sum().backward()
    return losses.detach(), gradients(model)


def reference_run(cfg: ModelConfig, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The same, each document alone (positions from 0, plain causal): the losses put back in place."""
    model = build_model(cfg, ParallelGroups.single(), seed=5)
    documents = document_ids(inputs, EOS)
    losses = torch.zeros(inputs.shape)
    for row in range(inputs.shape[0]):
        for doc in documents[row].unique().tolist():
            where = (documents[row] == doc).nonzero().flatten()
            start, stop = int(where[0]), int(where[-1]) + 1
            got = model(inputs[row : row + 1, start:stop], labels=labels[row : row + 1, start:stop])  # [1, len]
            got.sum().backward()
            losses[row, start:stop] = got.detach()[0]
    return losses, gradients(model)


def worst(got: tuple[torch.Tensor, dict], want: tuple[torch.Tensor, dict]) -> float:
    """The largest relative difference: of the losses (by their largest), and of each gradient (by its norm)."""
    gaps = [((got[0] - want[0]).abs().max() / want[0].abs().max()).item()]
    assert got[1].keys() == want[1].keys()
    gaps += [_rel(got[1][name], want[1][name]) for name in want[1]]
    return max(gaps)


@functools.lru_cache(maxsize=None)
def reference(positions: str) -> tuple[torch.Tensor, dict]:
    return reference_run(model_config(positions), *packed_batch())


# ---- the ids, positions and masks ------------------------------------------------------------------------


def test_document_ids_and_positions() -> None:
    """The eos belongs to the document it ends; the next token is position 0 of the next document."""
    inputs = torch.tensor([[5, 6, EOS, EOS, 7, 8, 9, EOS], [5, 6, 7, 8, 9, 10, 11, 12]])
    assert document_ids(inputs, EOS).tolist() == [[0, 0, 0, 1, 2, 2, 2, 2], [0] * 8]
    assert document_positions(document_ids(inputs, EOS)).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3], list(range(8))]


@pytest.mark.parametrize("seq,block", [(384, 128), (256, 64), (512, 128)])
def test_block_mask_equals_torchs_create_block_mask(seq: int, block: int) -> None:
    """The arithmetic BlockMask's partial and full tiles are create_block_mask's for the same mask_mod, and
    its mask is the dense one: layouts with boundaries on and off the tile edges, and random ones."""
    layouts = [[e for e in ends if e < seq] for ends in LAYOUTS]
    rng = np.random.default_rng(seq + block)
    layouts += [sorted(rng.choice(seq, size=k, replace=False).tolist()) for k in (1, 3, 9, 30)]
    layouts += [[block - 1, block, 2 * block - 1], list(range(block - 2, block + 3))]
    inputs, _ = packed_batch(seq, layouts)
    documents = document_ids(inputs, EOS)
    ours = document_block_mask(documents, block)
    torchs = create_block_mask(document_mask_mod(documents), len(layouts), None, seq, seq, device="cpu",
                               BLOCK_SIZE=block)
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(torchs, name)), name
    assert torch.equal(ours.to_dense(), torchs.to_dense())  # partial and full tiles together
    full = lambda m: BlockView(m.full_kv_num_blocks, m.full_kv_indices)  # noqa: E731
    partial = lambda m: BlockView(m.kv_num_blocks, m.kv_indices)  # noqa: E731
    assert full(ours) == full(torchs) and partial(ours) == partial(torchs)
    positions = torch.arange(seq)
    dense = document_attention_mask(documents)[:, 0]  # [b, s, s]
    want = (positions.view(-1, 1) >= positions.view(1, -1)) & (documents.unsqueeze(2) == documents.unsqueeze(1))
    assert torch.equal(dense, want)


class BlockView:
    """The set of (sample, query tile, key tile) a BlockMask lists, whatever order its indices take."""

    def __init__(self, counts: torch.Tensor, indices: torch.Tensor) -> None:
        self.tiles = {(b, m, int(n)) for b in range(counts.shape[0]) for m in range(counts.shape[2])
                      for n in indices[b, 0, m, : counts[b, 0, m]]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockView) and self.tiles == other.tiles


def test_config_errors_and_kernel_choice() -> None:
    with pytest.raises(ConfigError, match="model.document_mask applies to model.family=lm only"):
        ModelConfig(family="prefixlm", document_mask=True)
    cfg = ModelConfig(document_mask=True, prefix_attention="flex")  # the kernel choice applies to documents too
    assert describe_attention(cfg, "cpu").startswith("attention: LM with per-document masks, FlexAttention (eager")
    assert describe_attention(ModelConfig(document_mask=True), "cpu").startswith(
        "attention: LM with per-document masks, SDPA with a dense [b, 1, s, s] mask")
    assert uses_dense_prefix_mask(ModelConfig(document_mask=True), "cpu")
    assert not uses_dense_prefix_mask(ModelConfig(document_mask=True), "cuda")
    assert not uses_dense_prefix_mask(ModelConfig(), "cpu")


def test_the_sampler_gives_each_micro_batch_its_document_ids() -> None:
    """build_sampler splits at the eos id (synthetic data: megalm's fixed id 1, which the chain emits)
    under model.document_mask, and gives no ids without it; Batch.to moves them."""
    from megalm.data.pipeline import build_sampler, build_sources

    config = Config(model=ModelConfig(vocab_size=16, seq_length=128, document_mask=True),
                    train=TrainConfig(micro_batch_size=2, global_batch_size=4))
    assert document_eos_id(config) == EOS and document_eos_id(Config()) is None
    batches = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)
    assert all(torch.equal(b.to(torch.device("cpu")).document_ids, document_ids(b.tokens, EOS)) for b in batches)
    assert any(int(b.document_ids.max()) > 0 for b in batches)  # the samples hold several documents
    config.model.document_mask = False
    assert build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)[0].document_ids is None


# ---- exactness against each document alone ---------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_dense_mask_equals_each_document_alone(positions: str) -> None:
    got = packed_run(model_config(positions, kernel="dense"), *packed_batch())
    assert worst(got, reference(positions)) <= TOLERANCE, worst(got, reference(positions))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_flex_equals_each_document_alone(positions: str, monkeypatch) -> None:
    import torch.nn.attention.flex_attention as torch_flex

    monkeypatch.setattr(torch_flex, "_validate_device", lambda *args, **kwargs: None)
    got = packed_run(model_config(positions, kernel="flex"), *packed_batch())
    assert worst(got, reference(positions)) <= TOLERANCE, worst(got, reference(positions))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_negative_control_the_causal_mask_fails(positions: str, monkeypatch) -> None:
    """Without the document mask, or (learned positions) with it but positions running on across documents,
    the packed run is far from each document alone: the comparison above can fail. Rotary attention inside a
    document depends only on the distance between tokens, so there positions running on change nothing."""
    plain = packed_run(model_config(positions, document_mask=False), *packed_batch())
    assert worst(plain, reference(positions)) > 1e-2
    if positions == "rotary":
        return
    monkeypatch.setattr(gpt, "document_positions", lambda ids: torch.arange(ids.shape[1]).expand_as(ids))
    running_on = packed_run(model_config(positions), *packed_batch())
    assert worst(running_on, reference(positions)) > 1e-2


# ---- through the Trainer at tp=2 + sequence parallel and pp=2 -----------------------------------------------

TRAIN_SEQ, MICRO, STEPS = 256, 2, 2


class PackedSamples:
    """Samples of TRAIN_SEQ + 1 ids with eos at a few positions that depend on the sample id (on and off
    the tile edges, a one-token document, long documents, none at all)."""

    def sample(self, sample_id: int) -> Sample:
        rng = np.random.default_rng([9, sample_id])
        tokens = rng.integers(EOS + 1, VOCAB, TRAIN_SEQ + 1)
        ends = [[127, 128, 200], [40], [], [3, 130, 131, 255]][sample_id % 4]
        tokens[ends] = EOS
        return Sample(tokens.astype(np.int64))


def train_config(positions: str, tp=1, pp=1, sp=False, recompute="none", kernel="auto", document_mask=True) -> Config:
    model = model_config(positions, document_mask, kernel, TRAIN_SEQ)
    model.num_layers, model.hidden_size, model.num_kv_heads = 4, 64, 2
    return Config(
        model=model,
        parallel=ParallelConfig(tp=tp, pp=pp, dp=1, sequence_parallel=sp, recompute=recompute),
        optim=OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1, eps=1e-5),
        train=TrainConfig(steps=STEPS, micro_batch_size=MICRO, global_batch_size=MICRO * 2, seed=5),
        data=DataConfig(),
    )


def _rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The rows token ids reach (the vocabulary's padding depends on tp)."""
    return tensor[:VOCAB] if name in ("embedding.word.weight", "output.weight") else tensor



def train(config: Config, groups: ParallelGroups) -> dict:
    trainer = build_trainer(config, groups, None)
    trainer.data = BatchSampler(PackedSamples(), config.train.global_batch_size, MICRO, groups.dp_rank,
                                groups.dp_size, prefixlm=False, eos_id=document_eos_id(config))
    losses = [trainer.train_step(step).loss for step in range(STEPS)]
    return {"losses": losses, "weights": full_weights(trainer)}


TRAIN_CASES = [  # (positions, tp, pp, sequence parallel, recompute, kernel)
    ("learned", 2, 1, True, "none", "dense"), ("rotary", 2, 1, True, "selective", "dense"),
    ("rotary", 2, 1, True, "none", "flex"), ("learned", 1, 2, False, "full", "dense"),
    ("rotary", 1, 2, False, "none", "dense"),
]


def _train_worker(rank: int, world_size: int) -> dict:
    lift_cpu_flex_check()
    out = {}
    for case in TRAIN_CASES:
        positions, tp, pp, sp, recompute, kernel = case
        groups = build_parallel_groups(Topology(tp=tp, pp=pp, dp=1), rank, torch.device("cpu"))
        out[case] = train(train_config(positions, tp, pp, sp, recompute, kernel), groups)
    return out


@functools.lru_cache(maxsize=None)
def train_reference(positions: str, document_mask: bool = True) -> dict:
    return train(train_config(positions, document_mask=document_mask), ParallelGroups.single())


def test_trainer_at_tp2_sp_and_pp2_equals_one_process() -> None:
    """Losses and the full weights after two steps equal the single process's (fp32, summation order only);
    the single process without the document mask is far from it (negative control)."""
    results = run_distributed(_train_worker, 2, timeout=400)
    for case in TRAIN_CASES:
        ref = train_reference(case[0])
        merged: dict[str, torch.Tensor] = {}
        for per_rank in results:
            merged.update(per_rank[case]["weights"])
            assert per_rank[case]["losses"] == pytest.approx(ref["losses"], rel=TOLERANCE), case
        merged.pop("output_weight", None)  # the last stage's copy of the tied embedding
        assert merged.keys() == ref["weights"].keys(), case
        gap = max(_rel(_rows(name, w), _rows(name, ref["weights"][name])) for name, w in merged.items())
        assert gap <= TOLERANCE, (case, gap)
        print(f"document mask {case}: worst weight rel {gap:.1e}")
    for positions in ("learned", "rotary"):
        plain, ref = train_reference(positions, document_mask=False), train_reference(positions)
        gap = max(_rel(w, ref["weights"][name]) for name, w in plain["weights"].items())
        print(f"negative control {positions}: losses {plain['losses']} vs {ref['losses']}, worst weight rel {gap:.1e}")
        assert gap > 1e-3


# ---- the planner -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_the_planner_counts_what_the_document_mask_keeps(positions: str, recompute: str) -> None:
    """Measured with saved-tensor hooks (megalm.plan.measure, on CPU: the dense mask): a layer keeps what
    layer_activation_bytes says (PrefixLM's dense-mask terms), and the model outside its layers keeps, beyond
    the causal LM's, prefix_mask_bytes + document_bytes. Rotary: the causal LM's layers save the model's
    cached tables (which persist anyway, so the planner counts none), and under full recompute the checkpoints
    hold the per-token rows without saving them: the hooks see neither."""
    from megalm.plan.measure import Case, saved_by_forward
    from megalm.plan.model import document_bytes, layer_activation_bytes, prefix_mask_bytes

    groups = ParallelGroups.single()
    case = Case("lm", recompute=recompute, position_embedding=positions, document_mask=True, seq_length=64,
                hidden_size=128, num_heads=4, micro_batch_size=2)
    plain = dataclasses.replace(case, document_mask=False)
    one, two = saved_by_forward(case, 1, groups), saved_by_forward(case, 2, groups)
    assert two - one == layer_activation_bytes(case.model(), case.layout(), 4, kernels="cpu")[0]
    extra = (2 * one - two) - (2 * saved_by_forward(plain, 1, groups) - saved_by_forward(plain, 2, groups))
    mask = prefix_mask_bytes(case.model(), case.layout(), "cpu")
    tables = document_bytes(case.model(), case.layout(), first=True)
    assert tables > 0 and (mask > 0) == (recompute != "none")
    if positions == "rotary":  # the hooks see the causal LM's layers save the model's cached [s, 1, 1, d] tables
        tables = 0 if recompute == "full" else tables - 2 * 4 * case.seq_length * case.model().head_size()
    assert extra == mask + tables
