"""scripts/pipeline_waits.py (the CPU bubble figures of early receives) runs, with and without early receives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_waits_script_reports_both_protocols() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    lines = []
    for extra in ([], ["--reference"]):
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "pipeline_waits.py"), "--pp", "2", "--microbatches", "2",
             "--schedules", "1f1b", "--steps", "1", *extra],
            env=env, capture_output=True, text=True, timeout=300, check=True,
        )
        lines += [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["early_receives"] for line in lines] == [True, False]
    for line in lines:
        assert line["step_ms"] > 0 and all(0 <= share < 1 for share in line["wait_share_per_rank"])
        assert line["analytic_bubble"] == round(1 / 3, 3)
