"""Tensors a model dir keeps in the GGUF's own quantized blocks, and turning them back into floats at load.

A 1.5B model's output layer (Qwen2.5-Coder: 151936 x 1536, untied from the embedding) is 467 MB in bfloat16
but 191 MB as the GGUF's Q6_K blocks. Such a tensor is stored raw in `BLOCKS_FILE` beside model.safetensors: a
uint8 tensor of the GGUF's bytes (rows x bytes per row) under the Hugging Face name, its GGUF type and float
shape in the file's metadata. Loading dequantizes it with the `gguf` package a slice of rows at a time (the
blocks of a row are independent), rounding each slice to bfloat16 exactly as the conversion to 16-bit did, so
a model loads the same weights whichever way its dir stores them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

BLOCKS_FILE = "gguf_blocks.safetensors"  # not model*.safetensors: transformers alone never reads it
_CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32 per slice: a whole 233M-element tensor at once takes 5x as long


def info(gguf_type: str, shape: tuple[int, ...]) -> str:
    """The metadata entry recorded for one raw tensor."""
    return json.dumps({"gguf_type": gguf_type, "shape": list(shape)})


def dequantize_to_bf16(blocks: Any, gguf_type: str, shape: tuple[int, ...]) -> Any:
    """The float tensor of `shape` that raw GGUF `blocks` (uint8, a row of blocks per row) hold, each value
    rounded once from the float32 dequantization to bfloat16 (a torch tensor, bfloat16)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_from_byte_shape

    qtype = GGMLQuantizationType[gguf_type]
    rows = np.asarray(blocks, dtype=np.uint8).reshape(-1, blocks.shape[-1])
    row_length = quant_shape_from_byte_shape(rows.shape, qtype)[-1]
    if row_length != shape[-1] or rows.shape[0] * row_length != math.prod(shape):
        raise ValueError(f"{gguf_type} blocks shaped {tuple(blocks.shape)} cannot hold {list(shape)} values")
    out = torch.empty((rows.shape[0], shape[-1]), dtype=torch.bfloat16)
    step = max(1, _CHUNK_ELEMENTS // shape[-1])
    for start in range(0, rows.shape[0], step):
        part = dequantize(rows[start : start + step], qtype)
        out[start : start + step].copy_(torch.from_numpy(part))  # rounds as .to(torch.bfloat16) would
    return out.view(shape)


class RawBlocks:
    """The raw tensors of a model dir's `BLOCKS_FILE`, dequantized on request (read by pread, not mapped)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._handle = safe_open(path, framework="pt", backend="pread")
        meta = self._handle.metadata() or {}
        self._info = {name: json.loads(meta[name]) for name in self._handle.keys()}  # noqa: SIM118

    @classmethod
    def of_dir(cls, model_dir: Path) -> RawBlocks | None:
        path = Path(model_dir) / BLOCKS_FILE
        return cls(path) if path.is_file() else None

    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def gguf_type(self, name: str) -> str:
        return str(self._info[name]["gguf_type"])

    def get(self, name: str) -> Any:
        """The tensor `name` in bfloat16 (see `dequantize_to_bf16`); the caller casts it to its dtype."""
        blocks = self._handle.get_tensor(name).numpy()
        return dequantize_to_bf16(blocks, self.gguf_type(name), self.shape(name))
