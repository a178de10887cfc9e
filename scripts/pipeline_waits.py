"""The CPU pipeline bubble of GPipe and 1F1B on gloo: the share of a step each rank spends blocked in p2p waits.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/pipeline_waits.py --pp 2 --microbatches 2,4,8 --steps 7
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/pipeline_waits.py --pp 4 --microbatches 4,8,16 --reference

One process per pipeline rank (gloo), a small GPT (2 layers per stage, hidden 128, sequence 64, micro-batch 4),
the real PipelineExecutor with its transport timed. Per case: the median step time (slowest rank) and, per
rank, the median time in `Transport.wait` over the step time. `--reference` runs the protocol without early
receives. The figures of issue 25 (point 4) came from this script; on a shared CPU they are noisy, so repeat
runs and compare medians and minima. Prints one JSON line per (schedule, micro-batches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

SEQ, MICRO, HIDDEN = 64, 4, 128


def _worker(rank: int, world_size: int, cases: list[tuple[str, int]], steps: int, early: bool) -> list[dict]:
    from megalm.config import Config, ModelConfig, ParallelConfig, TrainConfig
    from megalm.data.pipeline import build_sampler, build_sources
    from megalm.distributed import build_parallel_groups
    from megalm.model.gpt import build_model_chunks
    from megalm.parallel.p2p import DistTransport
    from megalm.parallel.pipeline import PipelineExecutor, activation_shape
    from megalm.topology import Topology

    torch.set_num_threads(1)
    groups = build_parallel_groups(Topology(tp=1, pp=world_size, dp=1), rank, torch.device("cpu"))
    out = []
    for schedule, m in cases:
        config = Config(
            model=ModelConfig(num_layers=2 * world_size, hidden_size=HIDDEN, num_heads=4, vocab_size=256,
                              seq_length=SEQ),
            parallel=ParallelConfig(pp=world_size, schedule=schedule),
            train=TrainConfig(micro_batch_size=MICRO, global_batch_size=MICRO * m, seed=1),
        )
        chunks = build_model_chunks(config, groups)
        batches = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)
        transport = TimedTransport(DistTransport(groups))
        executor = PipelineExecutor(chunks, groups, schedule, m, activation_shape(SEQ, MICRO, HIDDEN, groups, False),
                                    transport=transport, early_receives=early)
        rows = []
        for step in range(steps + 1):  # the first step is a warm-up
            torch.distributed.barrier(group=groups.pp_group)
            transport.waited = 0.0
            start = time.perf_counter()
            executor.run(batches, lambda losses, batch: (losses * batch.loss_mask).sum())
            if step:
                rows.append((time.perf_counter() - start, transport.waited))
        out.append({"step_s": statistics.median(r[0] for r in rows), "wait_s": statistics.median(r[1] for r in rows)})
    return out


class TimedTransport:
    """A transport that adds the seconds spent in `wait` to `waited`."""

    def __init__(self, real: Any) -> None:
        self.real, self.waited = real, 0.0

    def start(self, transfers: Any) -> Any:
        return self.real.start(transfers)

    def wait(self, handle: Any) -> None:
        start = time.perf_counter()
        self.real.wait(handle)
        self.waited += time.perf_counter() - start


def main() -> None:
    from megalm.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks (processes)")
    parser.add_argument("--microbatches", default="2,4,8", help="comma-separated micro-batch counts")
    parser.add_argument("--schedules", default="gpipe,1f1b", help="comma-separated schedules")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per case (median reported)")
    parser.add_argument("--reference", action="store_true", help="the protocol without early receives")
    args = parser.parse_args()
    cases = [(s, int(m)) for s in args.schedules.split(",") for m in args.microbatches.split(",")]
    ranks = run_distributed(_worker, args.pp, cases, args.steps, not args.reference, timeout=1200)
    for index, (schedule, m) in enumerate(cases):
        shares = [round(r[index]["wait_s"] / r[index]["step_s"], 3) for r in ranks]
        print(json.dumps({"schedule": schedule, "pp": args.pp, "microbatches": m, "early_receives": not args.reference,
                          "step_ms": round(1000 * max(r[index]["step_s"] for r in ranks), 1),
                          "wait_share_per_rank": shares, "mean_wait_share": round(sum(shares) / len(shares), 3),
                          "analytic_bubble": round((args.pp - 1) / (m + args.pp - 1), 3)}))


if __name__ == "__main__":
    main()
