"""Collect what scripts/gpu_check.sh wrote into OUTPUT_DIR/gpu_check.json and print its figures.

usage: python scripts/gpu_check_summary.py OUTPUT_DIR SECONDS [FAILED_STEP ...]
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Optional


def test_outcomes(junit: Path) -> dict[str, str]:
    """name -> passed | failed | skipped | error, from pytest's JUnit XML."""
    if not junit.exists():
        return {}
    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        outcomes[case.get("name", "?")] = outcome
    return outcomes


PHASES = (("megalm", "megalm"), ("baseline", "plain PyTorch"), ("transformers", "transformers"))


def bench_figures(path: Path) -> Optional[dict[str, Any]]:
    """The figures of one `megalm bench --json` file that the check reports."""
    if not path.exists():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    out = {key: result.get(key) for key in ("config", "overrides", "device", "torch_version", "precision", "tf32",
                                            "global_batch_size", "micro_batch_size", "peak_tflops",
                                            "ratio_tokens_per_s", "baseline_skipped", "ratio_transformers_tokens_per_s",
                                            "transformers_skipped", "planned_peak_gib", "planned", "compile_seconds")}
    losses = (result.get("megalm") or {}).get("losses")
    out["last_loss"] = losses[-1] if losses else None
    for phase, _ in PHASES:
        entry = result.get(phase)
        out[phase] = None if entry is None else {
            key: entry.get(key) for key in ("median_step_s", "tokens_per_s", "tflops_per_device", "mfu",
                                            "peak_memory_gib")
        }
    return out


FP8_PREFIX = "gpt-1.3b-fp8-"  # bench_gpt-1.3b-fp8-{bf16,tensorwise,rowwise}.json
TP_OVERLAP = ("not measured: parallel.tp_comm_overlap needs tp >= 2, more GPUs than this check's one "
              "(tests/parallel check its results on CPU)")


def _last_loss(bench: Optional[dict]) -> Optional[float]:
    """The loss after the last step of a bench entry's megalm phase (its JSON keeps every timed loss)."""
    return None if bench is None else bench.get("last_loss")


def fp8_figures(bench: dict[str, Optional[dict]]) -> dict[str, Any]:
    """FP8 against bf16 at 1.3B: tokens/s ratio and the relative loss difference after the same steps."""
    out: dict[str, Any] = {}
    for name, entry in bench.items():
        if not name.startswith(FP8_PREFIX) or name.endswith("bf16"):
            continue
        mode = name[len(FP8_PREFIX):]
        # compiled-MODE against compiled bf16, MODE against eager bf16
        base = bench.get(FP8_PREFIX + ("compiled-bf16" if mode.startswith("compiled-") else "bf16"))
        if entry is None or base is None or not (base.get("megalm") or {}).get("tokens_per_s"):
            out[mode] = None
            continue
        speed = entry["megalm"]["tokens_per_s"] / base["megalm"]["tokens_per_s"]
        loss, base_loss = _last_loss(entry), _last_loss(base)
        out[mode] = {"tokens_per_s_ratio": speed, "loss": loss, "bf16_loss": base_loss,
                     "loss_relative_difference": None if loss is None or not base_loss else loss / base_loss - 1}
    return out


def planner_ratios(bench: dict[str, Optional[dict]]) -> dict[str, float]:
    """Measured over planned tokens/s of every bench run the planner priced (megalm plan's time model)."""
    out = {}
    for name, entry in bench.items():
        planned = (entry or {}).get("planned")
        measured = ((entry or {}).get("megalm") or {}).get("tokens_per_s")
        if planned and measured:
            out[name] = measured / planned["tokens_per_s"]
    return out


def peer_rows(out_dir: Path) -> Optional[list[dict[str, Any]]]:
    """The side by side's rows (megalm.bench_peers' peers.json) without their per-step lists."""
    path = out_dir / "peers" / "peers.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    return [{k: v for k, v in row.items() if k not in ("losses", "step_times_s")} for row in rows]


