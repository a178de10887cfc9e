"""megalm command line: parse, build, call. `megalm --help` lists every command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from megalm.checkpoint.store import CheckpointError
from megalm.config import Config, ConfigError, config_to_yaml, load_config, validate
from megalm.data.indexed import DatasetFormatError
from megalm.data.pipeline import DataError
from megalm.data.tokenizer import TokenizerError
from megalm.faults import FaultSpecError
from megalm.fsutil import PathError, check_run_dir, describe_write_error, os_error_in
from megalm.plan.report import periodic_save_warning
from megalm.topology import Topology


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 parallel.tp=2")


def _world_size(config: Config, requested: Optional[int], dry_run: bool) -> int:
    """torchrun's WORLD_SIZE; for a dry run, --world-size or the config's own tp x pp x dp."""
    if requested is not None:
        return requested
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if dry_run and config.parallel.dp is not None:
        return config.parallel.tp * config.parallel.pp * config.parallel.dp
    return 1


def _load(args: argparse.Namespace, dry_run: bool) -> tuple[Config, Topology]:
    config = load_config(args.config, args.overrides)
    return config, validate(config, _world_size(config, getattr(args, "world_size", None), dry_run))


def check_before_start(config: Config, run_dir: Path, resume: bool = True):
    """Everything that can be refused without a process group, so that a mistake costs one clear line
    and no GPU time: MEGALM_FAULT, the device, the run directory (a file, not writable), the data
    (missing or corrupt token files, another tokenizer) and train.init_from (no checkpoint there, or
    one of another model; unless the run resumes its own). Returns (device, data sources)."""
    from megalm.checkpoint.weights import check_init_from, will_resume
    from megalm.data.pipeline import build_sources
    from megalm.distributed import resolve_device
    from megalm.faults import check_fault_env

    check_fault_env()
    config.log.check_packages()
    device = resolve_device(config.train.device)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one probe per node: its ranks share the filesystem
        check_run_dir(run_dir)
    sources = build_sources(config)
    if config.train.init_from is not None and not (resume and will_resume(run_dir)):
        check_init_from(config, sources.tokenizer)
    return device, sources


def cmd_train(args: argparse.Namespace) -> int:
    """Validate, then (unless --dry-run) start the process groups and train."""
    if args.world_size is not None and not args.dry_run:
        raise ConfigError("--world-size only applies to --dry-run: torchrun sets the world size of a real run")
    config, topology = _load(args, args.dry_run)
    if args.dry_run:
        from megalm.train import dry_run_report

        config.log.check_packages()  # a real run checks them in check_before_start
        print(config_to_yaml(config))
        print(dry_run_report(config, topology))
        warning = periodic_save_warning(config, topology.world_size)
        if warning:
            print(f"megalm: {warning}", file=sys.stderr)
        return 0

    import faulthandler

    import torch

    from megalm.distributed import allow_tf32, build_parallel_groups, describe_failed_collective, init_distributed
    from megalm.metrics import describe_out_of_memory, setup_logging

    # A crash in native code (SIGSEGV, SIGABRT from a C++ terminate) prints every thread's Python
    # stack, so a dead rank in a thousand-GPU job says where it was.
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, OSError, ValueError):  # stderr without a file descriptor (captured)
        pass
    from megalm.train import NonFiniteLossError, build_trainer, write_resolved_config

    run_dir = Path(args.run_dir or config.train.run_dir)
    device, sources = check_before_start(config, run_dir, resume=not args.no_resume)
    allow_tf32(device, config.train.precision)
    rank, _ = init_distributed(device, config.train.collective_timeout_s)
    global _ranks_differ
    _ranks_differ = True  # from here on an error may be this rank's own: every rank reports its own
    from megalm.checkpoint.lock import lock_run_dir

    # One job per run directory: rank 0 locks it and every rank learns the verdict before any
    # group is built or any file written (see checkpoint/lock.py); the lock lives as long as we do.
    try:
        run_lock = lock_run_dir(run_dir, rank)
    except CheckpointError as error:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if rank == 0:  # every rank got rank 0's verdict: say it once
            print(f"megalm: error: {error}", file=sys.stderr, flush=True)
        return 2
    logger = setup_logging(rank, config.log.all_ranks)
    groups = build_parallel_groups(
        topology, rank, device, config.train.collective_timeout_s, control_timeout_s=config.checkpoint.timeout_s
    )
    if rank == 0:
        logger.info("resolved config:\n" + config_to_yaml(config))
        logger.info(f"config written to {write_resolved_config(config, run_dir)}")
        warning = periodic_save_warning(config, topology.world_size)
        if warning:
            logger.warning(warning)
    trainer = build_trainer(config, groups, run_dir, sources)
    from megalm.checkpoint import Checkpointer

    checkpointer = None
    start_step = 0
    if config.train.engine == "megalm":
        checkpointer = Checkpointer(trainer, run_dir)
        # Resume the run's own checkpoint, else load train.init_from's weights (if set) at step 0; with
        # --no-resume an earlier run's checkpoints are moved aside first, never mixed in.
        start_step = checkpointer.start(resume=not args.no_resume)
        checkpointer.install_signal_handler()
    else:
        logger.warning("train.engine=deepspeed: megalm checkpoints and resume are not available with this engine")
    code = 0
    try:
        trainer.fit(start_step=start_step, checkpointer=checkpointer)
        if checkpointer is not None and checkpointer.stopped_on_signal:
            from megalm.stop_marker import write_clean_stop_marker

            write_clean_stop_marker()  # tells megalm.launch that this worker stopped cleanly
    except NonFiniteLossError as error:
        logger.error(f"rank {rank}: {error}")
        code = 3
    except CheckpointError as error:
        # A failed save (a full disk): every rank learned every rank's outcome before raising, so
        # rank 0 says it once; nothing was committed and the previous checkpoint is intact.
        if rank == 0:
            print(f"megalm: error: {error}", file=sys.stderr, flush=True)
        code = 2
    except torch.OutOfMemoryError as error:
        # A RuntimeError too, but not a failed collective: say so, with the memory figures. This
        # rank's peers then fail their next collective (reported as such) and exit. A restart
        # would run out of memory again, so the exit code says "do not retry": 4.
        print(
            f"megalm: rank {rank}: {describe_out_of_memory(device, trainer.current_step)}; "
            f"the error: {str(error).splitlines()[0][:500]}",
            file=sys.stderr,
            flush=True,
        )
        if "WORLD_SIZE" in os.environ:
            _exit_worker(OUT_OF_MEMORY_EXIT)
        code = OUT_OF_MEMORY_EXIT
    except RuntimeError as error:
        if "WORLD_SIZE" not in os.environ:
            raise
        # A peer died or hangs: say where, and exit at once (tearing down would wait on the dead
        # peer) so that torchrun restarts the job, which resumes from the last checkpoint.
        print(
            f"megalm: rank {rank}: a collective failed or timed out (train.collective_timeout_s="
            f"{config.train.collective_timeout_s:g}) during step {trainer.current_step}: "
            f"{describe_failed_collective(error, groups)}: {str(error).splitlines()[0][:500]}; another rank "
            f"died or is hung; exiting so torchrun can restart from the last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        _exit_worker(1)
    finally:
        trainer.metrics.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if run_lock is not None:
            run_lock.close()  # releases the run directory (the OS would, at exit, anyway)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _exit_worker(code)
    return code


OUT_OF_MEMORY_EXIT = 4  # distinct from a failed collective (1) and a non-finite loss (3)


def _exit_worker(code: int) -> None:
    """End a torchrun worker without the interpreter's teardown: after a clean finish, once
    everything is saved and closed, and after a failed collective (tearing down would wait on the
    dead or hung peer).

    In 2 of 38 two-node test runs a worker that had finished cleanly (checkpoint committed,
    process group destroyed) aborted during interpreter teardown with "terminate called without an
    active exception" from native code, with no Python frame on the stack. torchrun then reports the
    job as failed and the other nodes wait in its exit barrier for minutes. Nothing is left to do at
    this point, so the worker flushes its streams and exits without tearing down.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_check(args: argparse.Namespace) -> int:
    args.dry_run = True
    return cmd_train(args)


