"""What a checkpoint holds, described by parameter name and slice, so any layout can load it.

Every saved tensor is a *piece*: (name, kind, full shape, tp split dim, tp rank, tp size, and a
flat range [lo, hi) inside that tp shard). Model weights and replicated Adam moments are whole tp
shards; ZeRO-1 moments are the flat segments a dp rank owns. Each full parameter is written once
(dp rank 0, tp rank 0 for replicated params, never the last stage's copy of the tied embedding),
and loading assembles, per parameter, the full tensor from the pieces of every file, then cuts
this rank's shard for the current layout. So a checkpoint saved at one (tp, pp, dp, ZeRO) loads
at any other; RNG states are restored only when the layout is the same.

The metadata lists the parameters in each file, so a rank opens only the files that hold its
parameters; files are memory-mapped, so it reads only the pages of the pieces it uses; and when the
saved tp size equals the current one, a rank's shard is assembled from its own tp rank's pieces
without building the full tensor (resharding builds the full tensor and cuts it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from megalm.model.init import shard_geometry
from megalm.parallel.data import ShardedAdamW, counted_once

MODEL_FIELDS = (
    "family", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size", "max_position_embeddings",
    "position_embedding", "layernorm_eps",
)


def named_params(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [(getattr(p, "init_name", n), p) for chunk in chunks for n, p in chunk.named_parameters()]


def _piece(name: str, param: nn.Parameter, kind: str, tensor: torch.Tensor, lo: int, hi: int, groups) -> dict:
    full_shape, _ = shard_geometry(param, groups.tp_rank, groups.tp_size)
    return {
        "name": name, "kind": kind, "full_shape": list(full_shape), "split_dim": getattr(param, "tp_split_dim", None),
        "tp_rank": groups.tp_rank, "tp_size": groups.tp_size, "lo": lo, "hi": hi,
        "tensor": tensor.detach().reshape(-1).to("cpu", copy=True),
    }


def collect_pieces(chunks: list[nn.Module], optimizer: Any, groups) -> list[dict]:
    """This rank's share of the weights and Adam moments, as pieces."""
    pieces = []
    sharded = isinstance(optimizer, ShardedAdamW)
    for name, param in named_params(chunks):
        if not counted_once(param, groups) or groups.dp_rank != 0:
            continue
        pieces.append(_piece(name, param, "param", param, 0, param.numel(), groups))
        if not sharded and param in optimizer.state:
            state = optimizer.state[param]
            for kind in ("exp_avg", "exp_avg_sq"):
                pieces.append(_piece(name, param, kind, state[kind], 0, param.numel(), groups))
    if sharded:
        names = {id(p): n for n, p in named_params(chunks)}
        for master, segment in zip(optimizer.masters, optimizer.segments):
            if not counted_once(segment.param, groups) or master not in optimizer.optimizer.state:
                continue
            if not optimizer.sharded and groups.dp_rank != 0:  # replicated over dp: dp rank 0 writes it
                continue
            state = optimizer.optimizer.state[master]
            tensors = {kind: state[kind] for kind in ("exp_avg", "exp_avg_sq")}
            if segment.param.dtype != torch.float32:  # the fp32 master of a bf16/fp16 parameter
                tensors["master"] = master
            for kind, tensor in tensors.items():
                pieces.append(
                    _piece(names[id(segment.param)], segment.param, kind, tensor, segment.param_lo, segment.param_hi, groups)
                )
    return pieces


def optimizer_steps(optimizer: Any) -> int:
    """How many optimizer steps the Adam states have seen (all parameters alike)."""
    inner = optimizer.optimizer if isinstance(optimizer, ShardedAdamW) else optimizer
    for state in inner.state.values():
        return int(state["step"])
    return 0


class PieceIndex:
    """Every piece of a checkpoint, by (name, kind), from memory-mapped rank files."""

    def __init__(self, path: Path, files: list[str] | dict[str, dict], names: set[str] | None = None,
                 always: tuple[str, ...] = ()) -> None:
        """Index `files` (names, or the metadata's {name: info}); with `names`, open only the files
        whose recorded parameters include one of them, plus the files in `always`."""
        self.pieces: dict[tuple[str, str], list[dict]] = {}
        self.payloads: dict[int, dict] = {}
        infos = files if isinstance(files, dict) else {name: {} for name in files}
        for name in sorted(infos):
            listed = infos[name].get("params")
            if names is not None and listed is not None and name not in always and not names.intersection(listed):
                continue
            payload = torch.load(path / name, map_location="cpu", mmap=True, weights_only=False)
            self.payloads[payload["rank"]] = payload
            for piece in payload["pieces"]:
                self.pieces.setdefault((piece["name"], piece["kind"]), []).append(piece)

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
        return _my_shard(self.full(name, kind), param, groups).clone()  # not a view that keeps the full tensor


def _my_shard(full: torch.Tensor, param: nn.Parameter, groups) -> torch.Tensor:
    """This rank's shard of `full`, adapted when the padded vocabulary size differs."""
    target_shape, offsets = shard_geometry(param, groups.tp_rank, groups.tp_size)
    if tuple(full.shape) != tuple(target_shape):
        # Only the padded vocabulary rows differ between layouts: copy what overlaps.
        resized = torch.zeros(target_shape, dtype=full.dtype)
        rows = min(full.shape[0], target_shape[0])
        resized[:rows] = full[:rows]
        full = resized
    split = getattr(param, "tp_split_dim", None)
    if split is None:
        return full
    return full.narrow(split, offsets[split], param.shape[split])


def restore(chunks: list[nn.Module], optimizer: Any, groups, index: PieceIndex, steps: int) -> None:
    """Load weights and Adam moments for this rank's shard, at the current layout."""
    sharded = isinstance(optimizer, ShardedAdamW)
    with torch.no_grad():
        for name, param in named_params(chunks):
            # fp32 masters, where saved, are the exact weights (the "param" pieces may be bf16/fp16).
            kind = "master" if (name, "master") in index.pieces else "param"
            param.copy_(index.shard(name, kind, param, groups))
        moments = {}
        for name, param in named_params(chunks):
            moments[param] = {kind: index.shard(name, kind, param, groups) for kind in ("exp_avg", "exp_avg_sq")}
        if not sharded:
            for param, state in moments.items():
                step = torch.tensor(float(steps), dtype=torch.float32)
                optimizer.state[param] = {"step": step, **{k: v.to(param.device) for k, v in state.items()}}
            return
        names = {id(p): n for n, p in named_params(chunks)}
        for master, segment in zip(optimizer.masters, optimizer.segments):
            lo, hi = segment.param_lo, segment.param_hi
            if master is not segment.param:  # an fp32 parameter without ZeRO is its own master
                name = names[id(segment.param)]
                saved = (name, "master") in index.pieces
                source = index.shard(name, "master", segment.param, groups) if saved else segment.param
                master.copy_(source.detach().reshape(-1)[lo:hi])
            state = moments[segment.param]
            optimizer.optimizer.state[master] = {
                "step": torch.tensor(float(steps), dtype=torch.float32),
                **{k: v.reshape(-1)[lo:hi].reshape(master.shape).to(master.device).clone() for k, v in state.items()},
            }


def model_differences(saved: dict, current: dict) -> list[str]:
    """The model fields that differ between a checkpoint's config and this run's."""
    return [
        f"model.{field}: checkpoint {saved.get(field)!r}, this run {current.get(field)!r}"
        for field in MODEL_FIELDS
        if saved.get(field) != current.get(field)
    ]
