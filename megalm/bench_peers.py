"""Side by side on one GPU: megalm, Megatron-Core and torchtitan train the same model on the same tokens.

`python -m megalm.bench_peers run CONFIG [CONFIG ...] --out DIR` (exit 1 when megalm's own run fails; a
peer that fails or cannot be imported gets a row that says why) writes one shared token file per config
(megalm's seeded synthetic batches: every system reads the same tokens and labels, step by step), then
runs each system in its own process: megalm's Trainer (`python -m megalm.bench_peers megalm`), then
scripts/peers/megatron_core_bench.py and scripts/peers/torchtitan_bench.py when their packages import
(scripts/peers/install_wheels.sh installs them offline). Each runner prints one `PEER_RESULT {json}`
line: tokens/s, model TFLOP/s, MFU, peak memory and the loss after the same steps, all computed here
(`result_record`) with megalm's FLOPs formula (megalm.plan.flops) and peak table (megalm.metrics), so
the three rows differ only in what each system measured. The driver writes DIR/peers.json and
DIR/peers.md: one row per system and config, with megalm / peer ratios of tokens/s, MFU and memory.

Every system uses the config's shape (layers, hidden, heads, kv heads, ffn, vocabulary padded as megalm
pads it, sequence length), micro-batch, gradient accumulation, bf16, AdamW settings, gradient clipping
and learning-rate schedule (megalm.optim.lr_at). Each initialises its weights its own way, so the losses
agree as a sanity check (same ballpark after the same steps), not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from megalm.config import Config, grad_accum_steps, load_config

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "PEER_RESULT "
PEERS = {  # system -> runner script (relative to the checkout)
    "megatron-core": "scripts/peers/megatron_core_bench.py",
    "torchtitan": "scripts/peers/torchtitan_bench.py",
}
SYSTEMS = ("megalm", *PEERS)


# ---- the shared tokens ----------------------------------------------------------------------------
@dataclass
class TokenFile:
    """Every step's micro-batches: tokens and labels [steps, accumulation, micro_batch, seq_length]."""

    tokens: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]

    def step(self, index: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens, labels) of each micro-batch of step `index`, int64 on `device`."""
        return [(torch.from_numpy(self.tokens[index, m].astype(np.int64)).to(device),
                 torch.from_numpy(self.labels[index, m].astype(np.int64)).to(device))
                for m in range(self.tokens.shape[1])]


def write_token_file(config: Config, num_steps: int, path: Path) -> Path:
    """Write num_steps global batches of the config's data (one process: all micro-batches) to `path` (.npz)."""
    from megalm.data.pipeline import build_sampler, build_sources

    sampler = build_sampler(config, build_sources(config).train, 0, 1)
    tokens, labels = [], []
    for step in range(num_steps):
        batches = sampler.micro_batches(step)
        for batch in batches:
            if not bool((batch.loss_mask == 1).all()):
                raise ValueError("the side by side trains on every label, but this config's data masks some "
                                 "(PrefixLM, padding): use model.family=lm with synthetic or packed data")
        tokens.append(np.stack([b.tokens.numpy() for b in batches]))
        labels.append(np.stack([b.labels.numpy() for b in batches]))
    meta = {"vocab_size": config.model.vocab_size, "seq_length": config.model.seq_length,
            "micro_batch_size": config.train.micro_batch_size, "accumulation": grad_accum_steps(config, 1),
            "steps": num_steps, "seed": config.train.seed}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # np.savez on a path would append .npz to another suffix
        np.savez(handle, tokens=np.asarray(tokens, dtype=np.int32), labels=np.asarray(labels, dtype=np.int32),
                 meta=np.asarray(json.dumps(meta)))
    return path


def read_token_file(path: Path, config: Config, num_steps: int) -> TokenFile:
    """The token file at `path`, checked against the config's batch shape and the steps a runner needs."""
    with np.load(path) as data:
        tokens, labels, meta = data["tokens"], data["labels"], json.loads(str(data["meta"]))
    want = (grad_accum_steps(config, 1), config.train.micro_batch_size, config.model.seq_length)
    if tokens.shape[1:] != want or tokens.shape[0] < num_steps:
        raise ValueError(f"token file {path} holds batches {list(tokens.shape)} but this run needs at least "
                         f"[{num_steps}, {', '.join(map(str, want))}] ([steps, accumulation, micro-batch, seq]): "
                         f"write it again with `python -m megalm.bench_peers tokens` for this config")
    if int(tokens.max()) >= config.model.vocab_size:
        raise ValueError(f"token file {path} has ids up to {int(tokens.max())} but model.vocab_size is "
                         f"{config.model.vocab_size}: write it for this config")
    return TokenFile(tokens, labels, meta)


