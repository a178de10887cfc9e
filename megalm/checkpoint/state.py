"""What a checkpoint holds, described by parameter name and slice, so any layout can load it.

Every saved tensor is a *piece*: (name, kind, full shape, tp split dim, tp rank, tp size, and a
flat range [lo, hi) inside that tp shard). Kinds: "param" (the model weight, what export reads),
"master" (the optimizer's fp32 master, saved only where it is a separate tensor of another dtype
than the weight, e.g. bf16 weights) and one kind per tensor the optimizer keeps per parameter
(exp_avg, exp_avg_sq, max_exp_avg_sq, ...). Each full parameter is written once (tp rank 0 for
replicated params, never the last stage's copy of the tied embedding), its tp shard split over the
dp ranks that hold it alike: dp rank d writes the d-th of dp equal flat ranges of the weight (and,
without ZeRO-1, of the master and optimizer tensors; with ZeRO-1 each dp rank writes the segment it
owns). Checkpoints from before the split (dp rank 0 wrote whole shards) are pieces too and load
unchanged. Loading assembles, per parameter, the full tensor from the pieces of
every file, then cuts this rank's shard for the current layout. So a checkpoint saved at one
(tp, pp, dp, ZeRO) loads at any other; RNG states are restored only when the layout is the same.

Optimizer state goes through the inner torch optimizer's own `state_dict()` / `load_state_dict()`,
which place each value where that optimizer wants it (torch fused or capturable AdamW: `step` on
the parameter's device). Scalars (a per-parameter `step` tensor in torch's AdamW, the group-level
`step` of apex FusedAdam) are equal across parameters and groups; they are checked and stored once
in the metadata (`optimizer_scalars`). `optimizer_view` is the one place that knows megalm's
optimizer classes.

The metadata lists the parameters in each file, so a rank's dp group opens only the files that hold
its parameters, each file once between them (`shared_index`: one dp rank reads, all receive); and when the
saved tp size equals the current one, a rank's shard is assembled from its own tp rank's pieces
without building the full tensor (resharding builds the full tensor and cuts it).
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from megalm.checkpoint.store import CheckpointError
from megalm.config import ModelConfig
from megalm.model.init import shard_geometry
from megalm.parallel.tensor import tp_shard
from megalm.parallel.data import counted_once
from megalm.parallel.optimizer import MixedPrecisionOptimizer

# ModelConfig fields that change no tensor (no parameter's shape, and not what its values mean): a
# checkpoint whose value differs resumes, and initialises a fine-tune. Every other field is compared
# (MODEL_FIELDS is derived from ModelConfig itself), so a field added later is checked until it is
# listed here with the reason it changes no tensor.
UNCHECKED_MODEL_FIELDS: dict[str, str] = {
    "hidden_dropout": "dropout is a training choice; no parameter depends on it",
    "attention_dropout": "dropout is a training choice; no parameter depends on it",
    "init_std": "draws a fresh model's weights; the checkpoint's weights replace them",
    "make_vocab_size_divisible_by": "pads the embedding with rows no token id reaches; loading re-pads them",
    "prefix_attention": "picks the PrefixLM attention kernel (FlexAttention or SDPA): same weights, same math",
}
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
MODEL_FIELDS = tuple(name for name in _MODEL_DEFAULTS if name not in UNCHECKED_MODEL_FIELDS)
EMBEDDING_NAME = "embedding.word.weight"  # megalm.model.gpt's
VOCAB_ROW_NAMES = (EMBEDDING_NAME, "output.weight")  # the parameters with padded vocabulary rows (output: untied)


def _as_used(model: dict) -> dict[str, Any]:
    """A model config dict's fields by the value they give the model, not as spelled: a field a
    checkpoint saved before it existed has its default; ffn_hidden_size is the MLP size (unset: 4 x
    hidden_size); max_position_embeddings and seq_length are the learned position table's rows (seq_length
    matters only as its default size); the other position kind's fields are None (they change no tensor)."""
    model = {ModelConfig.ALIASES.get(name, name): value for name, value in model.items()}  # layernorm_eps: norm_eps
    values = {name: model.get(name, default) for name, default in _MODEL_DEFAULTS.items()}
    values["ffn_hidden_size"] = values["ffn_hidden_size"] or 4 * values["hidden_size"]
    values["num_kv_heads"] = values["num_kv_heads"] or values["num_heads"]
    values["head_dim"] = values["head_dim"] or values["hidden_size"] // values["num_heads"]
    values["qkv_bias"] = values["bias"] if values["qkv_bias"] is None else values["qkv_bias"]
    rope = {"none": (), "linear": ("rope_factor",), "yarn": ("rope_factor", "rope_original_max_positions",
            "rope_attention_factor", "rope_beta_fast", "rope_beta_slow"),
            "llama3": ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions")}
    for name in (n for n in _MODEL_DEFAULTS if n.startswith("rope_") and n != "rope_scaling"):
        if name not in rope.get(values["rope_scaling"], ()):
            values[name] = None  # a field of another scaling kind changes no table
    learned = values["position_embedding"] == "learned"
    rows = values["max_position_embeddings"] or values["seq_length"]
    values["max_position_embeddings"] = values["seq_length"] = rows if learned else None
    values["rotary_base"] = None if learned else values["rotary_base"]
    return values


_POSITIONS = "learned position table rows (model.max_position_embeddings, or model.seq_length when unset)"
_WHAT = {  # how a difference in a field compared by its effect is named
    "ffn_hidden_size": "MLP hidden size (model.ffn_hidden_size, or 4 x hidden_size when unset)",
    "max_position_embeddings": _POSITIONS,
    "seq_length": _POSITIONS,
    "rotary_base": "model.rotary_base (rotary position frequencies)",
}


def named_params(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [(getattr(p, "init_name", n), p) for chunk in chunks for n, p in chunk.named_parameters()]


class HostCopies:
    """Where a save copies the pieces' tensors to host memory, with training stalled for the copy only.

    With CUDA, into pinned buffers kept from save to save (pinned memory is slow to allocate, and
    copies into it run asynchronously at full bandwidth; one synchronize ends them all). On CPU
    pinning is unavailable (and a device-to-host copy does not exist): the copies are ordinary
    clones, kept only with `keep` (an async save reuses them; a synchronous save frees them).
    Each piece gets a tensor of its own, so the file torch.save writes is the same either way.
    """

    def __init__(self, keep: bool = False) -> None:
        self.pinned = torch.cuda.is_available()
        self.keep = keep or self.pinned
        self.buffers: dict[tuple[str, str, str], torch.Tensor] = {}

    def copy(self, key: tuple[str, str, str], tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.detach().reshape(-1)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() != flat.numel() or buffer.dtype != flat.dtype:
            buffer = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=self.pinned)
            if self.keep:
                self.buffers[key] = buffer
        buffer.copy_(flat, non_blocking=self.pinned and flat.is_cuda)
        return buffer

    def synchronize(self) -> None:
        if self.pinned:
            torch.cuda.synchronize()


def dp_share(lo: int, hi: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """The part of the flat range [lo, hi) that dp rank `dp_rank` of `dp_size` writes (contiguous, balanced)."""
    size = hi - lo
    return lo + size * dp_rank // dp_size, lo + size * (dp_rank + 1) // dp_size


def _piece(name: str, param: nn.Parameter, kind: str, tensor: torch.Tensor, lo: int, hi: int, groups,
           host: HostCopies) -> dict:
    """A piece of (name, kind): `tensor` holds the flat range [lo, hi) of the parameter's tp shard."""
    full_shape, _ = shard_geometry(param, groups.tp_rank, groups.tp_size)
    shard, shards = tp_shard(param, groups.tp_rank, groups.tp_size)  # tp ranks, or key/value heads held by several
    return {
        "name": name, "kind": kind, "full_shape": list(full_shape), "split_dim": getattr(param, "tp_split_dim", None),
        "tp_rank": shard, "tp_size": shards, "lo": lo, "hi": hi,
        "tensor": host.copy((name, kind, str(lo)), tensor),
    }


class WholeParam(NamedTuple):
    """A master that holds the whole parameter (no ZeRO)."""

    param: nn.Parameter
    param_lo: int
    param_hi: int


class OptimizerView(NamedTuple):
    """What checkpoints need of an optimizer, whatever megalm class wraps it."""

    inner: torch.optim.Optimizer  # the torch optimizer whose params are `masters`
    masters: list[torch.Tensor]
    segments: list[Any]  # parallel to masters: .param, .param_lo, .param_hi (flat range the master holds)
    sharded: bool  # ZeRO-1: each dp rank holds part of the state and saves its own


def optimizer_view(optimizer: Any) -> OptimizerView:
    """(inner optimizer, masters, segments, sharded) of megalm's optimizer: the only class-specific code here."""
    if isinstance(optimizer, torch.optim.Optimizer):  # plain torch optimizer: each param is its own master
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return OptimizerView(optimizer, params, [WholeParam(p, 0, p.numel()) for p in params], False)
    if isinstance(optimizer, MixedPrecisionOptimizer):
        optimizer.wait_parameters()  # ZeRO-1: the weights read or written here must be gathered first
        return OptimizerView(optimizer.optimizer, list(optimizer.masters), list(optimizer.segments), optimizer.sharded)
    raise TypeError(f"megalm checkpoints do not know optimizer {type(optimizer).__qualname__}: extend optimizer_view()")


_RESERVED_KINDS = ("param", "master")


def _state_by_master(view: OptimizerView) -> tuple[dict[int, dict], list[dict]]:
    """The inner optimizer's state_dict(): per-master state (by id of the master) and its param groups."""
    saved = view.inner.state_dict()
    order = [p for group in view.inner.param_groups for p in group["params"]]
    return {id(order[index]): entry for index, entry in saved["state"].items()}, saved["param_groups"]


def _split_state(entry: dict, master: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors of the master's size, scalars) of one parameter's optimizer state."""
    tensors, scalars = {}, {}
    for key, value in entry.items():
        if torch.is_tensor(value) and value.dim() > 0:
            if value.numel() != master.numel():
                raise ValueError(
                    f"optimizer state {key!r} has shape {tuple(value.shape)} for a master of {master.numel()} "
                    f"elements: megalm checkpoints hold per-parameter tensors of the master's size and scalars only; "
                    f"use an optimizer whose state has that form (AdamW does)"
                )
            if key in _RESERVED_KINDS:
                raise ValueError(f"optimizer state {key!r} clashes with the checkpoint's piece kind of that name")
            tensors[key] = value
        else:
            scalars[key] = value
    return tensors, scalars


def _encode(value: Any) -> dict:
    """A scalar (number, or tensor of one element) as JSON, with what it takes to rebuild it."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"optimizer scalar state must have one element, not shape {tuple(value.shape)}")
        return {"value": value.reshape(-1)[0].item(), "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape)}
    return {"value": value}


def _decode(encoded: dict, device: torch.device | str = "cpu") -> Any:
    if "dtype" not in encoded:
        return encoded["value"]
    dtype = getattr(torch, encoded["dtype"])
    return torch.tensor(encoded["value"], dtype=dtype, device=device).reshape(encoded["shape"])


def _once(found: dict[str, dict], key: str, encoded: dict, where: str) -> None:
    if found.setdefault(key, encoded) != encoded:
        raise ValueError(
            f"optimizer scalar {key!r} differs between {where} ({found[key]} vs {encoded}); megalm saves it "
            f"once, so every parameter must have taken the same optimizer steps"
        )


def optimizer_scalars(optimizer: Any) -> dict[str, Any]:
    """The optimizer's scalar state, checked equal across this rank's parameters and groups, as JSON.

    {"class": inner optimizer class, "param": per-parameter scalars (torch AdamW's step), "group":
    param-group entries that are state rather than hyperparameters (not in `defaults`; apex's step)}.
    """
    view = optimizer_view(optimizer)
    states, param_groups = _state_by_master(view)
    per_param: dict[str, dict] = {}
    for master in view.masters:
        if id(master) in states:
            for key, value in _split_state(states[id(master)], master)[1].items():
                _once(per_param, key, _encode(value), "parameters")
    per_group: dict[str, dict] = {}
    defaults = set(view.inner.defaults) | {"params", "param_names"}
    for group in param_groups:
        if group["params"]:
            for key in sorted(set(group) - defaults):
                _once(per_group, key, _encode(group[key]), "param groups")
    cls = type(view.inner)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "param": per_param, "group": per_group}


def steps_of(scalars: dict[str, Any]) -> int:
    """Optimizer steps recorded in `optimizer_scalars` (per-parameter or group `step`), 0 before the first."""
    for place in ("param", "group"):
        if "step" in scalars.get(place, {}):
            return int(scalars[place]["step"]["value"])
    return 0


def saved_scalars(metadata: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's optimizer scalars; checkpoints before they were recorded held a per-parameter step."""
    if "optimizer_scalars" in metadata:
        return metadata["optimizer_scalars"]
    steps = int(metadata.get("optimizer_steps", 0))
    param = {"step": {"value": float(steps), "dtype": "float32", "shape": []}} if steps else {}
    return {"class": "torch.optim.adamw.AdamW", "param": param, "group": {}}


def _keeps_step_per_param(class_name: str) -> bool:
    """torch.optim's Adam/AdamW keep a `step` tensor per parameter; apex's (and DeepSpeed's) FusedAdam one per group."""
    return class_name.startswith("torch.optim.")


def _translate_step(saved: dict[str, Any], inner: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Saved (per-parameter, group) scalars, with `step` moved to where this optimizer class keeps it."""
    per_param, per_group = dict(saved.get("param", {})), dict(saved.get("group", {}))
    cls = type(inner)
    current = f"{cls.__module__}.{cls.__qualname__}"
    if saved.get("class") == current:
        return per_param, per_group
    steps = steps_of(saved)
    per_param.pop("step", None)
    per_group.pop("step", None)
    if steps and _keeps_step_per_param(current):
        per_param["step"] = {"value": float(steps), "dtype": "float32", "shape": []}
    elif steps:
        per_group["step"] = {"value": steps}
    return per_param, per_group


def collect_pieces(chunks: list[nn.Module], optimizer: Any, groups, host: HostCopies | None = None) -> list[dict]:
    """This rank's share of the weights, fp32 masters and per-parameter optimizer tensors, as pieces.

    Whatever the dp ranks of one (tp, pp) shard hold alike (the weights; without ZeRO, the masters
    and optimizer state too) is split over them: dp rank d writes the d-th of dp equal flat ranges
    of each tensor, so every rank writes about 1/dp of its shard instead of dp rank 0 all of it.
    ZeRO-1's state is each dp rank's own segment already. `host` receives the copies.
    """
    host = host or HostCopies()
    view = optimizer_view(optimizer)  # first: it waits for ZeRO-1's parameter gathers
    pieces = []

    def add(name, param, kind, tensor, lo, hi, replicated):
        if replicated:  # keep this dp rank's part of [lo, hi) only
            part_lo, part_hi = dp_share(lo, hi, groups.grad_rank, groups.grad_size)  # dp (x cp) ranks alike
            tensor, lo, hi = tensor.detach().reshape(-1)[part_lo - lo : part_hi - lo], part_lo, part_hi
        if hi > lo:
            pieces.append(_piece(name, param, kind, tensor, lo, hi, groups, host))

    for name, param in named_params(chunks):
        if counted_once(param, groups):
            add(name, param, "param", param, 0, param.numel(), True)
    states, _ = _state_by_master(view)
    names = {id(p): n for n, p in named_params(chunks)}
    for master, segment in zip(view.masters, view.segments):
        param, lo, hi = segment.param, segment.param_lo, segment.param_hi
        if not counted_once(param, groups):
            continue
        name = names[id(param)]
        if master is not param and master.dtype != param.dtype:  # same dtype: the weight holds the master's value
            add(name, param, "master", master, lo, hi, not view.sharded)
        if id(master) in states:
            for kind, value in sorted(_split_state(states[id(master)], master)[0].items()):
                add(name, param, kind, value, lo, hi, not view.sharded)
    host.synchronize()
    return pieces


def state_names(chunks: list[nn.Module], optimizer: Any) -> set[str]:
    """Names of the parameters whose optimizer state this rank holds (ZeRO-1: those of its segments)."""
    names = {id(p): n for n, p in named_params(chunks)}
    return {names[id(segment.param)] for segment in optimizer_view(optimizer).segments}


def load_rank_file(file: Path) -> dict:
    """A rank file's payload, unpickled with torch's weights-only loader (tensors and plain types only).

    A checkpoint is data: a file that asks the unpickler for anything else (a class, a function call)
    is refused with CheckpointError, never executed.
    """
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL (\S+?)[ ,.]* was not an allowed global", str(error))
        detail = f"it asks for {named.group(1)}" if named else str(error).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"{file} is not a plain megalm checkpoint file: {detail}, and megalm refuses to load anything but tensors "
            f"and plain types from a checkpoint; use a checkpoint written by megalm from a trusted source"
        ) from None


def needed_files(files: list[str] | dict[str, dict], names: set[str] | None = None, always: tuple[str, ...] = ()) -> list[str]:
    """The files (sorted) whose recorded parameters include one of `names` (all without `names`), and `always`."""
    infos = files if isinstance(files, dict) else {name: {} for name in files}
    out = []
    for name in sorted(infos):
        listed = infos[name].get("params")
        if names is None or listed is None or name in always or names.intersection(listed):
            out.append(name)
    return out


class PieceIndex:
    """Every piece of a checkpoint, by (name, kind), from memory-mapped rank files."""

    def __init__(self, path: Path, files: list[str] | dict[str, dict], names: set[str] | None = None,
                 always: tuple[str, ...] = ()) -> None:
        """Index `files` (names, or the metadata's {name: info}); with `names`, open only the files
        whose recorded parameters include one of them, plus the files in `always`."""
        self.pieces: dict[tuple[str, str], list[dict]] = {}
        self.payloads: dict[int, dict] = {}
        for name in needed_files(files, names, always):
            self.add(load_rank_file(path / name))

    def add(self, payload: dict) -> None:
        """Index one rank file's payload ({"rank", "pieces", "rng", ...})."""
        self.payloads[payload["rank"]] = payload
        for piece in payload["pieces"]:
            self.pieces.setdefault((piece["name"], piece["kind"]), []).append(piece)

    def value_kind(self, name: str) -> str:
        """The kind a parameter's value is read from: "master" where the checkpoint saved its fp32
        master (a bf16 or fp16 run), else "param"."""
        return "master" if (name, "master") in self.pieces else "param"

    def full(self, name: str, kind: str) -> torch.Tensor:
        """The full tensor of (name, kind) at its saved shape."""
        pieces = self.pieces.get((name, kind))
        if not pieces:
            raise KeyError(f"the checkpoint has no {kind} for parameter {name}")
        full = torch.zeros(pieces[0]["full_shape"], dtype=pieces[0]["tensor"].dtype)
        for piece in pieces:
            split, rank, size = piece["split_dim"], piece["tp_rank"], piece["tp_size"]
            region = full if split is None else full.narrow(split, rank * full.shape[split] // size, full.shape[split] // size)
            flat = region.contiguous().view(-1)
            flat[piece["lo"] : piece["hi"]] = piece["tensor"]
            region.copy_(flat.view_as(region))
        return full


    def shard(self, name: str, kind: str, param: nn.Parameter, groups) -> torch.Tensor:
        """This rank's tp shard of (name, kind) at the current layout, in memory of its own."""
        pieces = self.pieces.get((name, kind), [])
        target_shape, _ = shard_geometry(param, groups.tp_rank, groups.tp_size)
        mine = sorted((p for p in pieces if p["tp_rank"] == groups.tp_rank), key=lambda p: p["lo"])
        same_split = all(p["tp_size"] == groups.tp_size and list(p["full_shape"]) == list(target_shape) for p in pieces)
        if pieces and same_split and sum(p["hi"] - p["lo"] for p in mine) == param.numel():
            shard = torch.empty(param.shape, dtype=mine[0]["tensor"].dtype)
            flat = shard.view(-1)
            for piece in mine:
                flat[piece["lo"] : piece["hi"]] = piece["tensor"]
            return shard
        return _my_shard(self.full(name, kind), param, groups, name).clone()  # not a view that keeps the full tensor


def _readers(files: list[str], sizes: dict[str, int], count: int) -> dict[str, int]:
    """Which of `count` ranks reads each file: the largest files first, each to the least loaded."""
    load = [0] * count
    reader = {}
    for name in sorted(files, key=lambda n: (-sizes.get(n, 0), n)):
        chosen = min(range(count), key=lambda i: (load[i], i))
        reader[name] = chosen
        load[chosen] += sizes.get(name, 0)
    return reader


def shared_index(path: Path, files: dict[str, dict], names: set[str], state_names: set[str], group,
                 always: tuple[str, ...] = (), weights_only: bool = False) -> PieceIndex:
    """The pieces this rank restores from, each file read by one rank of `group` (its dp group).

    The dp ranks of a (tp, pp) shard need the same files (those holding their parameters, `names`).
    Each file is read by one of them (by bytes, balanced), which sends its pieces of `names` to the
    others (one broadcast per dtype and file reader), so the group reads each byte once instead of
    dp times. Every rank keeps the weights and masters, and the optimizer state of `state_names`
    only (ZeRO-1: the parameters of its own segments). `group` None (dp 1): read them all here.
    `weights_only`: the weights and masters alone (train.init_from), so no optimizer state is sent.
    """
    wanted = needed_files(files, names, always)
    index = PieceIndex(path, [])

    def keep(piece: dict) -> bool:
        return piece["name"] in names and (piece["kind"] in _RESERVED_KINDS or piece["name"] in state_names)

    if group is None:
        for name in wanted:
            payload = load_rank_file(path / name)
            index.add(dict(payload, pieces=[piece for piece in payload["pieces"] if keep(piece)]))
        return index
    import torch.distributed as dist

    me, count = dist.get_rank(group), dist.get_world_size(group)
    reader = _readers(wanted, {n: files[n].get("bytes", 0) for n in wanted}, count)
    for source in range(count):
        header: list[Any] = [None]
        if source == me:
            loaded = []
            for name in wanted:
                if reader[name] == me:
                    payload = load_rank_file(path / name)
                    loaded.append((payload, [
                        piece for piece in payload["pieces"]
                        if piece["name"] in names and (not weights_only or piece["kind"] in _RESERVED_KINDS)
                    ]))
            header[0] = [
                ({key: value for key, value in payload.items() if key != "pieces"},
                 [{key: value for key, value in piece.items() if key != "tensor"}
                  | {"dtype": str(piece["tensor"].dtype).removeprefix("torch."), "numel": piece["tensor"].numel()}
                  for piece in pieces])
                for payload, pieces in loaded
            ]
            tensors = [piece["tensor"] for _, pieces in loaded for piece in pieces]
        dist.broadcast_object_list(header, src=dist.get_global_rank(group, source), group=group)
        described = [piece for _, pieces in header[0] for piece in pieces]
        for dtype in sorted({piece["dtype"] for piece in described}):
            members = [i for i, piece in enumerate(described) if piece["dtype"] == dtype]
            if source == me:
                buffer = torch.cat([tensors[i].reshape(-1) for i in members])
            else:
                buffer = torch.empty(sum(described[i]["numel"] for i in members), dtype=getattr(torch, dtype))
            dist.broadcast(buffer, src=dist.get_global_rank(group, source), group=group)
            offset = 0
            for i in members:
                described[i]["tensor"] = buffer[offset : offset + described[i]["numel"]]
                offset += described[i]["numel"]
        kept = [(rest, [piece for piece in pieces if keep(piece)]) for rest, pieces in header[0]]
        dropped = sum(len(pieces) for _, pieces in header[0]) > sum(len(pieces) for _, pieces in kept)
        for rest, pieces in kept:
            for piece in pieces:
                del piece["dtype"], piece["numel"]
                if dropped:  # a tensor of its own, so that the buffers (and the dropped bytes) are freed
                    piece["tensor"] = piece["tensor"].clone()
            index.add(dict(rest, pieces=pieces))
    return index


def _my_shard(full: torch.Tensor, param: nn.Parameter, groups, name: str = "") -> torch.Tensor:
    """This rank's shard of `full`, adapted when the padded vocabulary size differs (and only then)."""
    target_shape, offsets = shard_geometry(param, groups.tp_rank, groups.tp_size)
    if tuple(full.shape) != tuple(target_shape):
        if name not in VOCAB_ROW_NAMES or tuple(full.shape[1:]) != tuple(target_shape[1:]):
            raise CheckpointError(
                f"parameter {name} has shape {tuple(full.shape)} in the checkpoint but {tuple(target_shape)} in "
                f"this model: only the padded vocabulary rows may differ; resume with the checkpoint's model config"
            )
        # Only the padded vocabulary rows differ between layouts: copy what overlaps.
        resized = torch.zeros(target_shape, dtype=full.dtype)
        rows = min(full.shape[0], target_shape[0])
        resized[:rows] = full[:rows]
        full = resized
    split = getattr(param, "tp_split_dim", None)
    if split is None:
        return full
    return full.narrow(split, offsets[split], param.shape[split])


def restore_weights(chunks: list[nn.Module], optimizer: Any, groups, index: PieceIndex) -> dict[int, tuple[str, torch.Tensor]]:
    """Load this rank's shard of the weights and the optimizer's masters at the current layout.

    Each parameter's value comes from its "master" pieces when the checkpoint has them, else from
    its "param" pieces; masters take their range of it, weights its cast to their dtype (what the
    optimizer step derives them by). optimizer None: the weights alone (generation, evaluation).
    Returns {id(param): (name, value)}.
    """
    view = optimizer_view(optimizer) if optimizer is not None else None
    values: dict[int, tuple[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, param in named_params(chunks):
            value = index.shard(name, index.value_kind(name), param, groups)
            param.copy_(value)
            values[id(param)] = (name, value)
        for master, segment in zip(view.masters, view.segments) if view is not None else ():
            if master is not segment.param:
                flat = values[id(segment.param)][1].reshape(-1)[segment.param_lo : segment.param_hi]
                master.copy_(flat.view_as(master))
    return values


def restore(chunks: list[nn.Module], optimizer: Any, groups, index: PieceIndex, scalars: dict[str, Any]) -> None:
    """Load weights, masters (`restore_weights`) and optimizer state for this rank's shard at the
    current layout. `scalars` is the checkpoint's `saved_scalars`.
    """
    view = optimizer_view(optimizer)
    values = restore_weights(chunks, optimizer, groups, index)
    kinds = sorted({kind for _, kind in index.pieces} - set(_RESERVED_KINDS))
    per_param, per_group = _translate_step(scalars, view.inner)
    if not kinds and not per_param and not per_group:
        return  # saved before the first optimizer step
    inner = view.inner
    position = {id(p): i for i, p in enumerate(p for group in inner.param_groups for p in group["params"])}
    state = {}
    for master, segment in zip(view.masters, view.segments):
        name = values[id(segment.param)][0]
        entry: dict[str, Any] = {key: _decode(encoded) for key, encoded in per_param.items()}
        for kind in kinds:
            full = index.shard(name, kind, segment.param, groups).reshape(-1)
            entry[kind] = full[segment.param_lo : segment.param_hi].reshape(master.shape).clone()
        state[position[id(master)]] = entry
    param_groups = inner.state_dict()["param_groups"]  # this run's hyperparameters
    for saved_group, group in zip(param_groups, inner.param_groups):
        if group["params"]:
            saved_group.update({key: _decode(value, group["params"][0].device) for key, value in per_group.items()})
    live = inner.param_groups  # the wrapper (MixedPrecisionOptimizer) holds this list: keep it and its dicts
    inner.load_state_dict({"state": state, "param_groups": param_groups})
    for group, loaded in zip(live, inner.param_groups):
        group.update(loaded)
    inner.param_groups = live


def model_differences(saved: dict, current: dict, fields: tuple[str, ...] = MODEL_FIELDS) -> list[str]:
    """The model fields (by the value they give the model) that differ between a checkpoint's config
    and this run's: one line each, naming the field."""
    theirs, ours = _as_used(saved), _as_used(current)
    if theirs["position_embedding"] != ours["position_embedding"]:  # reported; the kinds' own fields do not compare
        fields = tuple(name for name in fields if name not in ("max_position_embeddings", "seq_length", "rotary_base"))
    lines = [f"{_WHAT.get(name, f'model.{name}')}: checkpoint {theirs[name]!r}, this run {ours[name]!r}"
             for name in fields if theirs[name] != ours[name]]
    return list(dict.fromkeys(lines))  # seq_length and max_position_embeddings name the same rows
