"""GGUF -> safetensors, once per file, one tensor at a time, in 16-bit.

Reading a GGUF through transformers dequantizes every tensor in Python (tens of seconds for a 1.5B model);
the resulting float weights load from safetensors in about a second. So each GGUF is converted once, into a
cache dir keyed by its sha256, and only that dir is loaded afterwards.

The weights are stored in bfloat16 (see `storage_dtype`): a dequantized 4-6 bit weight loses nothing that
matters in bf16's 8-bit mantissa, and the copy is half of a float32 one (3.3 GiB instead of 6.6 for
Qwen2.5-Coder-1.5B). The output layer stays in the GGUF's own blocks where it has its own (`RAW_GGUF_TENSORS`,
gguf_blocks.py). Tensors stream from the GGUF reader into the file, so converting holds one tensor, not
the model; transformers only supplies the config, the tokenizer and the GGUF -> Hugging Face names.
A dir from an older draftwire is migrated without the GGUF where that gives what converting would
(`migrate_dir`, `rebuild_from_gguf`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import gguf_blocks
from .cache import MARKER
from .errors import ModelError
from .progress import byte_bar, status
from .safetensors_stream import streaming_safetensors

# Text whose token ids must survive the save/reload of the tokenizer unchanged (a cheap self-check).
_TOKENIZER_PROBE = (
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # ünï 🙂"
)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' bars (its GGUF dequantization bar uses tqdm directly, so swap that too)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        if original_tqdm is not None:
            gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _unreadable_error(gguf_path: Path, exc: Exception) -> ModelError:
    """Tell a damaged file apart from a valid GGUF that transformers cannot convert (new architecture?)."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf_path)  # maps every tensor: fails on bad magic or data past the end of the file
    except (ValueError, OSError, IndexError, KeyError, TypeError, EOFError) as reader_exc:
        return ModelError(
            f"{gguf_path} is corrupt or truncated: it is not a readable GGUF file "
            f"({type(exc).__name__}: {exc}; "
            f"gguf reader: {reader_exc}). Delete it and pull/copy it again."
        )
    return ModelError(
        f"{gguf_path} is a GGUF file but transformers could not convert it ({type(exc).__name__}: {exc}); "
        f"its architecture may be unsupported by this transformers version."
    )


# GGUF tensors stored raw where quantized (`keeps_raw`). Only the output layer: every forward reads all of it,
# so it is resident whichever way it is stored, and dequantizing it adds about a second to a load. The
# embedding is not: in a bf16 load it is a view of the mapped bf16 file, of which only the rows of the tokens
# seen are ever read; raw, a bf16 load would hold all of it (467 MB for Qwen2.5-Coder-1.5B, which would take
# the Qwen pair's `generate --local` past its 6.5 GB budget). See README for the figures.
RAW_GGUF_TENSORS = ("output.weight",)


def storage_dtype(gguf_type_name: str, ndim: int) -> Any:
    """The dtype a GGUF tensor is stored in: the GGUF's own where it is a 16-bit float (F16 stays F16:
    bf16 would drop 3 bits), float32 for float32 vectors (norms, biases: tiny, and kept exact), bfloat16 for
    the rest (quantized blocks and float32 matrices)."""
    import torch

    if gguf_type_name == "F16":
        return torch.float16
    if gguf_type_name in ("F32", "F64") and ndim <= 1:
        return torch.float32
    if gguf_type_name in ("I8", "I16", "I32", "I64"):
        return None  # integers stay as they are
    return torch.bfloat16


def stored_dtype_for(tensor: Any) -> Any:
    """`storage_dtype` for an already-float tensor of unknown origin (an fp32 dir being migrated): float16
    where every value is exactly a float16 (it was an F16 GGUF tensor) but not a bfloat16."""
    import torch

    if not tensor.is_floating_point() or tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.dtype
    if tensor.ndim <= 1:
        return torch.float32
    if torch.equal(tensor.to(torch.bfloat16).to(tensor.dtype), tensor):
        return torch.bfloat16
    if torch.equal(tensor.to(torch.float16).to(tensor.dtype), tensor):
        return torch.float16
    return torch.bfloat16