# ---- one runner's figures -------------------------------------------------------------------------
def timed_steps(step_fn: Callable[[int], float | torch.Tensor], warmup: int, steps: int,
                device: torch.device) -> tuple[list[float], list[float], int]:
    """megalm bench's timing loop (megalm.bench.time_steps): step seconds, losses, peak memory."""
    from megalm.bench import PeakMemory, time_steps

    return time_steps(step_fn, warmup, steps, device, PeakMemory(device), barrier=False)


def result_record(system: str, config: Config, config_path: str, times: list[float], losses: list[float],
                  peak_bytes: int, device: torch.device, warmup: int, **extra: Any) -> dict[str, Any]:
    """One row's figures, computed the same way for every system (megalm's FLOPs per token and peak)."""
    import statistics

    from megalm.bench import device_name
    from megalm.metrics import guess_peak_tflops, throughput

    tokens_per_step = config.train.global_batch_size * config.model.seq_length
    median = statistics.median(times)
    peak_tflops = config.log.peak_tflops or guess_peak_tflops(device)
    rates = throughput(config.model, tokens_per_step, median, 1, peak_tflops)
    return {
        "system": system, "config": config_path, "device": device_name(device), "torch": torch.__version__,
        "steps": len(times), "warmup": warmup, "tokens_per_step": tokens_per_step, "median_step_s": median,
        "tokens_per_s": rates["tokens_per_s"], "tflops_per_device": rates["tflops_per_device"],
        "mfu": rates["mfu"], "peak_tflops": peak_tflops, "peak_memory_gib": peak_bytes / 2**30,
        "loss": losses[-1], "losses": losses, "step_times_s": times, **extra,
    }


def print_record(record: dict[str, Any]) -> None:
    """The one line a runner prints for the driver."""
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def parse_record(output: str) -> Optional[dict[str, Any]]:
    """The last PEER_RESULT line of a runner's output, or None."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def runner_args(description: str, argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, Config]:
    """The arguments every runner takes: CONFIG --tokens FILE --steps N --warmup N [--device D] [overrides]."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as megalm train takes them")
    parser.add_argument("--tokens", required=True, help="token file of `python -m megalm.bench_peers tokens`")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the config's train.device)")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    return args, load_config(args.config, overrides)


# ---- the megalm runner ----------------------------------------------------------------------------
def run_megalm(config: Config, config_path: str, tokens: TokenFile, warmup: int, steps: int) -> dict[str, Any]:
    """Time megalm's Trainer.train_step (one process, tp = pp = dp = 1) on the shared tokens."""
    from megalm.bench import PreparedBatches
    from megalm.config import validate
    from megalm.data.batch import Batch
    from megalm.distributed import allow_tf32, build_parallel_groups, resolve_device
    from megalm.train import build_trainer

    topology = validate(config, 1)
    device = resolve_device(config.train.device)
    allow_tf32(device, config.train.precision)
    groups = build_parallel_groups(topology, 0, device)
    batches = [[Batch(t, y, torch.ones(t.shape, dtype=torch.float32, device=device)) for t, y in tokens.step(i, device)]
               for i in range(warmup + steps)]
    trainer = build_trainer(config, groups, None)
    trainer.data = PreparedBatches(batches)
    try:
        times, losses, peak = timed_steps(lambda index: trainer.train_step(index).loss, warmup, steps, device)
    finally:
        trainer.metrics.close()
    from megalm.model.gpt import count_parameters

    return result_record("megalm", config, config_path, times, losses, peak, device, warmup,
                         num_parameters=sum(count_parameters(chunk) for chunk in trainer.chunks),
                         version=_megalm_version(), attention="sdpa", optimizer="megalm AdamW (fp32 masters)")


def _megalm_version() -> str:
    try:
        from importlib.metadata import version

        return version("megalm")
    except Exception:  # noqa: BLE001 - a checkout run from PYTHONPATH is not installed
        return "checkout"


# ---- the table ------------------------------------------------------------------------------------
def side_by_side(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, system), with megalm / this row's ratios of tokens/s, MFU and peak memory."""
    rows = []
    for record in records:
        megalm = next((r for r in records if r["config"] == record["config"] and r["system"] == "megalm"
                       and r.get("tokens_per_s")), None)
        row = dict(record)
        for key in ("tokens_per_s", "mfu", "peak_memory_gib"):
            ok = megalm is not None and record.get(key) and megalm.get(key) and record["system"] != "megalm"
            row[f"megalm_over_peer_{key}"] = megalm[key] / record[key] if ok else None
        ok = megalm is not None and record.get("loss") is not None and record["system"] != "megalm"
        row["loss_minus_megalm"] = record["loss"] - megalm["loss"] if ok else None
        rows.append(row)
    return rows


