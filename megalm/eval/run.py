"""`megalm eval`: load a checkpoint at any layout (evaluator.py), then report loss/perplexity on token
files, task accuracy, and lm-evaluation-harness tasks (harness.py), one line each on rank 0.

One process, or tp x pp x dp under torchrun: every rank loads its shard and takes part in every
forward; rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys

from megalm.config import ConfigError
from megalm.eval.evaluator import load_evaluator
from megalm.eval.tasks import DEFAULT_CONTENT_FREE, load_task

def cmd_eval(args: argparse.Namespace) -> int:
    """Load, then report loss/perplexity (--data or --split) and each task's accuracy, one JSON line each."""
    from megalm.distributed import build_parallel_groups, init_distributed, resolve_device
    from megalm.eval.world import NAME as WORLD, SEEN as WORLD_SEEN, world_task
    from megalm.topology import Topology

    tasks = [(name, None if name in (WORLD, WORLD_SEEN) else load_task(name)) for name in args.task]  # bad files: before loading
    harness = _harness_tasks(args) if args.lm_eval_tasks else []
    device = resolve_device(args.device)
    rank, world = init_distributed(device)
    groups = None
    if world > 1:
        if world % (args.tp * args.pp):
            raise ConfigError(f"--tp {args.tp} x --pp {args.pp} does not divide the world size {world}")
        groups = build_parallel_groups(Topology(args.tp, args.pp, world // (args.tp * args.pp)), rank, device)
    elif args.tp * args.pp > 1:
        raise ConfigError(f"--tp {args.tp} --pp {args.pp} needs {args.tp * args.pp} processes: run under torchrun")
    evaluator = load_evaluator(args.checkpoint, groups, args.tp, args.pp, args.batch_size, args.data, args.split,
                               args.tokenizer)
    lines = []
    if args.data or args.split is not None or not (tasks or harness):
        lines.append({"eval": "loss", "checkpoint": str(evaluator.checkpoint), **evaluator.loss(
            args.split_name, args.batches)})
    for name, examples in tasks:
        examples = world_task(args.world_seed, name == WORLD) if examples is None else examples
        if args.limit:
            examples = examples[:args.limit]
        result = evaluator.score_task(examples, args.shots, args.content_free, args.seed)
        lines.append({"eval": "task", "task": name, "checkpoint": str(evaluator.checkpoint), **result})
    if harness:
        from megalm.eval.harness import run_harness_tasks

        lines.extend(run_harness_tasks(evaluator, harness, args.lm_eval_include, args.shots, args.limit, args.seed))
    if rank == 0:
        for line in lines:
            if line["eval"] == "loss":
                print(f"eval: {line['split']} loss {line['loss']:.4f}, perplexity {line['perplexity']:.2f} "
                      f"({line['batches']} batches, {line['tokens']:,} tokens)")
            elif line["eval"] == "lm_eval":
                print(f"eval: lm_eval task {line['task']}: " + ", ".join(
                    f"{key} {value:.4f}" for key, value in line.items() if isinstance(value, float)))
            else:
                print(f"eval: task {line['task']}: {line['examples']} examples, {line['shots']}-shot: accuracy "
                      f"{line['sum']:.3f} (sum), {line['mean']:.3f} (mean); calibrated {line['sum_calibrated']:.3f} "
                      f"(sum), {line['mean_calibrated']:.3f} (mean); chance {line['chance']:.3f}")
            if args.json:
                print(json.dumps(line))
        sys.stdout.flush()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _harness_tasks(args: argparse.Namespace) -> list[str]:
    """The --lm-eval-tasks names; lm-evaluation-harness must be installed."""
    try:
        import megalm.eval.harness  # noqa: F401  (registers the lm_eval model "megalm")
    except ImportError as error:
        raise ConfigError(f"--lm-eval-tasks needs lm-evaluation-harness ({error}): pip install 'megalm[lmeval]'") from None
    return [name.strip() for name in args.lm_eval_tasks.split(",") if name.strip()]


def register_cli(subparsers) -> None:
    """Add `megalm eval CKPT [--data PREFIX ...] [--task FILE|world ...] [--shots K] [--tp N --pp N]`."""
    parser = subparsers.add_parser(
        "eval", help="loss/perplexity on token files and zero/few-shot task accuracy of a checkpoint (calibrated)")
    parser.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    parser.add_argument("--data", nargs="+", help="token file prefixes (megalm preprocess) to measure loss on; "
                        "default: the checkpoint's own data")
    parser.add_argument("--split", help="data.split for --data, e.g. 100 (all documents in train) or 98,1,1")
    parser.add_argument("--on", dest="split_name", choices=("train", "valid", "test"), default="valid",
                        help="which split the loss is measured on (default valid; with --split 100 use train)")
    parser.add_argument("--batches", type=int, help="global batches of loss (default train.eval_batches)")
    parser.add_argument("--task", action="append", default=[],
                        help="a JSONL task file (README: megalm eval), or 'world': the built-in corpus-world task on the "
                        "facts the corpus holds out ('world-seen': on the facts it states)")
    parser.add_argument("--shots", type=int, default=0, help="few-shot demonstrations before each example")
    parser.add_argument("--content-free", nargs="*", default=list(DEFAULT_CONTENT_FREE),
                        help="content-free inputs for contextual calibration (default: 'N/A' and '')")
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--world-seed", type=int, default=0, help="the corpus seed of the built-in world task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the few-shot demonstrations' choice")
    parser.add_argument("--tokenizer", help="override the checkpoint's data.tokenizer path")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences scored per forward")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (under torchrun)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (under torchrun)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", action="store_true", help="also print each result as a JSON line")
    parser.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks to run on the checkpoint "
                        "(needs the lmeval extra; one process or any tp x pp x dp under torchrun); --shots, --limit and --seed "
                        "apply to them too")
    parser.add_argument("--lm-eval-include", help="a folder of extra lm_eval task YAML files (TaskManager include_path)")
    parser.set_defaults(func=cmd_eval)
