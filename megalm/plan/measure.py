"""Activation memory measured: the bytes one transformer layer saves for backward, against the planner.

A layer's bytes are measured as the difference between the bytes a forward of a 2-layer and of a 1-layer
model saves for backward (saved-tensor hooks, each storage counted once): what the embedding, the
final norm, the logits and the loss save cancels, and so does what every layer shares (the PrefixLM
mask, the rotary tables), which the planner counts once per micro-batch (`prefix_mask_bytes`).
Tensor-parallel cases (tp = 2, with and without sequence parallel) and context-parallel ones (cp = 2: each
rank forwards its two chunks of every sample) run on 2 gloo ranks; rank 0's bytes are reported (every tp
rank holds the same, and so does every cp rank: the load-balanced split).

The planner is asked with the kernels of the device measured (`layer_activation_bytes(...,
kernels=...)`): CPU kernels (the math attention path under dropout, dropout masks in the activation
dtype) differ from CUDA's (fused attention, 1-byte masks), and a GPU plan still describes CUDA.

    python -m megalm.plan.measure [--quick] [--markdown] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megalm.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megalm.data.batch import document_ids
from megalm.data.tokenizer import EOS_ID
from megalm.distributed import ParallelGroups
from megalm.plan.layout import ACTIVATION_BYTES, Layout
from megalm.plan.model import layer_activation_bytes

TOLERANCE = 0.05  # docs/plan.md, tests/test_plan_measure.py: every case within 5%


@dataclass(frozen=True)
class Case:
    """One measured configuration of a transformer layer."""

    family: str = "lm"
    precision: str = "fp32"
    recompute: str = "none"
    tp: int = 1
    sequence_parallel: bool = False
    dropout: float = 0.0
    seq_length: int = 64
    hidden_size: int = 128
    num_heads: int = 4
    micro_batch_size: int = 2
    position_embedding: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    bias: bool = True
    document_mask: bool = False  # eos (id 1) at a few fixed positions of every sample
    cp: int = 1  # context parallel: the sequence split over cp ranks (gloo), rank 0's bytes reported
    fp8: str = "none"  # train.fp8: the column/row linears' GEMMs in float8 (bf16 only)

    def model(self, num_layers: int = 2) -> ModelConfig:
        return ModelConfig(
            family=self.family, num_layers=num_layers, hidden_size=self.hidden_size, num_heads=self.num_heads,
            vocab_size=256, seq_length=self.seq_length, hidden_dropout=self.dropout,
            attention_dropout=self.dropout, position_embedding=self.position_embedding, norm=self.norm,
            mlp=self.mlp, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, bias=self.bias,
            document_mask=self.document_mask,
        )

    def config(self, num_layers: int) -> Config:
        return Config(
            model=self.model(num_layers),
            parallel=ParallelConfig(tp=self.tp, cp=self.cp, sequence_parallel=self.sequence_parallel,
                                    recompute=self.recompute),
            train=TrainConfig(micro_batch_size=self.micro_batch_size, global_batch_size=self.micro_batch_size,
                              precision=self.precision, seed=5, fp8=self.fp8),
        )

    def layout(self) -> Layout:
        return Layout(self.tp, 1, 1, self.micro_batch_size, self.micro_batch_size, recompute=self.recompute,
                      sequence_parallel=self.sequence_parallel, cp=self.cp, fp8=self.fp8)

    def label(self) -> str:
        sp = (f" cp{self.cp}" if self.cp > 1 else "") + (" sp" if self.sequence_parallel else "")
        rope = " rope" if self.position_embedding == "rotary" else ""
        spec = "".join([" rmsnorm" if self.norm == "rmsnorm" else "", " swiglu" if self.mlp == "swiglu" else "",
                        f" kv{self.num_kv_heads}" if self.num_kv_heads else "", f" d{self.head_dim}" if self.head_dim else "",
                        "" if self.bias else " nobias", " docs" if self.document_mask else "",
                        f" fp8 {self.fp8}" if self.fp8 != "none" else ""])
        return (f"{self.family:8s} {self.precision} tp{self.tp}{sp:3s} drop {self.dropout:g} {self.recompute:9s} "
                f"s{self.seq_length} b{self.micro_batch_size} h{self.hidden_size} a{self.num_heads}{rope}{spec}")


class SavedBytes:
    """Storages autograd saves for backward while active, each counted once, parameters left out."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.parameters = {param.untyped_storage().data_ptr() for param in module.parameters()}
        self.storages: dict[int, int] = {}  # data pointer -> bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _forward(case: Case, num_layers: int, groups: ParallelGroups) -> tuple[torch.Tensor, int]:
    """(per-token losses, bytes saved for backward) of one training forward of a `num_layers` model."""
    from megalm.model.gpt import build_model_chunks

    (chunk,) = build_model_chunks(case.config(num_layers), groups)
    chunk.train()
    generator = torch.Generator().manual_seed(11)
    b, s = case.micro_batch_size, case.seq_length
    tokens = torch.randint(0, 256, (b, s), generator=generator).to(groups.device)
    labels = torch.randint(0, 256, (b, s), generator=generator).to(groups.device)
    prefix = torch.randint(1, s, (b,), generator=generator).to(groups.device) if case.family == "prefixlm" else None
    documents = None
    if case.document_mask:
        tokens[:, [s // 4, s // 4 + 1, s // 2]] = EOS_ID
        documents = document_ids(tokens, EOS_ID)
    if groups.cp_size > 1:  # this rank's chunks of every sample, as the trainer cuts them (Batch.cp_split)
        from megalm.parallel.context import cp_split

        tokens, labels = (cp_split(t, groups.cp_size, groups.cp_rank, dim=1) for t in (tokens, labels))
    with SavedBytes(chunk) as saved:
        losses = chunk(tokens, labels=labels, prefix_lengths=prefix, document_ids=documents)
    return losses, saved.total


def saved_by_forward(case: Case, num_layers: int, groups: ParallelGroups) -> int:
    """Bytes one training forward (loss included) of a `num_layers` model saves for backward."""
    losses, total = _forward(case, num_layers, groups)
    losses.float().sum().backward()  # the saved graph is a usable one
    return total


def attention_kernels(case: Case, groups: Optional[ParallelGroups] = None) -> list[str]:
    """The autograd nodes of the attention kernels torch chose for the case (which SDPA backend ran)."""
    losses, _ = _forward(dataclasses.replace(case, recompute="none"), 1, groups or ParallelGroups.single())
    names, seen, stack = set(), set(), [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Attention" in node.name() or "Softmax" in node.name():
            names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(names)


def measure_layer(case: Case, groups: Optional[ParallelGroups] = None) -> int:
    """Bytes one transformer layer saves for backward, per micro-batch (a 2-layer minus a 1-layer model)."""
    groups = groups or ParallelGroups.single()
    return saved_by_forward(case, 2, groups) - saved_by_forward(case, 1, groups)


def measure_outside_layers(case: Case, groups: Optional[ParallelGroups] = None) -> int:
    """Bytes a forward saves outside its transformer layers, once per micro-batch (embedding, positions, the
    shared masks, final norm, logits, loss): 2 x (1 layer) - (2 layers)."""
    groups = groups or ParallelGroups.single()
    return 2 * saved_by_forward(case, 1, groups) - saved_by_forward(case, 2, groups)


def predict_layer(case: Case, kernels: str = "cpu") -> int:
    """The planner's stored bytes per layer and micro-batch for the case, with the given device's kernels."""
    stored, _ = layer_activation_bytes(case.model(), case.layout(), ACTIVATION_BYTES[case.precision],
                                       kernels=kernels)
    return stored


def _parallel_worker(rank: int, world_size: int, cases: list[Case], function=None) -> list[int]:
    """`function` (default measure_layer) of every case on this rank of a tp x cp grid of gloo ranks."""
    from megalm.distributed import build_parallel_groups
    from megalm.topology import Topology

    tp, cp = cases[0].tp, cases[0].cp
    groups = build_parallel_groups(Topology(tp=tp, pp=1, dp=1, cp=cp), rank, torch.device("cpu"))
    return [(function or measure_layer)(case, groups) for case in cases]


def measure(cases: Iterable[Case], device: str = "cpu", function=None) -> dict[Case, int]:
    """Measured bytes per layer (or `function(case, groups)`) of every case: tp = cp = 1 in this process, the
    others on tp x cp gloo ranks (rank 0's bytes)."""
    cases = list(cases)
    out = {}
    single = ParallelGroups.single(torch.device("cuda", 0) if device == "cuda" else device)
    for case in cases:
        if case.tp == case.cp == 1:
            out[case] = (function or measure_layer)(case, single)
    parallel = [case for case in cases if case.tp * case.cp > 1]
    for tp, cp in sorted({(case.tp, case.cp) for case in parallel}):
        if device != "cpu":
            raise ValueError(f"tp={tp}, cp={cp} cases are measured on CPU gloo ranks only; use --device cpu")
        from megalm.testing import run_distributed

        group = [case for case in parallel if (case.tp, case.cp) == (tp, cp)]
        measured = run_distributed(_parallel_worker, tp * cp, group, function, timeout=300)[0]
        out.update(zip(group, measured))
    return {case: out[case] for case in cases}


def default_cases(quick: bool = False) -> list[Case]:
    """The table in docs/plan.md (quick: one shape, and recompute modes only for fp32 with dropout and bf16
    without)."""
    shapes = [dict(seq_length=64, hidden_size=128, num_heads=4, micro_batch_size=2),
              dict(seq_length=128, hidden_size=64, num_heads=8, micro_batch_size=1)]
    layouts = [dict(tp=1), dict(tp=2), dict(tp=2, sequence_parallel=True)]
    cases = []
    for shape in shapes[:1] if quick else shapes:
        for layout in layouts:
            for family in ("lm", "prefixlm"):
                for precision in ("fp32", "bf16"):
                    for dropout in (0.0, 0.1):
                        for recompute in ("none", "selective", "full"):
                            if quick and (precision == "bf16") == (dropout == 0.0) and recompute != "none":
                                continue
                            cases.append(Case(family, precision, recompute, dropout=dropout, **layout, **shape))
    if not quick:
        cases.append(Case(position_embedding="rotary", dropout=0.1))
        cases.append(Case(position_embedding="rotary", precision="bf16"))
    return cases + llama_cases(quick) + context_parallel_cases(quick)


def context_parallel_cases(quick: bool = False) -> list[Case]:
    """cp = 2 on 2 gloo ranks (megalm.parallel.context: gathered keys and values, one shared additive mask): LM
    in every recompute mode, PrefixLM, per-document attention, rotary, and Llama-style GQA layers."""
    shape = dict(seq_length=64, hidden_size=128, num_heads=4, micro_batch_size=2, cp=2)
    llama = dict(shape, norm="rmsnorm", mlp="swiglu", num_kv_heads=2, position_embedding="rotary", bias=False)
    cases = []
    for precision in ("fp32",) if quick else ("fp32", "bf16"):
        cases += [Case(precision=precision, recompute=recompute, **shape) for recompute in ("none", "selective", "full")]
        cases += [Case("prefixlm", precision, **shape), Case(precision=precision, document_mask=True, **shape),
                  Case(precision=precision, **llama), Case(precision=precision, recompute="selective", **llama)]
        if not quick:
            cases += [Case(precision=precision, position_embedding="rotary", **shape),
                      Case(precision=precision, **dict(llama, num_kv_heads=None))]
    return cases


def llama_cases(quick: bool = False) -> list[Case]:
    """Llama-style layers (RMSNorm, SwiGLU, grouped-query attention with rotary, no biases) at tp 1 and 2,
    with and without sequence parallel, no and selective recompute; tp 4 replicates the 2 kv heads."""
    llama = dict(norm="rmsnorm", mlp="swiglu", num_kv_heads=2, position_embedding="rotary", bias=False,
                 seq_length=64, hidden_size=128, num_heads=4, micro_batch_size=2)
    layouts = [dict(tp=1), dict(tp=2), dict(tp=2, sequence_parallel=True)] + ([] if quick else [dict(tp=4)])
    cases = []
    for layout in layouts:
        for precision in ("fp32", "bf16"):
            for recompute in ("none", "selective") + (() if quick else ("full",)):
                cases.append(Case(precision=precision, recompute=recompute, **layout, **llama))
    if not quick:
        cases.append(Case(**dict(llama, num_kv_heads=1, head_dim=48)))  # MQA with head_dim != hidden / heads
        cases.append(Case(**dict(llama, num_kv_heads=None, precision="bf16")))  # SwiGLU + RMSNorm, multi-head
        for precision in ("fp32", "bf16"):  # dropout: CPU SDPA's math path repeats k and v to every head
            for recompute in ("none", "selective"):
                cases.append(Case(precision=precision, recompute=recompute, dropout=0.1, **llama))
                cases.append(Case("prefixlm", precision, recompute, **llama))
    return cases


def table(measured: dict[Case, int], kernels: str, markdown: bool = False) -> tuple[str, float]:
    """The measured-vs-predicted table and the largest relative error (Markdown: one row per case, the
    three recompute modes side by side)."""
    errors = {case: predict_layer(case, kernels) / got - 1 for case, got in measured.items()}
    worst = max((abs(e) for e in errors.values()), default=0.0)
    if not markdown:
        lines = [f"{'case':70s} {'measured B':>11s} {'predicted B':>11s} {'error':>7s}"]
        for case, got in measured.items():
            lines.append(f"{case.label():70s} {got:11,} {predict_layer(case, kernels):11,} {100 * errors[case]:+6.2f}%")
        return "\n".join(lines), worst
    modes = ("none", "selective", "full")
    lines = ["| case | " + " | ".join(f"{m}: measured B | predicted" for m in modes) + " |",
             "| --- |" + " ---: | ---: |" * len(modes)]
    rows: dict[Case, list[str]] = {}
    for case, got in measured.items():
        cells = rows.setdefault(dataclasses.replace(case, recompute="none"), ["", ""] * len(modes))
        index = 2 * modes.index(case.recompute)
        cells[index:index + 2] = [f"{got:,}", f"{predict_layer(case, kernels):,} ({100 * errors[case]:+.2f}%)"]
    for case, cells in rows.items():
        label = " ".join(case.label().replace(" none ", " ").split())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), worst


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megalm.plan.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape and fewer recompute cases")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (docs/plan.md)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to measure (tp=1 only on cuda)")
    args = parser.parse_args(argv)
    cases = default_cases(args.quick)
    if args.device == "cuda":
        cases = [case for case in cases if case.tp == 1]
    measured = measure(cases, args.device)
    text, worst = table(measured, args.device, args.markdown)
    print(text)
    print(f"largest error {100 * worst:.2f}% over {len(measured)} cases ({args.device} kernels); tolerance "
          f"{100 * TOLERANCE:g}%")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
