"""Activation recompute (parallel.recompute): bit-for-bit the run that stores, and it stores less.

With dropout on (hidden and attention), selective and full recompute give the same losses and the
same gradients, bit for bit (torch.equal), as recompute=none on the same weights, data and seed,
through the production Trainer: at tp=pp=dp=1 in this process, and at tp=2 (sequence parallel) x
pp=2 (1F1B and interleaved) in four. Two steps each, so a recompute that left the random streams
elsewhere than the stored run does would show in the second step's masks.

Saved activations are counted with saved-tensor hooks, each storage once: full recompute keeps
each layer's input (and the mask and rotary tables it is handed) plus what the model saves outside
its layers; selective keeps no [b, heads, s, s] scores or probabilities.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megalm.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig, validate
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model.gpt import build_model_chunks
from megalm.model.layers import TransformerLayer
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

MODES = ("none", "selective", "full")
SEQ, HIDDEN, HEADS, MICRO = 16, 32, 4, 2
STEPS = 2


def make_config(family: str, recompute: str, tp: int = 1, pp: int = 1, schedule: str = "1f1b", v: int = 1,
                recompute_layers=None) -> Config:
    return Config(
        model=ModelConfig(family=family, num_layers=4, hidden_size=HIDDEN, num_heads=HEADS, vocab_size=200,
                          seq_length=SEQ, hidden_dropout=0.1, attention_dropout=0.1,
                          position_embedding="rotary" if family == "prefixlm" else "learned"),
        parallel=ParallelConfig(tp=tp, pp=pp, dp=1, sequence_parallel=tp > 1, schedule=schedule, virtual_stages=v,
                                recompute=recompute, recompute_layers=recompute_layers),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, clip_grad=0.0),  # raw gradients: no clipping
        train=TrainConfig(steps=STEPS, micro_batch_size=MICRO, global_batch_size=MICRO * 4, seed=7),
        data=DataConfig(),
    )


def train(config: Config, groups: ParallelGroups) -> dict:
    """Losses and this rank's fp32 main gradients (unclipped) of each step, through the Trainer."""
    validate(config, groups.topology.world_size)
    trainer = build_trainer(config, groups, None)
    losses, grads = [], []
    for step in range(STEPS):
        losses.append(trainer.train_step(step).loss)
        grads.append([g.clone() for g in trainer.optimizer.grads()])
    return {"losses": losses, "grads": grads}


def assert_bitwise(got: dict, want: dict, what) -> None:
    assert got["losses"] == want["losses"], what  # python floats: exact
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        assert len(g) == len(w) > 0, what
        for index, (a, b) in enumerate(zip(g, w)):
            assert torch.equal(a, b), (what, step, index, (a - b).abs().max().item())


CASES = [(family, mode) for family in ("lm", "prefixlm") for mode in MODES] + [("lm", "full-1")]


def _config(family: str, mode: str, **layout) -> Config:
    if mode == "full-1":  # only the first layer of each chunk
        return make_config(family, "full", recompute_layers=1, **layout)
    return make_config(family, mode, **layout)


@pytest.mark.parametrize("family", ["lm", "prefixlm"])
def test_recompute_is_bitwise_single_process(family: str) -> None:
    single = ParallelGroups.single()
    want = train(make_config(family, "none"), single)
    for mode in ("selective", "full", "full-1"):
        assert_bitwise(train(_config(family, mode), single), want, (family, mode))


PARALLEL_LAYOUTS = [dict(tp=2, pp=2, schedule="1f1b"), dict(tp=2, pp=2, schedule="interleaved", v=2)]


def _parallel_worker(rank: int, world_size: int) -> dict:
    groups = build_parallel_groups(Topology(tp=2, pp=2, dp=1), rank, torch.device("cpu"))
    out = {}
    for index, layout in enumerate(PARALLEL_LAYOUTS):
        for family, mode in CASES:
            if index == 1 and family == "prefixlm":
                continue  # interleaved: LM is enough to cover the schedule
            out[(index, family, mode)] = train(_config(family, mode, **layout), groups)
    return out