def _read_gguf(gguf_path: Path, progress: bool) -> tuple[Any, Any, dict]:
    """Tokenizer, config and transformers' parsed GGUF metadata; ModelError when the file cannot be read."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        with progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
            config = AutoConfig.from_pretrained(directory, gguf_file=name)
            parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    except Exception as exc:  # transformers/gguf raise many types for a bad file; all mean 'cannot read it'
        raise _unreadable_error(gguf_path, exc) from exc
    return tokenizer, config, parsed


def keeps_raw(gguf_name: str, gguf_type: Any, n_bytes: int, n_elements: int) -> bool:
    """Whether a GGUF tensor is stored in its own quantized blocks (gguf_blocks.py) instead of 16-bit floats:
    a tensor named in `RAW_GGUF_TENSORS`, quantized (blocks of several values), and smaller than bf16."""
    from gguf import GGML_QUANT_SIZES

    return gguf_name in RAW_GGUF_TENSORS and GGML_QUANT_SIZES[gguf_type][0] > 1 and n_bytes < 2 * n_elements


def _write_weights(gguf_path: Path, config: Any, parsed: dict, out_dir: Path, progress: bool) -> Any:
    """Dequantize each GGUF tensor, rename/reshape it as transformers would, store it (in 16-bit, or raw where
    `keeps_raw` and transformers only renames it); returns the skeleton (a weightless model) that named them.
    ModelError if a weight of the model is missing from the GGUF."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(gguf_path)
    architecture = read_field(reader, "general.architecture")[0]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    params = dict(skeleton.named_parameters())
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    parsed["tensors"] = {}  # where transformers' mixture-of-experts processors stack experts
    written: set[str] = set()
    total = sum(int(t.n_bytes) for t in reader.tensors)
    out_file, blocks_file = out_dir / "model.safetensors", out_dir / gguf_blocks.BLOCKS_FILE
    with (
        streaming_safetensors(out_file, len(reader.tensors)) as writer,
        streaming_safetensors(blocks_file, len(RAW_GGUF_TENSORS)) as raw_writer,
        byte_bar("convert", total, progress) as bar,
    ):
        for tensor in reader.tensors:
            dtype = storage_dtype(tensor.tensor_type.name, len(tensor.shape))
            n_bytes, n_elements = int(tensor.n_bytes), int(tensor.n_elements)
            raw = not tied and keeps_raw(tensor.name, tensor.tensor_type, n_bytes, n_elements)
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
            )
            bar.update(int(tensor.n_bytes))
            if result.name not in names or result.weights is None:
                continue
            hf_name = names[result.name]
            param = params.get(hf_name)
            same = result.weights is weights and param is not None and tuple(param.shape) == weights.shape
            if raw and same:  # transformers only renamed it
                raw_writer.add(hf_name, torch.from_numpy(np.array(tensor.data, dtype=np.uint8)))
                raw_writer.metadata[hf_name] = gguf_blocks.info(tensor.tensor_type.name, weights.shape)
                written.add(hf_name)
                continue
            array = result.weights  # float32 tensors come back as read-only views of the mapped file
            if not (array.flags.writeable and array.flags.c_contiguous):
                array = np.array(array)
            value = torch.from_numpy(array)
            del weights, result, array
            writer.add(hf_name, value.to(dtype or value.dtype))
            written.add(hf_name)
        for name, value in parsed.pop("tensors").items():  # stacked experts, if any
            writer.add(name, value.to(stored_dtype_for(value)))
            written.add(name)
        kept_raw = bool(raw_writer.entries)
    if not kept_raw:
        blocks_file.unlink()
    missing = set(params) - written
    if missing:
        out_file.unlink(missing_ok=True)
        blocks_file.unlink(missing_ok=True)
        raise ModelError(
            f"{gguf_path}: the GGUF lacks {len(missing)} weights the {type(skeleton).__name__} needs "
            f"(e.g. {sorted(missing)[:3]}); not caching a model that would run on random weights"
        )
    return skeleton


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Convert `gguf_path` into a Hugging Face dir `out_dir`: 16-bit safetensors (see `storage_dtype`) and raw
    blocks (see `keeps_raw`), config, generation config and tokenizer, streaming one tensor at a time."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    status("convert", f"{gguf_path.name} -> 16-bit safetensors, one tensor at a time", progress)
    tokenizer, config, parsed = _read_gguf(gguf_path, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        skeleton = _write_weights(gguf_path, config, parsed, out_dir, progress)
    except ModelError:
        raise
    except Exception as exc:
        raise _unreadable_error(gguf_path, exc) from exc
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.bfloat16  # what most of the file holds; load_model always asks for its own dtype
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if reloaded(_TOKENIZER_PROBE).input_ids != tokenizer(_TOKENIZER_PROBE).input_ids:
        raise ModelError(
            f"{gguf_path}: the tokenizer does not round-trip through save_pretrained; not caching it"
        )


def rebuild_from_gguf(old_dir: Path) -> bool:
    """Whether converting the GGUF again stores less than migrating `old_dir`, a dir of an older format: it
    holds its own output layer in float (bf16 in format 2, float32 in format 1), which a conversion now keeps
    in the GGUF's blocks if they are quantized. The dir cannot tell whether they were (an unquantized output
    layer costs one conversion that changes nothing), nor give the blocks: this needs the GGUF."""
    from safetensors import safe_open

    try:
        tied = json.loads((old_dir / "config.json").read_text()).get("tie_word_embeddings", False)
        for file in sorted(old_dir.glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:  # reads the header only
                if "lm_head.weight" in handle.keys():  # noqa: SIM118
                    return not tied and handle.get_slice("lm_head.weight").get_dtype() in ("BF16", "F32")
    except Exception:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
        return True  # a damaged dir: convert again rather than migrate
    return False


def migrate_dir(old_dir: Path, out_dir: Path, old_format: int, progress: bool = True) -> None:
    """Rewrite a model dir of an older draftwire as this version stores it, with no download and no GGUF:
    format 1 (float32) tensor by tensor (`stored_dtype_for`), format 2 (16-bit, what this version writes
    but for the raw blocks) as it is, its weight files hard-linked; every other file copied."""
    if old_format == 2:
        status("convert", f"keeping the 16-bit copy in {old_dir.name[:12]}... as it is", progress)
        out_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted(old_dir.iterdir()):
            if source.is_file() and source.name != MARKER:
                _link_or_copy(source, out_dir / source.name)
        return
    if old_format != 1:
        raise ModelError(f"{old_dir} is in cache format {old_format}, which this draftwire cannot migrate")
    _migrate_float32_dir(old_dir, out_dir, progress)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link for a weight file (same filesystem: no copy of gigabytes), a copy of anything a later step
    might rewrite in place."""
    if source.suffix == ".safetensors":
        with contextlib.suppress(OSError):
            os.link(source, target)
            return
    shutil.copy2(source, target)


def _migrate_float32_dir(old_dir: Path, out_dir: Path, progress: bool) -> None:
    import torch
    from safetensors import safe_open

    files = sorted(old_dir.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    status("convert", f"migrating the float32 copy in {old_dir.name[:12]}... to 16-bit", progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    with byte_bar("convert", total, progress) as bar:
        for source in sorted(old_dir.iterdir()):
            if source.suffix == ".safetensors" or not source.is_file():
                continue
            shutil.copy2(source, out_dir / source.name)
        for source in files:
            # pread, not a memory map: mapped pages read once stay in the resident set until the map closes
            with (
                safe_open(source, framework="pt", backend="pread") as reader,
                streaming_safetensors(out_dir / source.name, len(reader.keys()), reader.metadata()) as writer,
            ):
                for name in reader.keys():  # noqa: SIM118 - safe_open is no dict: it has keys(), no __iter__
                    value = reader.get_tensor(name)
                    writer.add(name, value.to(stored_dtype_for(value)))
                    bar.update(value.nbytes)
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():  # its total_size counted float32 bytes
        data = json.loads(index.read_text())
        data.get("metadata", {}).pop("total_size", None)
        index.write_text(json.dumps(data, indent=2) + "\n")
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(torch.bfloat16).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