def summarize(out_dir: Path, seconds: float, failed: list[str]) -> dict[str, Any]:
    figures = []
    jsonl = out_dir / "gpu_tests.jsonl"
    if jsonl.exists():
        figures = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    environment = out_dir / "environment.json"
    # bench_NAME.json in the order the check ran them (modification time)
    benches = sorted(out_dir.glob("bench_*.json"), key=lambda path: path.stat().st_mtime)
    bench = {path.stem[len("bench_"):]: bench_figures(path) for path in benches}
    for step in failed:  # "bench NAME (exit N)" that left no JSON: listed, with no result
        if step.startswith("bench "):
            bench.setdefault(step.split()[1], None)
    skipped_file = out_dir / "skipped.txt"
    skipped = [line for line in skipped_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if skipped_file.exists() else []
    return {
        "seconds": seconds,
        "failed": failed,
        "skipped": skipped,
        "peers": peer_rows(out_dir),
        "fp8": fp8_figures(bench),
        "planner_measured_over_planned": planner_ratios(bench),
        "tp_overlap": TP_OVERLAP,
        "environment": json.loads(environment.read_text(encoding="utf-8")) if environment.exists() else None,
        "tests": test_outcomes(out_dir / "gpu_tests.xml"),
        "test_figures": figures,
        "bench": bench,
    }


def _mfu(entry: Optional[dict]) -> str:
    return f"{100 * entry['mfu']:.1f}%" if entry and entry.get("mfu") is not None else "n/a"


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"gpu_check: {summary['seconds']:.0f} s" + (f", FAILED: {', '.join(summary['failed'])}" if summary["failed"] else "")]
    for name, outcome in summary["tests"].items():
        lines.append(f"  {outcome:<7} {name}")
    for name, bench in summary["bench"].items():
        if bench is None:
            lines.append(f"  bench {name}: no result")
            continue
        megalm = bench["megalm"] or {}
        line = (f"  bench {name}: {megalm.get('tokens_per_s', 0):,.0f} tokens/s, "
                f"{megalm.get('tflops_per_device', 0):.1f} TFLOP/s, MFU {_mfu(megalm)}")
        for key, label, ratio in (("baseline", "plain PyTorch", "ratio_tokens_per_s"),
                                  ("transformers", "transformers", "ratio_transformers_tokens_per_s")):
            if bench.get(ratio) is not None:
                line += f"; {label} MFU {_mfu(bench[key])}, megalm/{label} {bench[ratio]:.2f}"
        if bench.get("planned_peak_gib") and megalm.get("peak_memory_gib"):
            line += f"; peak {megalm['peak_memory_gib']:.2f} GiB (plan {bench['planned_peak_gib']:.2f})"
        planned = bench.get("planned")
        if planned and megalm.get("tokens_per_s"):
            line += f"; plan {planned['tokens_per_s']:,.0f} tokens/s (measured/planned {megalm['tokens_per_s'] / planned['tokens_per_s']:.2f})"
        if bench.get("compile_seconds") is not None:
            line += f"; compile {bench['compile_seconds']:.0f} s"
        lines.append(line)
    for row in summary.get("peers") or []:
        if row.get("skipped"):
            lines.append(f"  side by side {Path(row['config']).stem} {row['system']}: {row['skipped']}")
            continue
        line = (f"  side by side {Path(row['config']).stem} {row['system']}: {row['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {_mfu(row)}, peak {row['peak_memory_gib']:.1f} GiB, loss {row['loss']:.3f}")
        if row.get("megalm_over_peer_tokens_per_s") is not None:
            line += f"; megalm/{row['system']} {row['megalm_over_peer_tokens_per_s']:.2f}"
        lines.append(line)
    for mode, fig in (summary.get("fp8") or {}).items():
        if fig is None:
            lines.append(f"  fp8 {mode}: no result")
            continue
        diff = fig["loss_relative_difference"]
        lines.append(f"  fp8 {mode}: {fig['tokens_per_s_ratio']:.2f}x bf16 tokens/s, loss {fig['loss']:.4f} against "
                     f"{fig['bf16_loss']:.4f}" + ("" if diff is None else f" ({100 * diff:+.2f}%)"))
    for name, ratio in (summary.get("planner_measured_over_planned") or {}).items():
        lines.append(f"  planner {name}: measured/planned tokens/s {ratio:.2f}")
    if summary.get("tp_overlap"):
        lines.append(f"  tp overlap: {summary['tp_overlap']}")
    for note in summary.get("skipped") or []:
        lines.append(f"  skipped {note}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[0])
    summary = summarize(out_dir, float(argv[1]), argv[2:])
    (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
