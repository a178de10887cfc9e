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


def bench_figures(path: Path) -> Optional[dict[str, Any]]:
    """The figures of one `megalm bench --json` file that the check reports."""
    if not path.exists():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    out = {key: result.get(key) for key in ("config", "device", "torch_version", "precision", "tf32",
                                            "global_batch_size", "micro_batch_size", "peak_tflops",
                                            "ratio_tokens_per_s", "baseline_skipped", "planned_peak_gib")}
    for phase in ("megalm", "baseline"):
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
    return {
        "seconds": seconds,
        "failed": failed,
        "environment": json.loads(environment.read_text(encoding="utf-8")) if environment.exists() else None,
        "tests": test_outcomes(out_dir / "gpu_tests.xml"),
        "test_figures": figures,
        "bench": {name: bench_figures(out_dir / f"bench_{name}.json") for name in ("gpt-125m", "gpt-1.3b")},
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"gpu_check: {summary['seconds']:.0f} s" + (f", FAILED: {', '.join(summary['failed'])}" if summary["failed"] else "")]
    for name, outcome in summary["tests"].items():
        lines.append(f"  {outcome:<7} {name}")
    for name, bench in summary["bench"].items():
        if bench is None:
            lines.append(f"  bench {name}: no result")
            continue
        megalm = bench["megalm"] or {}
        mfu = f"{100 * megalm['mfu']:.1f}%" if megalm.get("mfu") is not None else "n/a"
        ratio = f"{bench['ratio_tokens_per_s']:.2f}" if bench["ratio_tokens_per_s"] is not None else "n/a"
        lines.append(f"  bench {name}: {megalm.get('tokens_per_s', 0):,.0f} tokens/s, "
                     f"{megalm.get('tflops_per_device', 0):.1f} TFLOP/s, MFU {mfu}, megalm/plain PyTorch {ratio}"
                     + (f", peak {megalm['peak_memory_gib']:.2f} GiB (plan {bench['planned_peak_gib']:.2f})"
                        if bench.get("planned_peak_gib") and megalm.get("peak_memory_gib") else ""))
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
