"""Test-suite hooks: tests marked `gpu` are skipped where no CUDA device is visible; under pytest-xdist
the files with the most `slow` tests are handed out first."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        slow_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def slow_first(items: list[pytest.Item]) -> None:
    """Order whole files by their number of `slow` tests, most first (ties keep their order): with
    `--dist loadfile --no-loadscope-reorder` the long files start early, and the run ends on short ones
    rather than one worker finishing a long file alone."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first = {}
    for index, item in enumerate(items):
        first.setdefault(item.path, index)
    items.sort(key=lambda item: (-slow[item.path], first[item.path]))
