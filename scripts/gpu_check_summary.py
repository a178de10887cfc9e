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
    for phase, _ in PHASES:
        entry = result.get(phase)
        out[phase] = None if entry is None else {
            key: entry.get(key) for key in ("median_step_s", "tokens_per_s", "tflops_per_device", "mfu",
                                            "peak_memory_gib")
        }
    return out


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
    return {
        "seconds": seconds,
        "failed": failed,
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
