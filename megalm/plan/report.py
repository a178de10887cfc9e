"""Readable tables and the `megalm plan` command."""

from __future__ import annotations

import argparse
import json
from typing import Optional

from megalm.config import load_config
from megalm.plan.cluster import PlanError, get_numerics, load_cluster
from megalm.plan.flops import training_flops_per_token
from megalm.plan.layout import full_param_count, layout_from_config, layout_overrides, overrides_yaml
from megalm.plan.model import KERNELS, GiB, days_to_train
from megalm.plan.search import Plan, make_plan, propose_shapes, search

PARTS = ("compute", "launch", "bubble", "pipeline_comm", "tensor_comm", "context_comm", "data_comm", "optimizer")


def format_plan(plan: Plan, tokens: Optional[float] = None) -> str:
    """Memory per stage, time breakdown with shares, throughput and MFU."""
    t, layout = plan.time, plan.layout
    lines = [
        f"plan: {layout.short()} = {layout.gpus} GPUs on {plan.cluster.name} ({plan.cluster.gpu}); "
        f"{plan.precision}, {plan.numerics.description}" + ("; activations of CPU kernels" if plan.kernels == "cpu" else ""),
        model_line(plan.model, layout.tp),
        f"memory per GPU (GiB, limit {plan.cluster.hbm_gib:g}):",
        "  stage layers  weights    grads optimizer activations emb/logits  buffers reserved    total  in-flight",
    ]
    shown = plan.memory if len(plan.memory) <= 6 else plan.memory[:3] + [None] + plan.memory[-2:]
    for s in shown:
        if s is None:
            lines.append("  ...")
            continue
        cells = [s.weights, s.grads, s.optimizer, s.activations, s.embedding_logits, s.buffers, s.reserved, s.total]
        lines.append(f"  {s.pp_rank:>5} {s.layers:>6} " + " ".join(f"{c / GiB:>8.2f}" for c in cells[:3])
                     + f" {cells[3] / GiB:>11.2f} {cells[4] / GiB:>10.2f} " + " ".join(f"{c / GiB:>8.2f}" for c in cells[5:])
                     + f" {s.in_flight:>10}")
    lines.append(f"  peak {plan.peak_memory / GiB:.2f} GiB: {'fits' if plan.fits else 'DOES NOT FIT'}")
    lines.append(f"time per step ({layout.num_microbatches} micro-batches per pipeline):")
    for name, share in t.shares().items():
        lines.append(f"  {name:<14} {getattr(t, name):>10.3f} s  {100 * share:5.1f}%")
    lines.append(f"  {'step':<14} {t.total:>10.3f} s")
    if layout.cp > 1:
        lines.append(f"  (context_comm: each layer's key/value all-gather over the {layout.cp} cp ranks in forward and "
                     f"its reduce-scatter in backward, {t.parts['cp_exchange_s'] * 1e3:.2f} ms each, not overlapped "
                     f"with compute)")
    lines.append(
        f"throughput: {t.tokens_per_s:,.0f} tokens/s, {t.model_tflops:.1f} model TFLOP/s per GPU "
        f"({t.hardware_tflops:.1f} with recompute), MFU {100 * t.mfu:.1f}%"
    )
    if tokens:
        lines.append(f"days to train {tokens:.3g} tokens: {days_to_train(t, tokens):.1f}")
    return "\n".join(lines)


def model_line(model, tp: int) -> str:
    """Parameters (as transformers counts them, and as megalm builds them with the vocabulary padded at tp)
    and training FLOPs per token, from the spec."""
    exact, built = full_param_count(model), full_param_count(model, padded_tp=tp)
    padding = f"; {built:,} with the vocabulary padded to {model.padded_vocab_size(tp):,}" if built != exact else ""
    return (f"model: {exact:,} parameters ({exact / 1e9:.2f} B{padding}); "
            f"{training_flops_per_token(model) / 1e9:.2f} GFLOP per token per training step (model FLOPs)")


def format_search(plans: list[Plan], reference: Optional[Plan] = None) -> str:
    lines = [f"{'#':>2} {'layout':<64} {'step s':>8} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}"]
    for i, p in enumerate(plans, 1):
        lines.append(f"{i:>2} {p.layout.short():<64} {p.time.total:>8.2f} {p.time.tokens_per_s:>11,.0f} "
                     f"{p.time.model_tflops:>8.1f} {100 * p.time.mfu:>5.1f}% {p.peak_memory / GiB:>8.1f}")
    if reference is not None and plans:
        lines.append(explain(plans[0], reference))
    return "\n".join(lines)


def format_overrides(overrides: list[str]) -> str:
    """The best layout, ready to paste: command-line overrides, then the same as YAML."""
    yaml_text = "\n".join("  " + line for line in overrides_yaml(overrides).splitlines())
    return (f"best layout as overrides (megalm train|plan CONFIG ...):\n  {' '.join(overrides)}\n"
            f"or in the experiment YAML:\n{yaml_text}")


def explain(best: Plan, reference: Plan) -> str:
    """Why `best` beats (or ties) `reference`: the parts of the step that changed most."""
    delta = {name: getattr(reference.time, name) - getattr(best.time, name) for name in PARTS}
    ratio = reference.time.total / best.time.total
    gains = ", ".join(f"{name} {'-' if d > 0 else '+'}{abs(d):.2f} s" for name, d in
                      sorted(delta.items(), key=lambda kv: -abs(kv[1])) if abs(d) > 0.005 * reference.time.total)
    return (f"best vs configured ({reference.layout.short()}: {reference.time.total:.2f} s, "
            f"{'fits' if reference.fits else 'does not fit'}): {ratio:.2f}x faster; {gains or 'same parts'}")


