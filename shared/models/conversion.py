"""GGUF -> safetensors, once per file, one tensor at a time, in 16-bit.

Reading a GGUF through transformers dequantizes every tensor in Python (tens of seconds for a 1.5B model);
the resulting float weights load from safetensors in about a second. So each GGUF is converted once, into a
cache dir keyed by its sha256, and only that dir is loaded afterwards.

The weights are stored in bfloat16 (see `storage_dtype`): a dequantized 4-6 bit weight loses nothing that
matters in bf16's 8-bit mantissa, and the copy is half of a float32 one (3.3 GiB instead of 6.6 for
Qwen2.5-Coder-1.5B). Tensors stream from the GGUF reader into the file, so converting holds one tensor, not
the model; transformers only supplies the config, the tokenizer and the GGUF -> Hugging Face names.
An fp32 dir from an older draftwire is migrated the same way, tensor by tensor (`migrate_dir`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _write_weights(gguf_path: Path, config: Any, parsed: dict, out_file: Path, progress: bool) -> Any:
    """Dequantize each GGUF tensor, rename/reshape it as transformers would, store it; returns the skeleton
    (a weightless model) that named them. ModelError if a weight of the model is missing from the GGUF."""
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
    parsed["tensors"] = {}  # where transformers' mixture-of-experts processors stack experts
    written: set[str] = set()
    total = sum(int(t.n_bytes) for t in reader.tensors)
    with (
        streaming_safetensors(out_file, len(reader.tensors)) as writer,
        byte_bar("convert", total, progress) as bar,
    ):
        for tensor in reader.tensors:
            dtype = storage_dtype(tensor.tensor_type.name, len(tensor.shape))
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
            )
            bar.update(int(tensor.n_bytes))
            if result.name not in names or result.weights is None:
                continue
            array = result.weights  # float32 tensors come back as read-only views of the mapped file
            if not (array.flags.writeable and array.flags.c_contiguous):
                array = np.array(array)
            hf_name, value = names[result.name], torch.from_numpy(array)
            del weights, result, array
            writer.add(hf_name, value.to(dtype or value.dtype))
            written.add(hf_name)
        for name, value in parsed.pop("tensors").items():  # stacked experts, if any
            writer.add(name, value.to(stored_dtype_for(value)))
            written.add(name)
    missing = {name for name, _ in skeleton.named_parameters()} - written
    if missing:
        out_file.unlink(missing_ok=True)
        raise ModelError(
            f"{gguf_path}: the GGUF lacks {len(missing)} weights the {type(skeleton).__name__} needs "
            f"(e.g. {sorted(missing)[:3]}); not caching a model that would run on random weights"
        )
    return skeleton


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Convert `gguf_path` into a Hugging Face dir `out_dir`: 16-bit safetensors (see `storage_dtype`),
    config, generation config and tokenizer, streaming one tensor at a time."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    status("convert", f"{gguf_path.name} -> 16-bit safetensors, one tensor at a time", progress)
    tokenizer, config, parsed = _read_gguf(gguf_path, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        skeleton = _write_weights(gguf_path, config, parsed, out_dir / "model.safetensors", progress)
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


def migrate_dir(old_dir: Path, out_dir: Path, progress: bool = True) -> None:
    """Rewrite an fp32 model dir of an older draftwire as this version stores it: each safetensors file
    tensor by tensor (`stored_dtype_for`), every other file copied; no download and no GGUF needed."""
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
