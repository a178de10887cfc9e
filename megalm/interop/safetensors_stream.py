"""A safetensors file written one tensor at a time, so no more than one tensor is ever in memory.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON
header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
spaces to a multiple of 8 bytes, then the raw little-endian bytes of every tensor at its offsets.
The header needs every tensor's shape and dtype before the first byte of data, which an exporter
knows from a checkpoint's metadata alone; `StreamingSafetensorsWriter` takes them up front, then
each tensor in header order, writes its bytes straight from the tensor's memory (no copy) and
checks that what arrives is what was announced.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Optional

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                   torch.float64: torch.int64}


class StreamingSafetensorsWriter:
    """Write `path` from announced (name, shape, dtype) entries, then `write(name, tensor)` in that order."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Optional[dict[str, str]] = None) -> None:
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.entries = list(entries)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in self.entries:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self.total_bytes = 8 + len(encoded) + offset
        self.handle = open(self.part, "wb")
        self.handle.write(struct.pack("<Q", len(encoded)))
        self.handle.write(encoded)
        self.position = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next announced tensor's values (any layout; written as contiguous little-endian bytes)."""
        expected, shape, dtype = self.entries[self.position]
        if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"safetensors writer: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                             f"expected {expected} {tuple(shape)} {dtype}")
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            # Through numpy's buffer (bf16 as the int16 of its bits): the tensor's memory, not a copy.
            self.handle.write(memoryview(data.view(_SAME_WIDTH_INT[dtype]).numpy()).cast("B"))
        self.position += 1

    def close(self) -> None:
        """Check every announced tensor came, fsync and move the file into place."""
        if self.position != len(self.entries):
            self.handle.close()
            raise ValueError(f"safetensors writer: {len(self.entries) - self.position} tensors never written")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if self.part.stat().st_size != self.total_bytes:
            raise ValueError(f"safetensors writer: {self.part} has {self.part.stat().st_size} bytes, "
                             f"{self.total_bytes} expected")
        self.part.replace(self.path)

    def abort(self) -> None:
        self.handle.close()
        self.part.unlink(missing_ok=True)