def run_plan(args: argparse.Namespace) -> int:
    """`megalm plan CONFIG --cluster NAME --gpus N [--search] [--top K] [--json]`."""
    config = load_config(args.config, args.overrides)
    cluster = load_cluster(args.cluster)
    numerics = get_numerics(args.numerics)
    precision = config.train.precision
    model = config.model
    if args.propose_params:
        proposals = propose_shapes(args.propose_params, cluster, args.gpus or 1, config.train.global_batch_size,
                                   numerics, precision, model, top=args.top)
        if args.json:
            print(json.dumps([{"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
                               "plan": p.to_dict()} for m, p in proposals], indent=1))
            return 0
        for m, p in proposals:
            print(f"layers {m.num_layers:>3} hidden {m.hidden_size:>6} heads {m.num_heads:>4}: "
                  f"{p.layout.short()}: {p.time.tokens_per_s:,.0f} tokens/s, MFU {100 * p.time.mfu:.1f}%")
        return 0
    if args.search:  # the configured layout is only a reference: it need not divide --gpus
        try:
            plan = make_plan(model, layout_from_config(config, args.gpus, args.recompute), cluster, numerics, precision)
        except PlanError:
            plan = None
        gpus = args.gpus or (plan.layout.gpus if plan else None)
        if gpus is None:
            raise PlanError("--search needs --gpus N (the config's own layout is not usable)")
        plans = search(model, cluster, gpus, config.train.global_batch_size, numerics, precision, top=args.top,
                       config=config)
        overrides = layout_overrides(plans[0].layout, config)
        if args.json:
            print(json.dumps({"configured": plan.to_dict() if plan else None, "best": [p.to_dict() for p in plans],
                              "overrides": overrides, "yaml": overrides_yaml(overrides)}, indent=1))
        else:
            print(format_search(plans, plan))
            print(format_overrides(overrides))
        return 0
    layout = layout_from_config(config, args.gpus, args.recompute)
    plan = make_plan(model, layout, cluster, numerics, precision, kernels=args.kernels)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan, args.tokens))
    return 0


def register_cli(sub) -> None:
    """Add `megalm plan` to the command line."""
    plan = sub.add_parser("plan", help="predict memory, step time and MFU of a config on a cluster; search layouts")
    plan.add_argument("config", help="experiment YAML")
    plan.add_argument("overrides", nargs="*", help="dotted overrides such as parallel.tp=4")
    plan.add_argument("--cluster", default="a100-80gb", help="configs/clusters/NAME.yaml or a path")
    plan.add_argument("--gpus", type=int, help="GPU count (default: tp x pp x dp of the config)")
    plan.add_argument("--search", action="store_true", help="print the fastest layouts that fit")
    plan.add_argument("--top", type=int, default=5, help="layouts (or shapes) to print")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--recompute", choices=("none", "selective", "full"),
                      help="activation recompute to plan for (default: the config's parallel.recompute)")
    plan.add_argument("--numerics", default="megalm", choices=("megalm", "megatron"),
                      help="megalm: fp32 params/grads/Adam as implemented; megatron: fp16 params + fp32 master")
    plan.add_argument("--kernels", default="cuda", choices=KERNELS,
                      help="whose kernels the activation bytes describe: cuda (GPU runs) or cpu (a CPU run)")
    plan.add_argument("--tokens", type=float, help="also print the days to train this many tokens")
    plan.add_argument("--propose-params", type=float, help="propose model shapes of about this many parameters")
    plan.set_defaults(func=_cli_entry)


def _cli_entry(args: argparse.Namespace) -> int:
    from megalm.config import ConfigError

    try:
        return run_plan(args)
    except PlanError as error:
        raise ConfigError(f"plan: {error}") from None





ESTIMATE_CLUSTER = "a100-80gb"  # `megalm plan`'s default cluster: the basis of the run-length estimate


def estimated_run_hours(config, gpus: int) -> Optional[float]:
    """Hours for train.steps on `gpus` GPUs of the default cluster, by `step_time`; None if unplannable."""
    try:
        layout = layout_from_config(config, gpus)
        plan = make_plan(config.model, layout, load_cluster(ESTIMATE_CLUSTER), get_numerics("megalm"),
                         config.train.precision)
    except ValueError:  # PlanError, ConfigError: a layout the model cannot plan gets no estimate
        return None
    return plan.time.total * config.train.steps / 3600


def periodic_save_warning(config, gpus: int) -> Optional[str]:
    """A warning when a run estimated at over an hour has no periodic checkpoint; None otherwise."""
    ckpt = config.checkpoint
    if ckpt.interval_steps > 0 or ckpt.interval_minutes > 0:
        return None
    hours = estimated_run_hours(config, gpus)
    if hours is None or hours <= 1:
        return None
    return (f"warning: no periodic checkpoint (checkpoint.interval_steps and checkpoint.interval_minutes are 0) "
            f"in a run of {config.train.steps:,} steps, about {hours:,.1f} h on {gpus} {ESTIMATE_CLUSTER} GPUs by "
            f"`megalm plan`'s step-time model: a crash loses all of it; set e.g. checkpoint.interval_minutes=30")
