"""A checkpoint rank file written one tensor at a time, so an import holds one tensor, not the model.

A rank file is what `torch.save(payload)` writes: a zip archive of the pickled payload and one
uncompressed record per tensor storage (`archive/data/<key>`, keys numbered in the order pickling
meets the storages). `StreamedRankFile` is a writer for `CheckpointStore` that saves the payload with
torch's `skip_data` (placeholders made under FakeTensorMode take no memory: the file gets every
record, its bytes left to fill), then fills each record at its offset in the archive: a
placeholder's from the function that makes its tensor, any real tensor's (the RNG state) from
memory. torch.load reads the result as it reads any rank file (it does not check the records' CRCs,
which the skipped save could not compute; the checkpoint's own sha256 covers the file).
"""

from __future__ import annotations

import struct
import zipfile
from typing import Any, BinaryIO, Callable

import torch

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header: 30 bytes, then the name and the extra field


def placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of this shape and dtype that holds no memory, for a payload `StreamedRankFile` writes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(shape, dtype=dtype)


def _tensors_in_order(value: Any, out: list[torch.Tensor], seen: set[int]) -> list[torch.Tensor]:
    """The tensors of a payload of dicts, lists and tuples in the order pickling meets them."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen.add(id(value))
            out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _tensors_in_order(key, out, seen)
            _tensors_in_order(item, out, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors_in_order(item, out, seen)
    return out


def _record_offsets(path: str) -> dict[str, tuple[int, int]]:
    """{record name without the archive folder: (offset of its bytes, size)} of a torch.save zip."""
    offsets = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            handle.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
            start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
            offsets[info.filename.split("/", 1)[1]] = (start, info.file_size)
    return offsets


class StreamedRankFile:
    """A `CheckpointStore` writer: `producers[id(placeholder)]()` gives each placeholder's tensor when its turn comes."""

    def __init__(self, producers: dict[int, Callable[[], torch.Tensor]]) -> None:
        self.producers = producers

    def __call__(self, payload: dict[str, Any], handle: BinaryIO) -> None:
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(payload, handle)
        handle.flush()
        records = _record_offsets(handle.name)
        tensors = _tensors_in_order(payload, [], set())
        stored = sorted((name for name in records if name.startswith("data/")), key=lambda n: int(n.split("/")[1]))
        if len(stored) != len(tensors):
            raise RuntimeError(f"{handle.name}: {len(stored)} tensor records for {len(tensors)} tensors")
        for key, tensor in enumerate(tensors):
            offset, size = records[f"data/{key}"]
            value = self.producers[id(tensor)]() if id(tensor) in self.producers else tensor
            nbytes = value.numel() * value.element_size()
            if value.dtype != tensor.dtype or value.shape != tensor.shape or nbytes != size:
                raise RuntimeError(f"{handle.name}: record data/{key} is {size} bytes of {tensor.dtype} "
                                   f"{tuple(tensor.shape)}, got {value.dtype} {tuple(value.shape)}")
            handle.seek(offset)
            if nbytes:
                data = value.detach().contiguous()
                handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            del value
        handle.seek(0, 2)
