"""One interface for the draft model (device) and the target model (edge).

Both sides need the same few things: token ids in and out, the logits width, the end-of-sequence ids, and
sequences with their own rollback-able KV cache. `load_model` hides where the weights came from (catalog,
local dir, GGUF, hub, tiny-random) and in which precision they run.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .conversion import progress_bars
from .errors import ModelError
from .gguf_blocks import BLOCKS_FILE, RawBlocks
from .kv_sequence import KVSequence
from .progress import status
from .store import resolve
from .tiny_random import build_tiny_random

__all__ = [
    "DEVICES",
    "DTYPES",
    "INT8_WEIGHT_ONLY_MODULES",
    "KVSequence",
    "LoadedModel",
    "WeightOnlyInt8Linear",
    "load_model",
    "quantize_int8",
    "resolve_device",
]

DTYPES = ("fp32", "bf16", "int8")
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda` (or `cuda:N`), or `auto` (cuda when torch sees one, else cpu) as a torch.device.

    Asking for CUDA where torch has none is a ModelError that says so, not a traceback from deep in torch.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"invalid device {device!r}: choose one of {', '.join(DEVICES)}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ModelError(f"invalid device {device!r}: choose one of {', '.join(DEVICES)}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device "
                "(a CPU-only build, no driver, or CUDA_VISIBLE_DEVICES empty): use cpu or auto"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA devices")
    return resolved


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


# Linear layers that "int8" quantizes weight-only. The MLP output projections read the activations with the
# largest outliers; the dynamic int8 kernels quantize activations per tensor (with 7-bit range on x86/fbgemm),
# which wipes out the rest of the values, so these keep their activations in bfloat16 and only their weights
# in int8. docs/bench/int8/measure.py (agreement with the target's greedy choice / draft step time, one thread):
# Qwen2.5-Coder-1.5B all-dynamic 0.80 / 52 ms, down_proj kept fp32 0.92 / 107 ms, down_proj weight-only
# 0.90 / 68 ms; SmolLM2-135M 0.52 / 12.9 ms, 0.71 / 17.5 ms, 0.71 / 13.8 ms.
INT8_WEIGHT_ONLY_MODULES = ("down_proj",)


class WeightOnlyInt8Linear(torch.nn.Module):
    """y = x W^T with W stored as int8 rows and one scale per output channel; x stays in bfloat16.

    Reads a quarter of the bytes of a float32 layer and half of a bfloat16 one, and unlike the dynamic kernel
    never rounds the activations to 8 bits. Runs on torch's `_weight_int8pack_mm` (the CPU kernel behind
    int8 weight-only decoding); the result returns in the caller's dtype. That kernel reads out of bounds
    (garbage or a crash, seen with torch 2.13 on x86) unless in_features is a multiple of its block, so
    other widths take a plain matmul with the weight dequantized on the fly (same numbers, slower).
    """

    KERNEL_BLOCK = 64

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight = linear.weight.detach().float()
        exact = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        # The kernel multiplies by the scale in compute_dtype: quantize with that very (rounded up) scale, so
        # every weight is within half a step of its int8 value and none is clipped.
        scale = exact.to(compute_dtype)
        scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
        self.register_buffer("qweight", torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale)
        bias = linear.bias.detach().to(compute_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()
        if self.in_features % self.KERNEL_BLOCK == 0:
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            y = flat @ (self.qweight.to(self.compute_dtype) * self.scales[:, None]).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8, x={self.compute_dtype}"


def quantize_int8(
    model: torch.nn.Module,
    weight_only: Sequence[str] = INT8_WEIGHT_ONLY_MODULES,
    float_weights: Callable[[str], torch.Tensor | None] | None = None,
) -> torch.nn.Module:
    """int8 weights for every nn.Linear (lm_head included): dynamic int8 where activations tolerate it,
    weight-only int8 for the layers named in `weight_only` (by their last name component).

    Lets a device draft with a smaller, faster copy of a model. The dynamic layers' activation scale is per
    forward call, so logits depend slightly on which tokens share a call (a cached and a from-scratch forward
    differ by more than float rounding). One layer at a time, each from its float32 weights: `float_weights`
    (name -> tensor, None where it has none) supplies them read from disk just before, so that no float32
    copy of the whole model is ever held; without it the layer's own weights are used.
    """
    # Names, not modules: a list of the float layers would keep each one alive after it is replaced.
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but it is what ships inside torch.
        warnings.filterwarnings(
            "ignore", message=r"(?s).*(torch\.ao\.quantization|quantize_per_\w+).*deprecated"
        )
        for name in linears:
            _quantize_linear(model, name, name.rsplit(".", 1)[-1] in weight_only, float_weights)
    return model


def _quantize_linear(
    model: torch.nn.Module,
    name: str,
    weight_only: bool,
    float_weights: Callable[[str], torch.Tensor | None] | None,
) -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    module = model.get_submodule(name)
    for attr in ("weight", "bias"):
        param = getattr(module, attr)
        stored = float_weights(f"{name}.{attr}") if float_weights is not None and param is not None else None
        if stored is not None or (param is not None and param.dtype != torch.float32):
            value = stored if stored is not None else param.detach()
            setattr(module, attr, torch.nn.Parameter(value.float(), requires_grad=False))
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    if weight_only:
        setattr(owner, attr, WeightOnlyInt8Linear(module))
    else:
        quantize_dynamic(owner, {attr: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        # The qconfig it was given holds a closure over the module (a reference cycle): without this, the
        # float layers outlive their replacement until a gc run, gigabytes of them for a 1.5B model.
        module.qconfig = None


class LoadedModel:
    """A causal LM with its tokenizer, ready for drafting or verification."""

    def __init__(
        self,
        name: str,
        dtype: str,
        model: torch.nn.Module,
        tokenizer: Any,
        extra_eos_tokens: Sequence[str] = (),
        device: torch.device | str = "cpu",
    ):
        self.name = name
        self.dtype = dtype
        self.model = model
        self.device = torch.device(device)  # where the weights are; sequences feed their inputs there
        self.tokenizer = tokenizer
        # The logits width, which may exceed len(tokenizer) (embedding rows padded for efficiency).
        self.vocab_size: int = int(model.config.get_text_config().vocab_size)
        self.eos_token_ids: tuple[int, ...] = _eos_ids(model, tokenizer, extra_eos_tokens)
        # Positions the model was trained for: prompt + generated tokens may not exceed it.
        text_config = model.config.get_text_config()
        self.context_length: int = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 20)
        if getattr(model, "generation_config", None) is not None:
            # So that model.generate() (reference runs, tests) stops where the runtime does.
            model.generation_config.eos_token_id = list(self.eos_token_ids)

    def __repr__(self) -> str:
        return (f"LoadedModel(name={self.name!r}, dtype={self.dtype!r}, device={str(self.device)!r}, "
                f"vocab_size={self.vocab_size})")

    def encode(self, text: str) -> list[int]:
        """Same ids as the Hugging Face tokenizer(text).input_ids (special tokens added as the model does)."""
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def render_chat(self, messages: Sequence[tuple[str, str]], chat_template: str | None = None) -> list[int]:
        """A chat's token ids as `chat_template` (default: this tokenizer's) renders it for the next reply
        (`add_generation_prompt`), exactly what transformers feeds `generate`. ValueError without a template."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(f"{self.name} has no chat template: send `prompt` instead of `messages`")
        out = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 chat_template=template, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def new_sequence(self) -> KVSequence:
        return KVSequence(self.model, self.device)


