"""Fine-tuning from weights (`train.init_from`): a checkpoint's model weights alone, at any layout.

`find_checkpoint(path)` names the checkpoint a path means: a checkpoint directory itself, or the
`latest` (else the newest complete) checkpoint of a run directory or of its `checkpoints/` directory.
`check_init_from` refuses, before any process group exists, a path that holds no checkpoint and a
checkpoint of another model (every differing field, on one line). `load_weights` restores the
weights and fp32 masters through the pieces that a resharding resume uses (so a checkpoint saved at
any (tp, pp, dp, ZeRO) loads at any other) and nothing else: no optimizer state, loss scale, data
position or RNG state, so the run starts at step 0 with a fresh optimizer and LR schedule.
`load_model_weights` does the same for model chunks without an optimizer (`megalm generate`).

Precision: a parameter's value is the checkpoint's fp32 master where it saved one (a bf16 or fp16
run), else its weight; the run's fp32 masters take that value and its weights the cast to their
dtype. A bf16 fine-tune of an fp32 checkpoint thus keeps the exact fp32 weights as its masters, and
an fp32 fine-tune of a bf16 run starts from that run's fp32 masters, not from its rounded weights.

What may differ from the source: the model family (an LM's weights fine-tuned as a PrefixLM: the
prefix is a mask, not weights), the model fields that change no tensor (checkpoint.state.
UNCHECKED_MODEL_FIELDS: dropout, init_std, vocabulary padding, the PrefixLM attention kernel), the data
(`data.kind`), the layout and everything outside the model config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megalm.checkpoint.state import MODEL_FIELDS, model_differences, named_params, restore_weights, shared_index
from megalm.checkpoint.store import LATEST, METADATA, STEP_NAME, CheckpointError, CheckpointStore
from megalm.config import Config, config_to_dict
from megalm.metrics import get_logger

# The model fields a fine-tune must share with its source: the shape-bearing ones of a resume, but
# not the attention masks (LM and PrefixLM, with or without per-document attention, have the same
# weights; only the attention mask, positions and loss differ).
MASK_FIELDS = ("family", "document_mask")
INIT_FIELDS = tuple(field for field in MODEL_FIELDS if field not in MASK_FIELDS)

_WHAT_TO_GIVE = "give a checkpoint directory (RUN/checkpoints/step_NNNNNNNN) or a run directory that has saved one"


def find_checkpoint(path: str | Path, what: str = "train.init_from") -> Path:
    """The checkpoint directory `path` names: itself when it holds metadata.json, else the `latest`
    (or, if that is missing, the newest complete) checkpoint of the run directory or checkpoints
    directory it names. CheckpointError, with what to give instead, when there is none; `what` names
    the setting or argument that gave the path."""
    given = Path(path)
    where = f"{what}={path}"
    if not given.exists():
        raise CheckpointError(f"{where} does not exist: {_WHAT_TO_GIVE}")
    if not given.is_dir():
        raise CheckpointError(f"{where} is a file, not a directory: {_WHAT_TO_GIVE}")
    if (given / METADATA).is_file():
        return given
    if STEP_NAME.fullmatch(given.name):
        raise CheckpointError(
            f"{where} is an incomplete checkpoint ({METADATA} is missing): name a complete one, e.g. the one "
            f"{given.parent / LATEST} names, or the run directory"
        )
    root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    store = CheckpointStore(root, rank=0)
    name = store.latest_name()
    if name is not None and (root / name / METADATA).is_file():
        return root / name
    complete = store.complete()
    if complete:
        return complete[0]
    raise CheckpointError(f"{where} holds no complete checkpoint (none in {root}): {_WHAT_TO_GIVE}")


def read_metadata(path: Path, what: str = "train.init_from") -> dict[str, Any]:
    """A checkpoint's metadata.json (sizes and checksums are verified when the weights are loaded)."""
    try:
        return json.loads((path / METADATA).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{what}: {path / METADATA} is unreadable: {error}") from None


def init_differences(metadata: dict[str, Any], config: Config, tokenizer=None) -> list[str]:
    """What keeps a checkpoint's weights from initialising this run's model (empty: nothing)."""
    out = model_differences(metadata["config"]["model"], config_to_dict(config)["model"], INIT_FIELDS)
    saved_hash = metadata.get("tokenizer_hash")
    if tokenizer is not None and saved_hash and saved_hash != tokenizer.hash:
        out.append(f"tokenizer hash: checkpoint {saved_hash[:12]}, this run {tokenizer.hash[:12]} (data.tokenizer)")
    return out


def _refusal(path: Path, differences: list[str]) -> CheckpointError:
    return CheckpointError(
        f"train.init_from: {path} holds another model than this run's: {'; '.join(differences)}; set these to the "
        f"checkpoint's values (its config is in {path / METADATA}) or name a checkpoint of this model"
    )


def will_resume(run_dir: Path) -> bool:
    """Whether the run directory has checkpoints of its own, which a (non --no-resume) start resumes
    instead of loading train.init_from."""
    store = CheckpointStore(Path(run_dir) / "checkpoints", rank=0)
    return bool(store.complete()) or (store.root / LATEST).exists()


def check_init_from(config: Config, tokenizer=None) -> Path:
    """The checkpoint train.init_from names, checked against this run's model before any process
    group exists: one line naming every differing field, or a path that holds no checkpoint."""
    path = find_checkpoint(config.train.init_from)
    differences = init_differences(read_metadata(path), config, tokenizer)
    if differences:
        raise _refusal(path, differences)
    return path


def load_weights(trainer, source: str, share_group=None) -> tuple[Path, dict[str, Any]]:
    """Load the weights (and fp32 masters) of the checkpoint `source` names into `trainer`'s model,
    at its layout; every rank calls this together. Returns (checkpoint path, its metadata).

    `share_group`: the dp group whose ranks share the file reads (checkpoint.shared_read), or None.
    """
    return load_initial_weights(trainer.chunks, trainer.optimizer, trainer.groups, trainer.config, trainer.tokenizer,
                                source, share_group)


def load_initial_weights(chunks, optimizer, groups, config: Config, tokenizer, source: str,
                         share_group=None) -> tuple[Path, dict[str, Any]]:
    """load_weights before a trainer exists: the DeepSpeed engine takes the weights as they are when it
    wraps the model (ZeRO copies them into its own fp32 partitions), so train.init_from loads them first.
    Logs where they came from (describe_source) and how long the load took."""
    start = time.perf_counter()
    path, metadata = _open_together(source, groups, "train.init_from")
    differences = init_differences(metadata, config, tokenizer)
    if differences:
        raise _refusal(path, differences)
    _restore(chunks, optimizer, groups, path, metadata, share_group)
    get_logger().info(f"{describe_source(path, metadata, config)} ({time.perf_counter() - start:.2f} s)")
    return path, metadata


def _open_together(source: str | Path, groups, what: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint `source` names, chosen by rank 0 and verified by every rank together."""
    path = find_checkpoint(source, what)
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank loads rank 0's choice, even if
        chosen = [str(path)]  # the source run committed a newer checkpoint meanwhile
        dist.broadcast_object_list(chosen, src=0, group=groups.control_group)
        path = Path(chosen[0])
    store = CheckpointStore(path.parent, groups.rank, group=groups.control_group)
    metadata, problem = store.verify_together(path)
    if problem is not None:
        raise CheckpointError(f"{what}: {problem}; name another checkpoint directory of the source run")
    return path, metadata


def _restore(chunks, optimizer, groups, path: Path, metadata: dict[str, Any], share_group) -> None:
    index = shared_index(
        path, metadata["files"], names={name for name, _ in named_params(chunks)}, state_names=set(),
        group=share_group, weights_only=True,
    )
    restore_weights(chunks, optimizer, groups, index)


def load_model_weights(chunks, groups, source: str | Path, what: str = "checkpoint") -> tuple[Path, dict[str, Any]]:
    """Load the weights of the checkpoint `source` names (as find_checkpoint) into model chunks built
    at any layout, without an optimizer: generation and evaluation. Every rank calls this together;
    the files are verified first. Returns (checkpoint path, its metadata)."""
    path, metadata = _open_together(source, groups, what)
    _restore(chunks, None, groups, path, metadata, None)
    return path, metadata


def describe_source(path: Path, metadata: dict[str, Any], config: Config) -> str:
    """One line on where a fine-tune's weights came from, for the start-up log."""
    layout = metadata.get("layout", {})
    saved = metadata["config"]
    notes = [
        f"step {metadata['step']} of its run",
        f"saved at tp {layout.get('tp')} x pp {layout.get('pp')} x dp {layout.get('dp')}",
        f"{saved['train']['precision']} -> {config.train.precision}",
    ]
    for name in MASK_FIELDS:
        before = saved["model"].get(name, False)  # document_mask: absent from checkpoints older than it
        if before != getattr(config.model, name):
            notes.append(f"model.{name} {before} -> {getattr(config.model, name)}")
    if saved["data"]["kind"] != config.data.kind:
        notes.append(f"data.kind {saved['data']['kind']} -> {config.data.kind}")
    return (
        f"initialised the model weights from {path} ({', '.join(notes)}): starting at step 0 with a fresh "
        f"optimizer, LR schedule and data position"
    )