def cmd_convert(args: argparse.Namespace) -> int:
    """One consolidated file of full tensors from a sharded checkpoint (any layout)."""
    from megalm.checkpoint import export_consolidated
    from megalm.checkpoint.weights import find_checkpoint

    output = Path(args.output)
    if output.is_dir():
        raise PathError(f"convert output {output} is a directory: give the file to write, e.g. {output / 'model.pt'}")
    if not output.parent.is_dir():
        raise PathError(
            f"cannot write {output}: the directory {output.parent} does not exist; create it first "
            f"(mkdir -p {output.parent}) or choose another output path"
        )
    try:
        summary = export_consolidated(find_checkpoint(args.checkpoint, what="checkpoint"), output)
    except (OSError, RuntimeError) as error:
        if isinstance(error, CheckpointError) or os_error_in(error) is None:
            raise
        raise PathError(f"writing {output} failed: {describe_write_error(error)}") from None
    print(f"wrote {args.output}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
          f"{summary['bytes'] / 2**20:.1f} MiB; `megalm import {args.output} RUN_DIR` makes it a megalm checkpoint again")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A transformers directory (GPT-2, or Llama / Qwen2 / Mistral) from a checkpoint of any layout, streamed tensor by tensor."""
    from megalm.interop.hf import export_model, parse_size

    summary = export_model(args.checkpoint, args.output, format=args.format, family=args.family, dtype=args.dtype,
                           tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer,
                           max_shard_size=parse_size(args.max_shard_size),
                           log=lambda message: print(f"megalm: {message}"))
    tokenizer = "with its tokenizer" if summary["tokenizer"] else "without a tokenizer (the checkpoint has none)"
    label = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[summary["family"]]
    print(f"wrote {args.output}: {label} of step {summary['step']} of {summary['checkpoint']}, "
          f"{summary['tensors']} tensors, {summary['parameters']:,} parameters in {summary['dtype']}, {tokenizer}; "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.output)!r})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """A megalm run directory (checkpoint at step 0) from a transformers directory or a convert file."""
    from megalm.interop.hf import import_model

    summary = import_model(args.source, args.output, family=args.family, seq_length=args.seq_length)
    print(f"wrote {summary['checkpoint']}: {summary['family']} of {summary['parameters']:,} parameters"
          f"{', tokenizer ' + str(summary['tokenizer']) if summary['tokenizer'] else ''}; fine-tune it with "
          f"train.init_from={args.output}, or resume it with `megalm train {summary['config']} --run-dir {args.output}`")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from megalm.bench import run_bench

    config, topology = _load(args, dry_run=False)
    return run_bench(config, topology, args)


def _wide_help(prog: str) -> argparse.HelpFormatter:
    """Help with each command's description on one line, whatever the terminal's width."""
    return argparse.HelpFormatter(prog, max_help_position=30, width=200)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalm", formatter_class=_wide_help,
        description="3D-parallel (tensor x pipeline x data) GPT training: LM and PrefixLM, from a tiny CPU model to Yuan 245B.",
        epilog="`megalm COMMAND --help` shows a command's options; docs/config.md lists every config key.",
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands")

    train = sub.add_parser("train", help="train a config (single process or under torchrun)")
    _add_config_args(train)
    train.add_argument("--dry-run", action="store_true", help="validate and print the layout, do not train")
    train.add_argument("--world-size", type=int, help="world size to validate against (dry run)")
    train.add_argument("--run-dir", help="override train.run_dir")
    train.add_argument(
        "--no-resume", action="store_true",
        help="start from step 0; an earlier run's checkpoints are moved to checkpoints.old-<UTC time>/",
    )
    train.set_defaults(func=cmd_train)

    check = sub.add_parser("check", help="same as train --dry-run")
    _add_config_args(check)
    check.add_argument("--world-size", type=int, help="world size to validate against")
    check.set_defaults(func=cmd_check, run_dir=None, no_resume=True)

    convert = sub.add_parser("convert", help="export a sharded checkpoint as one file of full tensors (megalm import reads it)")
    convert.add_argument("checkpoint", help="a checkpoint or run directory, e.g. runs/x/checkpoints/step_00001000")
    convert.add_argument("output", help="the .pt file to write")
    convert.set_defaults(func=cmd_convert)

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers directory")
    export.add_argument("checkpoint", help="a checkpoint or run directory, saved at any layout")
    export.add_argument("output", help="the directory to write (new or empty)")
    export.add_argument("--format", choices=["hf", "gpt2"], default="hf",
                        help="hf: the transformers family of the model (GPT-2 for a GPT-2-shaped model, else the "
                             "Llama family it was imported from); gpt2: transformers GPT-2")
    export.add_argument("--family", choices=["llama", "qwen2", "mistral"],
                        help="Llama-family models: default the family it was imported from, else qwen2 for q/k/v "
                             "biases alone, else llama")
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the run's train.precision")
    export.add_argument("--max-shard-size", default="5GB", help="safetensors shards of at most this size (default 5GB)")
    export.add_argument("--tokenizer", help="the run's tokenizer (.model, or a directory with tokenizer.json) when "
                                            "its data.tokenizer path moved")
    export.add_argument("--no-tokenizer", action="store_true", help="write the model alone")
    export.set_defaults(func=cmd_export)

    importer = sub.add_parser("import", help="make a megalm checkpoint from a transformers directory or a convert file")
    importer.add_argument("source", help="a transformers GPT-2, Llama, Qwen2 or Mistral directory (safetensors), "
                                         "or the .pt file `megalm convert` wrote")
    importer.add_argument("output", help="the run directory to write (new or empty)")
    importer.add_argument("--family", choices=["lm", "prefixlm"], help="default: the source's (lm)")
    importer.add_argument("--seq-length", type=int,
                          help="Llama family: model.seq_length (default: max_position_embeddings, or the sliding "
                               "window when smaller)")
    importer.set_defaults(func=cmd_import)

    bench = sub.add_parser("bench", help="time training steps against a plain PyTorch GPT of the same shape")
    _add_config_args(bench)
    bench.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    bench.add_argument("--no-baseline", action="store_true",
                       help="skip the plain PyTorch baseline (and the transformers GPT-2)")
    bench.add_argument("--no-transformers", action="store_true",
                       help="skip Hugging Face transformers' GPT-2 (timed when transformers is installed)")
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.set_defaults(func=cmd_bench)

    from megalm.generate import register_cli as register_generate

    register_generate(sub)  # megalm generate CKPT --prompt TEXT ... [--tp N --pp N under torchrun]

    from megalm.eval.run import register_cli as register_eval

    register_eval(sub)  # megalm eval CKPT [--data PREFIX] [--task FILE|world] [--shots K] [--tp N --pp N]

    from megalm.plan.report import register_cli as register_plan

    register_plan(sub)  # megalm plan CONFIG --cluster NAME --gpus N [--search] ...

    from megalm.config_doc import register_cli as register_config_doc

    register_config_doc(sub)  # megalm config-doc [--output docs/config.md | --check docs/config.md]

    # Data commands live beside their code; each module adds its own sub-parser.
    from megalm.data import corpus, inspect, preprocess, tokenizer

    tokenizer.register_cli(sub)  # megalm tokenizer train ...
    preprocess.register_cli(sub)  # megalm preprocess ...
    data = sub.add_parser("data", help="look at and generate data").add_subparsers(dest="data_command", required=True)
    inspect.register_cli(data)  # megalm data inspect ...
    corpus.register_cli(data)  # megalm data corpus ...
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, accepting `section.field=value` overrides after options too (`train CFG --run-dir X a.b=1`):
    argparse alone stops filling the overrides at the first option and rejects what follows."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


_ranks_differ = False  # set once this process joined the job's process group


def _say(message: str) -> None:
    """Print an error once per node (local rank 0) rather than once per rank when it was found before
    the process group: the ranks of a node then meet it alike (the same config, files, device kind).
    After that, an error can be one rank's own (a shard file it cannot read), so every rank reports it;
    errors that all ranks agree on there (a refused lock, a failed save) are printed by rank 0 alone."""
    if _ranks_differ or os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


# The errors that mean "the user asked for something that cannot work": one line each, no traceback.
_USER_ERRORS: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    ((ConfigError,), "config error"),
    ((DataError, DatasetFormatError, TokenizerError), "data error"),
    ((CheckpointError, PathError, FaultSpecError), "error"),
)


def describe_error(error: BaseException) -> Optional[str]:
    """The one-line report of a user error, or None for anything else (a bug: let it trace back)."""
    for kinds, label in _USER_ERRORS:
        if isinstance(error, kinds):
            return f"megalm: {label}: {error}"
    return None


def check_launch(argv: Sequence[str], world_size: Optional[int]) -> Optional[str]:
    """The launcher's check of a `megalm train` command line before any worker starts (megalm.launch):
    the one-line report of what would make every worker fail, or None. `world_size` is None when
    the launcher cannot know it (an elastic node range); the workers then check the layout."""
    args = parse_args(build_parser(), argv)  # a usage error exits here, printed once
    if args.command != "train" or args.dry_run or args.world_size is not None:
        return None  # nothing to launch workers for, or a mistake each worker reports alike
    try:
        config = load_config(args.config, args.overrides)
        if world_size is not None:
            validate(config, world_size)
        check_before_start(config, Path(args.run_dir or config.train.run_dir), resume=not args.no_resume)
    except Exception as error:  # noqa: BLE001 - anything else is a bug: let it trace back
        message = describe_error(error)
        if message is None:
            raise
        return message
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    global _ranks_differ
    _ranks_differ = False
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C before training installed its save-and-stop handler
        _say("megalm: interrupted before training started; nothing to save")
        return 130
    except Exception as error:
        message = describe_error(error)
        if message is None:
            raise
        _say(message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