class _StoredTensors:
    """The tensors of a dir's safetensors files and raw blocks, by name, read with pread into fresh memory.

    Not through a memory map: pages of a mapped file count in the process's resident set for as long as the
    map lives, so casting a mapped bf16 file to float32 would hold both copies. Raw blocks come back as the
    bfloat16 they dequantize to (gguf_blocks.py), as the 16-bit file would hold them."""

    def __init__(self, files: Sequence[Path], blocks: RawBlocks | None = None):
        from safetensors import safe_open

        self._files = [safe_open(f, framework="pt", backend="pread") for f in files]
        self._where = {name: handle for handle in self._files for name in handle.keys()}  # noqa: SIM118
        self._blocks = blocks

    def get(self, name: str) -> torch.Tensor | None:
        if self._blocks is not None and name in self._blocks.names():
            return self._blocks.get(name)
        handle = self._where.get(name)
        return handle.get_tensor(name) if handle is not None else None


def _to_float32(model: torch.nn.Module, stored: _StoredTensors, skip_linears: bool) -> None:
    """Each parameter (tied ones once) as float32 read from the file (its exact stored values, so a float32
    vector is not rounded through the bfloat16 copy), one at a time; Linear layers left as they are when
    `skip_linears` (quantize_int8 reads those itself)."""
    for module_name, module in model.named_modules():
        if skip_linears and isinstance(module, torch.nn.Linear):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param.dtype == torch.float32:
                continue  # done already (a tied parameter), or loaded as float32 by transformers
            value = stored.get(f"{module_name}.{attr}" if module_name else attr)
            param.data = (value if value is not None else param.data).float()
    for buffer_owner in model.modules():
        for attr, buffer in list(buffer_owner.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                setattr(buffer_owner, attr, buffer.float())


def _load_hf_dir(path: Path, dtype: str, progress: bool) -> tuple[torch.nn.Module, Any]:
    """The model in `dtype` (int8 quantized), holding one copy of the weights at any time.

    A draftwire cache dir holds bfloat16 (conversion.py), and maybe raw GGUF blocks (gguf_blocks.py). Loaded
    as bfloat16 its parameters are views of the mapped file, read only when used (raw ones dequantized first);
    for float32 or int8 that lazy model is the skeleton, and each weight is read again from the file and cast
    (or quantized) one at a time. Other dirs load as transformers does.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .cache import MARKER

    ours = (path / MARKER).is_file()
    files = sorted(set(path.glob("*.safetensors")) - {path / BLOCKS_FILE}) if ours else []
    torch_dtype = torch.bfloat16 if dtype == "bf16" or files else torch.float32
    try:
        blocks = RawBlocks.of_dir(path) if ours else None
        with progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(path)
            if blocks is None:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            else:
                model = _from_pretrained_with_blocks(path, files, blocks, dtype == "bf16", progress)
        model.eval()
        stored = _StoredTensors(files, blocks) if files and dtype != "bf16" else None
        if stored is not None:
            _to_float32(model, stored, skip_linears=dtype == "int8")
            model.config.dtype = torch.float32
        if dtype == "int8":
            model = quantize_int8(model, float_weights=stored.get if stored is not None else None)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelError(
            f"could not load the model in {path} ({type(exc).__name__}: {exc}). "
            "If it is in the draftwire cache, delete that directory and pull again."
        ) from exc
    return model, tokenizer


def _from_pretrained_with_blocks(
    path: Path, files: Sequence[Path], blocks: RawBlocks, dequantize: bool, progress: bool
) -> torch.nn.Module:
    """The bfloat16 model of a cache dir that keeps some weights raw: the safetensors lazily mapped as
    transformers maps them, each raw weight dequantized here when `dequantize`, else an untouched (so not
    resident) placeholder that the float32/int8 load replaces from `_StoredTensors` anyway.

    Through `state_dict=`, since transformers would take a weight missing from the files for a new one, fill
    it with random numbers (a second per vocabulary-sized matrix) and warn."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, config.architectures[0])
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        state = {name: handle.get_slice(name) for handle in handles for name in handle.keys()}  # noqa: SIM118
        for name in blocks.names():
            if dequantize:
                status("load", f"dequantizing {name} from its {blocks.gguf_type(name)} blocks", progress)
                state[name] = blocks.get(name)
            else:
                state[name] = torch.empty(blocks.shape(name), dtype=torch.bfloat16)
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=torch.bfloat16)
    model.config.name_or_path = str(path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _release_freed_memory() -> None:
    """Give the heap that loading freed (per-layer float32 copies, the tokenizer's parse) back to the OS:
    glibc keeps freed blocks under its mmap threshold mapped, and they count in the resident set."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        if libc_name:
            ctypes.CDLL(libc_name).malloc_trim(0)


def load_model(source: str, dtype: str = "fp32", progress: bool = True, device: str = "cpu") -> LoadedModel:
    """Load any accepted source (see `store.resolve`) in fp32, bf16 or int8 (see `quantize_int8`) onto
    `device` (see `resolve_device`), checked before any weights are read. int8 runs on the CPU only, so
    `auto` means cpu for it."""
    if dtype not in DTYPES:
        raise ModelError(f"invalid dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = resolve_device("cpu" if dtype == "int8" and device == "auto" else device)
    if dtype == "int8" and target.type != "cpu":
        raise ModelError(f"int8 runs on the CPU only (torch's dynamic int8 kernels); use fp32 or bf16 on {target}")
    resolved = resolve(source, progress)
    started = time.perf_counter()
    status("load", f"{resolved.name} as {dtype} on {target}", progress)
    if resolved.path is None:
        model, tokenizer = build_tiny_random()
        model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        model.eval()
        if dtype == "int8":
            model = quantize_int8(model)
    else:
        model, tokenizer = _load_hf_dir(resolved.path, dtype, progress)
    if dtype != "int8":
        model = model.to(target)
    _release_freed_memory()
    status("load", f"{resolved.name} ready in {time.perf_counter() - started:.1f} s", progress)
    return LoadedModel(resolved.name, dtype, model, tokenizer, resolved.extra_eos_tokens, device=target)