@functools.lru_cache(maxsize=None)
def parallel_results() -> list[dict]:
    return run_distributed(_parallel_worker, 4, timeout=300)


@pytest.mark.parametrize("layout", range(len(PARALLEL_LAYOUTS)))
def test_recompute_is_bitwise_at_tp2_sp_pp2(layout: int) -> None:
    """Every rank's losses and gradients equal recompute=none's, tp-distinct dropout stream included."""
    for rank, out in enumerate(parallel_results()):
        for (index, family, mode), got in out.items():
            if index == layout and mode != "none":
                assert_bitwise(got, out[(index, family, "none")], (PARALLEL_LAYOUTS[layout], family, mode, rank))


# ---- saved activations ---------------------------------------------------------------------------


class SavedStorages:
    """Storages autograd saves for backward (each counted once) and where they were saved."""

    def __init__(self, chunk: torch.nn.Module) -> None:
        self.saved: dict[int, tuple[int, tuple, bool]] = {}  # data pointer -> (bytes, shape, inside a layer)
        self.layer_args: dict[int, int] = {}  # storages handed to layers (input, mask) -> bytes
        self.depth = 0
        self.hooks = []
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                self.hooks.append(module.register_forward_pre_hook(self._enter))
                self.hooks.append(module.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        for arg in args:  # the hidden state and the mask (the rotary tables are the model's cache)
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                self.layer_args[storage.data_ptr()] = storage.nbytes()
        self.depth += 1

    def _leave(self, module, args, output) -> None:
        self.depth -= 1

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        entry = self.saved.get(storage.data_ptr())
        inside = self.depth > 0 or (entry is not None and entry[2])
        self.saved[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape), inside)
        return tensor

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def total(self) -> int:
        return sum(nbytes for nbytes, _, _ in self.saved.values())

    def outside_layers(self) -> int:
        """Bytes saved outside every layer, leaving out what layers were handed."""
        return sum(n for ptr, (n, _, inside) in self.saved.items() if not inside and ptr not in self.layer_args)


def saved_by_forward(family: str, mode: str, recompute_layers=None) -> SavedStorages:
    config = make_config(family, mode, recompute_layers=recompute_layers)
    (chunk,) = build_model_chunks(config, ParallelGroups.single())
    batch = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)[0]
    tracker = SavedStorages(chunk)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
        losses = chunk(batch.tokens, labels=batch.labels, prefix_lengths=batch.prefix_lengths)
    tracker.remove()
    losses.sum().backward()  # the saved graph is usable
    return tracker


def is_scores(shape: tuple) -> bool:
    """A [b, local heads, s, s] attention scores / probabilities / dropout mask tensor."""
    return shape == (MICRO, HEADS, SEQ, SEQ)


@pytest.mark.parametrize("family", ["lm", "prefixlm"])
def test_recompute_saves_less(family: str) -> None:
    none = saved_by_forward(family, "none")
    selective = saved_by_forward(family, "selective")
    full = saved_by_forward(family, "full")
    partial = saved_by_forward(family, "full", recompute_layers=2)
    # Without recompute, CPU attention with dropout keeps [b, heads, s, s] tensors (the math path).
    scores = sum(n for n, shape, _ in none.saved.values() if is_scores(shape))
    assert scores > 0
    # selective: none of them; everything else the layers save is still saved
    assert not [shape for _, shape, _ in selective.saved.values() if is_scores(shape)]
    assert none.total() - selective.total() >= scores
    # full: only each layer's input (with the mask and rotary tables it is handed), plus what the model
    # saves outside its layers, as without recompute
    assert not any(inside for _, _, inside in full.saved.values())
    assert set(full.layer_args) <= set(full.saved)
    layer_inputs = sum(full.layer_args.values())
    assert full.total() == none.outside_layers() + layer_inputs, (full.total(), none.outside_layers(), layer_inputs)
    assert full.total() < selective.total() < none.total()
    # the first 2 of 4 layers recomputed: between the two
    assert full.total() < partial.total() < none.total()
