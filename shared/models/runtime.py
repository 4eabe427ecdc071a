"""One interface for the draft model (device) and the target model (edge).

Both sides need the same few things: token ids in and out, the logits width, the end-of-sequence ids, and
sequences with their own rollback-able KV cache. `load_model` hides where the weights came from (catalog,
local dir, GGUF, hub, tiny-random) and in which precision they run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .conversion import progress_bars
from .errors import ModelError
from .kv_sequence import KVSequence
from .store import resolve
from .tiny_random import build_tiny_random

__all__ = ["DTYPES", "INT8_FLOAT_MODULES", "KVSequence", "LoadedModel", "load_model", "quantize_int8"]

DTYPES = ("fp32", "bf16", "int8")


def _eos_ids(model: torch.nn.Module, tokenizer: Any, extra_tokens: Sequence[str]) -> tuple[int, ...]:
    """EOS ids: generation_config's (an int or a list), the tokenizer's, then `extra_tokens`'; no repeats."""
    gen_config = getattr(model, "generation_config", None)
    values: list[Any] = [getattr(gen_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    for token in extra_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == token:  # not the unk id
            values.append(token_id)
    ids: list[int] = []
    for value in values:
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return tuple(ids)


# Linear layers left in float by "int8". The MLP output projections read the activations with the largest
# outliers; the dynamic int8 kernels quantize activations per tensor (with 7-bit range on x86/fbgemm), which
# wipes out the rest of the values. Measured argmax agreement with fp32 (3 prompts): SmolLM2-135M 0.29-0.53
# with every Linear quantized vs 0.67-0.81 with these kept float; Qwen2.5-Coder-1.5B 0.69-0.87 vs 0.77-0.93.
INT8_FLOAT_MODULES = ("down_proj",)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of the nn.Linear layers (lm_head included, INT8_FLOAT_MODULES excepted).

    int8 per-channel weights, activations quantized on the fly: lets a device draft with a smaller, faster
    copy of a model. The activation scale is per forward call, so logits depend slightly on which tokens
    share a call (a cached and a from-scratch forward differ by more than float rounding).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in INT8_FLOAT_MODULES
    }
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but it is what ships inside torch.
        warnings.filterwarnings(
            "ignore", message=r"(?s).*(torch\.ao\.quantization|quantize_per_\w+).*deprecated"
        )
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


class LoadedModel:
    """A causal LM with its tokenizer, ready for drafting or verification."""

    def __init__(
        self,
        name: str,
        dtype: str,
        model: torch.nn.Module,
        tokenizer: Any,
        extra_eos_tokens: Sequence[str] = (),
    ):
        self.name = name
        self.dtype = dtype
        self.model = model
        self.tokenizer = tokenizer
        # The logits width, which may exceed len(tokenizer) (embedding rows padded for efficiency).
        self.vocab_size: int = int(model.config.get_text_config().vocab_size)
        self.eos_token_ids: tuple[int, ...] = _eos_ids(model, tokenizer, extra_eos_tokens)
        if getattr(model, "generation_config", None) is not None:
            # So that model.generate() (reference runs, tests) stops where the runtime does.
            model.generation_config.eos_token_id = list(self.eos_token_ids)

    def __repr__(self) -> str:
        return f"LoadedModel(name={self.name!r}, dtype={self.dtype!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Same ids as the Hugging Face tokenizer(text).input_ids (special tokens added as the model does)."""
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def new_sequence(self) -> KVSequence:
        return KVSequence(self.model)


def _load_hf_dir(path: Path, torch_dtype: torch.dtype, progress: bool) -> tuple[torch.nn.Module, Any]:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelError(
            f"could not load the model in {path} ({type(exc).__name__}: {exc}). "
            "If it is in the draftwire cache, delete that directory and pull again."
        ) from exc
    return model, tokenizer


def load_model(source: str, dtype: str = "fp32", progress: bool = True) -> LoadedModel:
    """Load any accepted source (see `store.resolve`) in fp32, bf16 or int8 (dynamic quantization)."""
    if dtype not in DTYPES:
        raise ModelError(f"invalid dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    resolved = resolve(source, progress)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if resolved.path is None:
        model, tokenizer = build_tiny_random()
        model = model.to(torch_dtype)
    else:
        model, tokenizer = _load_hf_dir(resolved.path, torch_dtype, progress)
    model.eval()
    if dtype == "int8":
        model = quantize_int8(model)
    return LoadedModel(resolved.name, dtype, model, tokenizer, resolved.extra_eos_tokens)
