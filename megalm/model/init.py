"""Layout-independent initialization: a parameter's values depend only on (seed, name).

The full tensor of every parameter is defined tile by tile: tile (i, j) of a 2-D weight (and
block i of a 1-D one) is drawn from its own generator, seeded by a hash of (seed, name, i, j).
A rank fills its shard by drawing only the tiles that overlap it, so the same seed gives the
same full model at any tp or pp, no rank ever materialises more than its shard plus one tile,
and a model built on the meta device can be materialised shard by shard.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
from torch import nn

from megalm.parallel.tensor import tp_shard

TILE_2D = (512, 512)
BLOCK_1D = 1 << 16


def _tile_seed(seed: int, name: str, *index: int) -> int:
    text = f"{seed}/{name}/{'/'.join(map(str, index))}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _normal_tile(seed: int, name: str, shape: tuple[int, ...], *index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_tile_seed(seed, name, *index))
    return torch.randn(shape, generator=generator)


def fill_normal_shard_(
    local: torch.Tensor,
    full_shape: tuple[int, ...],
    offsets: tuple[int, ...],
    seed: int,
    name: str,
    std: float,
) -> None:
    """Fill `local`, the slice of the full tensor starting at `offsets`, with N(0, std^2) tiles."""
    if len(full_shape) == 1:
        tile_shape = (BLOCK_1D,)
    elif len(full_shape) == 2:
        tile_shape = TILE_2D
    else:
        raise ValueError(f"{name}: only 1-D and 2-D parameters are supported, got shape {full_shape}")
    ranges = [range(off // t, math.ceil((off + n) / t)) for off, n, t in zip(offsets, local.shape, tile_shape)]
    with torch.no_grad():
        for index in _product(ranges):
            tile = _normal_tile(seed, name, tile_shape, *index)
            # Overlap of this tile with the shard, in full-tensor coordinates.
            lo = [max(i * t, off) for i, t, off in zip(index, tile_shape, offsets)]
            hi = [min((i + 1) * t, off + n) for i, t, off, n in zip(index, tile_shape, offsets, local.shape)]
            src = tuple(slice(a - i * t, b - i * t) for a, b, i, t in zip(lo, hi, index, tile_shape))
            dst = tuple(slice(a - off, b - off) for a, b, off in zip(lo, hi, offsets))
            local[dst].copy_(tile[src].mul_(std))


def _product(ranges: list[range]):
    if len(ranges) == 1:
        return ((i,) for i in ranges[0])
    return ((i, j) for i in ranges[0] for j in ranges[1])


def init_kind(name: str) -> str:
    """'ones', 'zeros', 'scaled_normal' (residual output projections) or 'normal', from the name."""
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if "norm" in owner or owner.startswith("ln"):
        return "ones" if leaf == "weight" else "zeros"
    if leaf == "bias":
        return "zeros"
    if owner in ("proj", "fc2", "down"):  # the residual branch's output projections
        return "scaled_normal"
    return "normal"


def shard_geometry(param: nn.Parameter, tp_rank: int, tp_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(full shape, offsets of this shard) of a parameter marked by megalm.parallel.tensor."""
    split_dim: Optional[int] = getattr(param, "tp_split_dim", None)
    full = list(param.shape)
    offsets = [0] * param.dim()
    if split_dim is not None:
        shard, shards = tp_shard(param, tp_rank, tp_size)
        full[split_dim] *= shards
        offsets[split_dim] = shard * param.shape[split_dim]
    return tuple(full), tuple(offsets)


def initialize_parameters_(
    model: nn.Module, seed: int, init_std: float, num_layers: int, tp_rank: int, tp_size: int
) -> None:
    """Initialise every parameter of `model` (already on its device) from (seed, name) alone."""
    scaled_std = init_std / math.sqrt(2.0 * num_layers)
    for module_name, param in model.named_parameters():
        name = getattr(param, "init_name", module_name)
        kind = init_kind(name)
        with torch.no_grad():
            if kind == "ones":
                param.fill_(1.0)
            elif kind == "zeros":
                param.zero_()
            else:
                std = scaled_std if kind == "scaled_normal" else init_std
                full_shape, offsets = shard_geometry(param, tp_rank, tp_size)
                if param.device.type == "cpu" and param.dtype == torch.float32:
                    fill_normal_shard_(param.data, full_shape, offsets, seed, name, std)
                else:
                    staging = torch.empty(param.shape, dtype=torch.float32)
                    fill_normal_shard_(staging, full_shape, offsets, seed, name, std)
                    param.copy_(staging)
