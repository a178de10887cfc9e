"""Context parallelism through the trainer's production path against one process (issue 24's parity table).

Every case trains a small GQA model for STEPS steps with the Trainer (its data split at cp, pipeline schedule,
gradient sync over dp x cp, ZeRO-1, recompute) and compares with a single process on the same weights and
samples: the loss of every step, every parameter's full gradient after the first step (reduced over dp x cp,
gathered over tp) and the full weights after the last step. Dropout is 0 (dropout masks are keyed by cp rank:
tests/parallel/test_context.py checks they differ). Masks:

- causal LM, learned and rotary positions;
- PrefixLM whose samples' prefixes are 0, inside the first chunk, spanning chunks and ranks, and the whole
  sequence (no loss token on most cp ranks: no NaN);
- per-document attention (learned and rotary) with boundaries on and off chunk edges, a one-token document and
  documents longer than two chunks;

each at cp=2 and cp=4, alone and with tp=2 + sequence parallel, pp=2 and dp=2, and ZeRO-1 over dp x cp. dp4/cp1, dp2/cp2 and
dp1/cp4 give the same gradient norm. Negative control: the plain causal mask forced under PrefixLM or document
masks at cp=2 fails the comparison. CUDA's causal path (no mask, a lower-right causal bias per chunk) runs too.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from megalm.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.data.dataset import Sample
from megalm.data.pipeline import document_eos_id
from megalm.data.sampler import BatchSampler
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.testing import full_tensor, full_weights, run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

SEQ, VOCAB, MICRO, STEPS, EOS = 32, 64, 2, 2, 1
TOLERANCE = 2e-5  # fp32: summation order only
MASKS = {  # name -> (family, position embedding, document mask)
    "causal-learned": ("lm", "learned", False),
    "causal-rotary": ("lm", "rotary", False),
    "prefix-rotary": ("prefixlm", "rotary", False),
    "document-learned": ("lm", "learned", True),
    "document-rotary": ("lm", "rotary", True),
}
# Per sample (id % 4). Prefix lengths: none, inside the first chunk, across chunks and ranks, the whole sequence.
PREFIXES = [0, 3, 13, SEQ + 1]
# eos positions: on a chunk edge (7: the last token of chunk 0 at cp 2 and 4) and off one (10), a one-token
# document (21), documents longer than two chunks (11-20, 22-31 at cp 4's chunks of 4), and no eos at all.
EOS_AT = [[7, 10, 20, 21], [15], [], [3, 4, 16, 30]]


class Samples:
    """Deterministic samples of SEQ + 1 ids: eos where EOS_AT says (document masks), the prefix PREFIXES says."""

    def __init__(self, prefixlm: bool) -> None:
        self.prefixlm = prefixlm

    def sample(self, sample_id: int) -> Sample:
        rng = np.random.default_rng([17, sample_id])
        tokens = rng.integers(EOS + 1, VOCAB, SEQ + 1)
        tokens[EOS_AT[sample_id % 4]] = EOS
        return Sample(tokens.astype(np.int64), prefix_length=PREFIXES[sample_id % 4] if self.prefixlm else None)


def train_config(mask: str, cp=1, tp=1, pp=1, dp=1, zero=0, recompute="none") -> Config:
    family, positions, documents = MASKS[mask]
    model = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=VOCAB, seq_length=SEQ,
                        family=family, position_embedding=positions, document_mask=documents, hidden_dropout=0.0,
                        attention_dropout=0.0)
    return Config(
        model=model,
        parallel=ParallelConfig(tp=tp, pp=pp, dp=dp, cp=cp, sequence_parallel=tp > 1, zero_stage=zero,
                                recompute=recompute, bucket_size_mb=0.01),
        optim=OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1, eps=1e-5, clip_grad=0.0),
        train=TrainConfig(steps=STEPS, micro_batch_size=MICRO, global_batch_size=MICRO * 4, seed=5),
        data=DataConfig(),
    )


def train(config: Config, groups: ParallelGroups) -> dict:
    """Losses and grad norms of every step, full gradients after the first step (without ZeRO-1), full weights."""
    trainer = build_trainer(config, groups, None)
    trainer.data = BatchSampler(Samples(config.model.family == "prefixlm"), config.train.global_batch_size, MICRO,
                                groups.dp_rank, groups.dp_size, prefixlm=config.model.family == "prefixlm",
                                eos_id=document_eos_id(config))
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        result = trainer.train_step(step)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if step == 0 and config.parallel.zero_stage == 0:  # fp32 weights: .grad is the reduced main gradient
            grads = {name: full_tensor(p.grad, p, groups).clone()
                     for chunk in trainer.chunks for name, p in chunk.named_parameters()}
    return {"losses": losses, "norms": norms, "grads": grads, "weights": full_weights(trainer)}


# (mask, cp, tp, pp, dp, zero, recompute) by world size
def _layouts(cp: int) -> list[tuple]:
    return [(cp, 2, 1, 1, 0, "none"), (cp, 1, 2, 1, 0, "selective"), (cp, 1, 1, 2, 0, "none")]


CASES: dict[int, list[tuple]] = {2: [], 4: [], 8: []}
for _mask in MASKS:
    CASES[2].append((_mask, 2, 1, 1, 1, 0, "none"))
    CASES[4].append((_mask, 4, 1, 1, 1, 0, "full" if _mask == "causal-rotary" else "none"))
    for _layout in _layouts(2):
        CASES[4].append((_mask, *_layout))
    for _layout in _layouts(4):
        CASES[8].append((_mask, *_layout))
# ZeRO-1 shards over dp x cp (its gradients are shards: the weights after the steps are compared)
CASES[4].append(("document-rotary", 2, 1, 1, 2, 1, "none"))
CASES[8].append(("prefix-rotary", 4, 1, 1, 2, 1, "none"))
# one gradient norm at dp4/cp1, dp2/cp2 and dp1/cp4 (the last two are cases above)
GRAD_NORM_CASES = [("causal-rotary", 1, 1, 1, 4, 0, "none"), ("causal-rotary", 2, 1, 1, 2, 0, "none"),
                   ("causal-rotary", 4, 1, 1, 1, 0, "full")]
CASES[4].append(GRAD_NORM_CASES[0])
NEGATIVE = [("prefix-rotary", 2, 1, 1, 1, 0, "none"), ("document-learned", 2, 1, 1, 1, 0, "none")]


def _force_causal() -> None:
    """The negative control: every cp mask built as plain causal, whatever the model asks."""
    from megalm.model import gpt
    from megalm.parallel import context

    def causal(seq_length, group, cp_rank, kind="causal", prefix_lengths=None, document_ids=None, *args, **kwargs):
        return context.context_parallel_mask(seq_length, group, cp_rank, "causal", None, None, *args, **kwargs)

    gpt.context_parallel_mask = causal


# CUDA's causal path (each chunk under a lower-right causal bias, no mask), run on CPU through the trainer
LOWER_RIGHT = [("causal-rotary", 2, 1, 1, 1, 0, "none"), ("causal-learned", 2, 1, 1, 1, 0, "selective")]


def _worker(rank: int, world_size: int, mode: str = "cases") -> dict:
    out = {}
    if mode == "negative":
        _force_causal()
    if mode == "lower_right":
        from megalm.model import gpt

        gpt.dense_causal_mask = lambda device_type: False
    cases = {"negative": NEGATIVE, "lower_right": LOWER_RIGHT}.get(mode, CASES[world_size])
    for case in cases:
        mask, cp, tp, pp, dp, zero, recompute = case
        groups = build_parallel_groups(Topology(tp=tp, pp=pp, dp=dp, cp=cp), rank, torch.device("cpu"))
        out[case] = train(train_config(mask, cp, tp, pp, dp, zero, recompute), groups)
    return out


@functools.lru_cache(maxsize=None)
def reference(mask: str) -> dict:
    return train(train_config(mask), ParallelGroups.single())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The rows token ids reach (the vocabulary's padding depends on tp)."""
    return tensor[:VOCAB] if name in ("embedding.word.weight", "output.weight") else tensor


