"""One token sequence with its own KV cache, built for speculative decoding.

Drafting extends a sequence a token at a time; verification feeds several proposed tokens in one forward
pass and reads a logits row per position; after a rejection the sequence rolls back to the accepted prefix
and continues from there without recomputing it. `next_logits` does all of that from one call: give it the
full token list you want in the cache and it reuses whatever prefix it already holds.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

GROW_MIN = 64  # columns a GrowingLayer reserves beyond what it holds, at least (then 1/8 of its length)
PACKED_ATTENTION = "draftwire_packed"  # batched_forward's attention: SDPA, plus the packed batch when one is passed


class GrowingLayer(DynamicLayer):
    """A full-attention layer's cache with room to grow, so that verifying a few tokens costs a few columns.

    `DynamicLayer` appends by concatenation: every pass copies the whole cache to add 2-5 columns, and a
    batch had to copy each row's cache again into one padded tensor for attention. Here new states are
    written in place after the cached ones and `keys`/`values` are views of the filled part: an append
    copies only the new columns (the buffer is reallocated, with 1/8 spare, once it is full), a crop only
    narrows the views, and attention reads the views directly. Everything else is `DynamicLayer`'s.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            capacity = end + max(GROW_MIN, end // 8)
            keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
            if held:
                keys[..., :held, :] = self.keys
                values[..., :held, :] = self.values
            self._key_buffer, self._value_buffer = keys, values
        self._key_buffer[..., held:end, :] = key_states
        self._value_buffer[..., held:end, :] = value_states
        self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class KVSequence:
    """One token sequence with its own KV cache (transformers DynamicCache)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None):
        """`device`: where the model's weights are (default: the model's own `.device`, else the CPU); the
        inputs are built there and the logits stay there."""
        self._model = model
        self.device = torch.device(device if device is not None else getattr(model, "device", "cpu"))
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache = self._new_cache()
        self.tokens: list[int] = []  # the tokens whose keys/values are in the cache, in order

    def __len__(self) -> int:
        return len(self.tokens)

    def _new_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self._model.config)
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        for layer in cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                # Keep the states past the window until the next crop, so a rollback can still see them.
                layer.activate_past_recording()
        return cache

    def _can_crop(self, remove: int) -> bool:
        """Whether every layer can drop its last `remove` states and still hold all it needs."""
        for layer in self._cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                seen = layer.cumulative_length
                if seen < layer.sliding_window:
                    continue  # under the window it holds every state, like a full-attention layer
                # After the crop it must still hold the last min(kept, window - 1) states of the kept prefix;
                # it holds the last `held` of all `seen` (all of them until a crop trims it to the window).
                held = layer.keys.shape[-2] if layer.keys is not None else 0
                if not (layer.record_past and held >= remove + min(seen - remove, layer.sliding_window - 1)):
                    return False
            elif type(layer) not in (DynamicLayer, GrowingLayer):
                return False  # linear attention, compressed caches...: not known to be croppable, rebuild
        return True

    def _truncate(self, length: int) -> None:
        """Drop cached tokens past `length`: crop if the cache allows, else empty it (correctness first)."""
        remove = len(self.tokens) - length
        if remove <= 0:
            return
        if length > 0 and self._can_crop(remove):
            with torch.inference_mode():
                self._cache.crop(-remove)
            self.tokens = self.tokens[:length]
        else:
            self._cache = self._new_cache()
            self.tokens = []

    def packable(self) -> bool:
        """Whether this sequence runs through `batched_forward`'s packed pass (alone, a batch of one): every
        layer a `GrowingLayer` (full attention) and the model on SDPA attention."""
        return (all(type(layer) is GrowingLayer for layer in self._cache.layers)
                and self._model.config._attn_implementation in ("sdpa", PACKED_ATTENTION))

    def restore(self, length: int) -> None:
        """Cut every layer back to `length` states, `tokens` untouched: undoes a pass that failed midway."""
        for layer in self._cache.layers:
            if (extra := layer.get_seq_length() - length) > 0:
                layer.crop(-extra)

    def _forward(self, new: Sequence[int], n_out: int) -> torch.Tensor:
        """Feed `new` after the cached tokens in one pass; float32 logits for its last `n_out` positions."""
        if self.packable():  # the batched forward's own path, so a row alone is a batch of one
            from .batched_forward import _forward_rows

            tokens = self.tokens
            logits = _forward_rows([self], [[*tokens, *map(int, new)]], [n_out])[0]
            self.tokens = tokens  # the caller sets them
            return logits
        start = len(self.tokens)
        input_ids = torch.tensor([list(new)], dtype=torch.long, device=self.device)
        position_ids = torch.arange(start, start + len(new), dtype=torch.long, device=self.device).unsqueeze(0)
        kwargs = {"logits_to_keep": n_out} if self._logits_to_keep else {}
        with torch.inference_mode():
            out = self._model(
                input_ids=input_ids,
                position_ids=position_ids,
                cache=self._cache,
                use_cache=True,
                **kwargs,
            )
        return out.logits[0, -n_out:].float()

    def next_logits(self, tokens: Sequence[int], n_out: int = 1) -> torch.Tensor:
        """float32 tensor [n_out, vocab_size] on the model's device (`.cpu()` before `.numpy()`): row j is the
        next-token logits after tokens[: len(tokens) - n_out + 1 + j].

        Reuses the longest cached prefix of `tokens` (but always feeds at least the last n_out tokens), crops
        the cache beyond it (rollback after a rejection, without recomputing the accepted prefix), feeds the
        rest in ONE forward pass (multi-token forward for verification), and leaves the cache holding exactly
        `tokens`.
        """
        tokens = [int(t) for t in tokens]
        if not 1 <= n_out <= len(tokens):
            raise ValueError(f"n_out must be in 1..len(tokens)={len(tokens)}, got {n_out}")
        keep = min(common_prefix(self.tokens, tokens), len(tokens) - n_out)
        self._truncate(keep)
        logits = self._forward(tokens[len(self.tokens) :], n_out)
        self.tokens = tokens
        return logits

    def rollback(self, length: int) -> None:
        """Crop the cache to its first `length` tokens."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"cannot roll back to {length}: the sequence holds {len(self.tokens)} tokens")
        kept = self.tokens[:length]
        self._truncate(length)
        if len(self.tokens) < length:  # the cache had to be emptied: rebuild the kept prefix
            self._forward(kept, 1)
            self.tokens = kept