def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table in Markdown, one row per (config, system); skipped systems say why."""
    lines = ["| model | system | tokens/s | MFU | peak GiB | loss | megalm/peer tokens/s | megalm/peer MFU "
             "| megalm/peer memory | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        mfu = None if row.get("mfu") is None else 100 * row["mfu"]
        note = row.get("skipped") or ", ".join(f"{k} {row[k]}" for k in ("version", "attention") if row.get(k))
        lines.append(
            f"| {Path(row['config']).stem} | {row['system']} | {_cell(row.get('tokens_per_s'), ',.0f')} "
            f"| {_cell(mfu, '.1f')}{'%' if mfu is not None else ''} | {_cell(row.get('peak_memory_gib'), '.1f')} "
            f"| {_cell(row.get('loss'), '.3f')} | {_cell(row.get('megalm_over_peer_tokens_per_s'), '.2f')} "
            f"| {_cell(row.get('megalm_over_peer_mfu'), '.2f')} "
            f"| {_cell(row.get('megalm_over_peer_peak_memory_gib'), '.2f')} "
            f"| {note} |")
    return "\n".join(lines) + "\n"


# ---- the driver -----------------------------------------------------------------------------------
def run_system(system: str, config_path: str, overrides: list[str], token_path: Path, steps: int, warmup: int,
               log: Path, timeout_s: float, python: str = sys.executable) -> dict[str, Any]:
    """Run one system's runner in its own process; its record, or a row that says why there is none."""
    script = ["-m", "megalm.bench_peers", "megalm"] if system == "megalm" else [str(ROOT / PEERS[system])]
    command = [python, *script, config_path, *overrides, "--tokens", str(token_path),
               "--steps", str(steps), "--warmup", str(warmup)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        code = f"timeout after {timeout_s:.0f} s"
    log.write_text(" ".join(command) + "\n" + output, encoding="utf-8")
    record = parse_record(output)
    if record is None:
        last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"]
        record = {"system": system, "config": config_path, "skipped": f"exit {code}: {last[0][:200]} (see {log.name})"}
    record["wall_s"] = time.perf_counter() - start
    return record


def run_side_by_side(args: argparse.Namespace) -> int:
    """`run`: token file per config, every system per config, then peers.json and peers.md."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        print(f"bench_peers: unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    records = []
    for config_path in args.configs:
        config = load_config(config_path, args.overrides)
        name = Path(config_path).stem
        token_path = write_token_file(config, args.warmup + args.steps, out / f"tokens_{name}.npz")
        for system in systems:
            print(f"bench_peers: {system} on {config_path}", file=sys.stderr, flush=True)
            record = run_system(system, config_path, list(args.overrides), token_path, args.steps, args.warmup,
                                out / f"peers_{name}_{system}.log", args.timeout)
            print(f"bench_peers:   {record.get('skipped') or _cell(record.get('tokens_per_s'), ',.0f') + ' tokens/s'}",
                  file=sys.stderr, flush=True)
            records.append(record)
    rows = side_by_side(records)
    (out / "peers.json").write_text(json.dumps({"steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=1)
                                    + "\n", encoding="utf-8")
    table = format_markdown(rows)
    (out / "peers.md").write_text(table, encoding="utf-8")
    print(table)
    return 1 if any(r["system"] == "megalm" and r.get("skipped") for r in records) else 0  # a peer's failure is its row


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["megalm"]:
        args, config = runner_args("megalm's row of the side by side", argv[1:])
        tokens = read_token_file(Path(args.tokens), config, args.warmup + args.steps)
        print_record(run_megalm(config, args.config, tokens, args.warmup, args.steps))
        return 0
    parser = argparse.ArgumentParser(prog="python -m megalm.bench_peers", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokens", help="write the shared token file of a config")
    tok.add_argument("config")
    tok.add_argument("overrides", nargs="*")
    tok.add_argument("--steps", type=int, required=True, help="global batches to write (warm-up + timed)")
    tok.add_argument("--output", required=True)
    run = sub.add_parser("run", help="the side by side: every system on every config")
    run.add_argument("configs", nargs="+")
    run.add_argument("--override", dest="overrides", action="append", default=[],
                     help="a dotted config override for every system (repeatable)")
    run.add_argument("--out", required=True, help="directory for the token files, logs, peers.json, peers.md")
    run.add_argument("--steps", type=int, default=5)
    run.add_argument("--warmup", type=int, default=2)
    run.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    run.add_argument("--timeout", type=float, default=240.0, help="seconds per system and config")
    args = parser.parse_args(argv)
    if args.command == "tokens":
        path = write_token_file(load_config(args.config, args.overrides), args.steps, Path(args.output))
        print(path)
        return 0
    return run_side_by_side(args)


if __name__ == "__main__":
    sys.exit(main())
