"""Write a safetensors file one tensor at a time, so a converter never holds the whole model in memory.

`safetensors.torch.save_file` wants every tensor at once. The format is an 8-byte header length, a JSON header
(name -> dtype, shape, byte range) and the raw bytes; the byte ranges are relative to the end of the header,
so the data is written after room reserved for the header, and the header (padded with spaces, as the format
allows) is written last. Should it outgrow the room, the file is rewritten once behind a header of the right
size (a streamed copy, still one tensor's worth of memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ALIGN = 8
_ROOM_PER_TENSOR = 256  # a header entry is ~130 bytes for names like model.layers.27.mlp.down_proj.weight


class StreamingWriter:
    """Appends tensors to an open file behind `room` bytes kept for the header (see `streaming_safetensors`);
    `metadata` (str -> str) may still grow while tensors are added."""

    def __init__(self, handle: BinaryIO, room: int, metadata: dict[str, str]):
        self.handle, self.room, self.metadata = handle, room, metadata
        self.entries: dict[str, dict] = {}
        self.offset = 0
        handle.seek(8 + room)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries or name == "__metadata__":
            raise ValueError(f"duplicate tensor name {name!r}")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        end = self.offset + data.nbytes
        self.entries[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, end],
        }
        self.offset = end


@contextlib.contextmanager
def streaming_safetensors(
    path: Path, n_tensors: int, metadata: dict[str, str] | None = None
) -> Iterator[StreamingWriter]:
    """`with streaming_safetensors(path, n) as w: w.add(name, tensor)`; the file is complete on exit, and
    removed if the block raises. `n_tensors` only sizes the header's room (a wrong guess costs a copy)."""
    path = Path(path)
    metadata = {"format": "pt", **(metadata or {})}
    room = _padded(64 + 64 * len(metadata) + _ROOM_PER_TENSOR * max(n_tensors, 1))
    try:
        with open(path, "wb") as handle:
            writer = StreamingWriter(handle, room, metadata)
            yield writer
            entries = {"__metadata__": writer.metadata, **writer.entries}
            header = json.dumps(entries, separators=(",", ":")).encode()
            if len(header) <= room:
                handle.seek(0)
                handle.write(_header_block(header, room))
        if len(header) > room:
            _rewrite(path, header, room)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _rewrite(path: Path, header: bytes, old_room: int) -> None:
    staged = path.with_name(path.name + ".tmp")
    with open(path, "rb") as old, open(staged, "wb") as new:
        new.write(_header_block(header, _padded(len(header))))
        old.seek(8 + old_room)
        shutil.copyfileobj(old, new, 8 << 20)
    os.replace(staged, path)


def _header_block(header: bytes, room: int) -> bytes:
    return struct.pack("<Q", room) + header + b" " * (room - len(header))


def _padded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
