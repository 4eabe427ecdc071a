"""GGUF -> safetensors, once per file.

Reading a GGUF through transformers dequantizes every tensor in Python (tens of seconds for a 1.5B model);
the resulting float weights load from safetensors in about a second. So each GGUF is converted once, into a
cache dir keyed by its sha256, and only that dir is loaded afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

from .errors import ModelError

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


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantize `gguf_path` to float32 and save model + tokenizer to `out_dir` as a Hugging Face dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        with progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                directory,
                gguf_file=name,
                dtype=torch.float32,
                # Plain float weights, even where a GGUF matmul kernel is installed: they are what we save.
                quantization_config=GgufConfig(dequantize=True),
            )
    except Exception as exc:  # transformers/gguf raise many types for a bad file; all mean 'cannot read it'
        raise _unreadable_error(gguf_path, exc) from exc
    if getattr(model, "hf_quantizer", None) is not None:
        raise ModelError(
            f"{gguf_path}: transformers kept the weights quantized; cannot save them as safetensors"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_bars(progress):
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if reloaded(_TOKENIZER_PROBE).input_ids != tokenizer(_TOKENIZER_PROBE).input_ids:
        raise ModelError(
            f"{gguf_path}: the tokenizer does not round-trip through save_pretrained; not caching it"
        )