def _compare(case: tuple, results: list[dict]) -> tuple[float, float, float]:
    """(worst loss rel, worst gradient rel, worst weight rel) of a case against one process."""
    ref = reference(case[0])
    weights: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    loss_gap = 0.0
    for per_rank in results:
        got = per_rank[case]
        weights.update(got["weights"])
        grads.update(got["grads"])
        loss_gap = max(loss_gap, max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"])))
        assert all(np.isfinite(got["losses"])), (case, got["losses"])
    for merged in (weights, grads):
        merged.pop("output_weight", None)  # the last stage's copy of the tied embedding
    assert weights.keys() == ref["weights"].keys(), case
    weight_gap = max(_rel(_rows(n, w), _rows(n, ref["weights"][n])) for n, w in weights.items())
    grad_gap = 0.0
    if grads:
        assert grads.keys() == ref["grads"].keys(), case
        grad_gap = max(_rel(_rows(n, g), _rows(n, ref["grads"][n])) for n, g in grads.items())
    return loss_gap, grad_gap, weight_gap


def _table(cases: list[tuple], results: list[dict], label: str = "") -> None:
    for case in cases:
        loss_gap, grad_gap, weight_gap = _compare(case, results)
        mask, cp, tp, pp, dp, zero, recompute = case
        print(f"parity | {mask}{label} | cp{cp} tp{tp}{'+sp' if tp > 1 else ''} pp{pp} dp{dp}{' zero1' if zero else ''}"
              f"{' ' + recompute if recompute != 'none' else ''} | loss {loss_gap:.1e} | grads "
              f"{grad_gap:.1e}{' (zero1: weights)' if zero else ''} | weights {weight_gap:.1e}")
        assert loss_gap <= TOLERANCE, (case, loss_gap)
        assert grad_gap <= TOLERANCE, (case, grad_gap)
        assert weight_gap <= TOLERANCE, (case, weight_gap)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_context_parallel_training_matches_one_process(world_size: int) -> None:
    results = run_distributed(_worker, world_size, timeout=900)
    _table(CASES[world_size], results)
    if world_size == 4:  # dp4/cp1, dp2/cp2 and dp1/cp4: one gradient norm (and the single process's)
        ref = reference("causal-rotary")["norms"]
        for case in GRAD_NORM_CASES:
            got = results[0][case]["norms"]
            print(f"grad norm cp{case[1]} dp{case[4]}: {got} (one process {ref})")
            assert got == pytest.approx(ref, rel=TOLERANCE), case


def test_negative_control_plain_causal_mask_fails() -> None:
    """Forcing the causal mask under PrefixLM or document masks at cp=2 moves the gradients and weights far off
    (the first steps' losses of a fresh model hardly depend on the mask: they stay near log(vocab))."""
    results = run_distributed(_worker, 2, "negative", timeout=300)
    for case in NEGATIVE:
        loss_gap, grad_gap, weight_gap = _compare(case, results)
        print(f"negative control {case[0]} cp2 causal forced: loss {loss_gap:.1e} grads {grad_gap:.1e}")
        assert grad_gap > 1e-2 and weight_gap > 1e-3, (case, grad_gap, weight_gap)


def test_cudas_lower_right_causal_path_matches_one_process() -> None:
    """The causal path CUDA takes at cp > 1 (no mask: each of a rank's chunks attends to the keys up to its end
    under a lower-right causal bias), forced on CPU, through the trainer."""
    results = run_distributed(_worker, 2, "lower_right", timeout=300)
    _table(LOWER_RIGHT, results, " (lower-right, no mask)")
