"""One target (or draft) forward pass over many sequences: the model call of continuous batching.

Every `KVSequence` keeps its own KV cache (so a session rolls back alone after a rejection, and is evicted
alone). A batch gathers those caches into one transformers `DynamicCache`, each row's past LEFT-padded to the
longest, and feeds every row's new tokens RIGHT-padded to the most: row b's keys sit in columns
[Lmax - L_b, Lmax), its new tokens in [Lmax, Lmax + n_b). The three things batched speculative decoding gets
wrong are set per row here and nowhere else:

- position ids: row b's new token i is at position L_b + i (its own length, never the batch's);
- attention mask: a row sees its own past and its own new tokens only (pad columns are masked; a pad query
  at the end still sees the row's real tokens, so no query row is fully masked and none can turn NaN);
- KV write-back: row b's new keys/values are columns [Lmax, Lmax + n_b) of the batch cache, appended to its
  own cache; the pads never leave the batch.

A long new segment (a prompt's prefill, a resync) would pad every other row to its length, so rows with more
than `PREFILL_ROWS` new tokens share a pass only with rows of a similar length (prefills arriving together). Models whose caches are not plain full-attention layers
(sliding windows: Gemma 3) and sequences that are not `KVSequence`s (test doubles) run one at a time through
`next_logits`: same results, no batching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .kv_sequence import KVSequence, common_prefix

PREFILL_ROWS = 32  # new tokens above which a row only shares a pass with rows of a similar length
PREFILL_GROUP = 8  # prefills in one pass at most (bounds the pass's activations)
PREFILL_CHUNK = 512  # prompt tokens a service's prefill feeds per pass (chunked prefill, as vLLM's default)


def _batchable(seq: object) -> bool:
    return isinstance(seq, KVSequence) and all(type(layer) is DynamicLayer for layer in seq._cache.layers)


def position_ids(past: Sequence[int], width: int) -> torch.Tensor:
    """Row b's positions: past[b], past[b] + 1, ... (a pad continues its row; its output is never read)."""
    return torch.tensor([[p + i for i in range(width)] for p in past], dtype=torch.long)


def attention_mask(past: Sequence[int], new: Sequence[int], past_width: int, width: int) -> torch.Tensor:
    """1 where row b may attend: its own past (right-aligned in the cache) and its own new tokens."""
    mask = torch.zeros(len(past), past_width + width, dtype=torch.long)
    for b, (p, n) in enumerate(zip(past, new, strict=True)):
        mask[b, past_width - p : past_width + n] = 1
    return mask


def next_logits_batch(
    seqs: Sequence[object], token_lists: Sequence[Sequence[int]], n_outs: Sequence[int]
) -> list[torch.Tensor]:
    """`seq.next_logits(tokens, n_out)` for every row, in as few forward passes as the rows allow.

    Same contract per row as `KVSequence.next_logits`: float32 [n_out, vocab], the cache left holding exactly
    `tokens`. The sequences must be distinct (one row per cache).
    """
    if len({id(s) for s in seqs}) != len(seqs):
        raise ValueError("a sequence appears twice in one batch")
    out: list[torch.Tensor | None] = [None] * len(seqs)
    ready: list[int] = []
    for i, (seq, tokens, n_out) in enumerate(zip(seqs, token_lists, n_outs, strict=True)):
        if not _batchable(seq):
            out[i] = seq.next_logits(tokens, n_out)
            continue
        tokens = [int(t) for t in tokens]
        if not 1 <= n_out <= len(tokens):
            raise ValueError(f"n_out must be in 1..len(tokens)={len(tokens)}, got {n_out}")
        seq._truncate(min(common_prefix(seq.tokens, tokens), len(tokens) - n_out))
        ready.append(i)
    for group in _groups(ready, [len(token_lists[i]) - len(seqs[i].tokens) for i in ready]):
        if len(group) == 1:
            i = group[0]
            out[i] = seqs[i].next_logits(token_lists[i], n_outs[i])  # reuses exactly the prefix kept above
            continue
        rows = _forward_rows([seqs[i] for i in group], [[int(t) for t in token_lists[i]] for i in group],
                             [n_outs[i] for i in group])
        for i, logits in zip(group, rows, strict=True):
            out[i] = logits
    return out  # type: ignore[return-value]


def _groups(rows: list[int], new: list[int]) -> list[list[int]]:
    """Rows that share a pass: every row with at most PREFILL_ROWS new tokens in one, longer ones (prefills)
    with others of a similar length (the longest at most 1.5x the shortest), so padding wastes little."""
    short = [r for r, n in zip(rows, new, strict=True) if n <= PREFILL_ROWS]
    groups = [short] if short else []
    long = sorted((n, r) for r, n in zip(rows, new, strict=True) if n > PREFILL_ROWS)
    for n, r in long:
        if groups and groups[-1] is not short and n <= 1.5 * groups[-1][0][0] and len(groups[-1]) < PREFILL_GROUP:
            groups[-1].append((n, r))
        else:
            groups.append([(n, r)])
    return [g if g is short else [r for _, r in g] for g in groups]


def _forward_rows(seqs: list[KVSequence], token_lists: list[list[int]], n_outs: list[int]) -> list[torch.Tensor]:
    """One padded forward over rows whose caches already hold a prefix of their tokens."""
    model = seqs[0]._model
    device = next(model.parameters()).device
    past = [len(s.tokens) for s in seqs]
    new = [t[p:] for t, p in zip(token_lists, past, strict=True)]
    past_width, width = max(past), max(len(n) for n in new)
    cache = DynamicCache(config=model.config)
    if past_width:
        for layer_idx in range(len(seqs[0]._cache.layers)):
            keys, values = _gather(seqs, layer_idx, past_width)
            cache.update(keys, values, layer_idx)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, n in enumerate(new):
        input_ids[b, : len(n)] = torch.tensor(n, dtype=torch.long)
    # logits only where some row needs them (a prefill row needs its last n_out positions, not all of them)
    keep = sorted({j for n, n_out in zip(new, n_outs, strict=True) for j in range(len(n) - n_out, len(n))})
    kwargs = {"logits_to_keep": torch.tensor(keep, device=device)} if seqs[0]._logits_to_keep else {}
    column = {j: c for c, j in enumerate(keep)} if kwargs else {j: j for j in range(width)}
    with torch.inference_mode():
        result = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask(past, [len(n) for n in new], past_width, width).to(device),
            position_ids=position_ids(past, width).to(device),
            cache=cache,  # transformers 5.x (`past_key_values` is deprecated, removed in 5.40)
            use_cache=True,
            **kwargs,
        )
        logits = result.logits
        rows = [logits[b, [column[j] for j in range(len(n) - n_out, len(n))]].float()
                for b, (n, n_out) in enumerate(zip(new, n_outs, strict=True))]
        write_back(seqs, cache, past_width, [len(n) for n in new])
    for seq, tokens in zip(seqs, token_lists, strict=True):
        seq.tokens = tokens
    return rows


def write_back(seqs: Sequence[KVSequence], cache: DynamicCache, past_width: int, widths: Sequence[int]) -> None:
    """Append row b's new keys/values (batch columns [past_width, past_width + widths[b])) to its own cache."""
    for b, (seq, n) in enumerate(zip(seqs, widths, strict=True)):
        cols = slice(past_width, past_width + n)
        for layer_idx, layer in enumerate(cache.layers):
            seq._cache.update(layer.keys[b : b + 1, :, cols], layer.values[b : b + 1, :, cols], layer_idx)


def _gather(seqs: list[KVSequence], layer_idx: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer_idx` of every row's cache, left-padded with zeros to `width` columns."""
    ref = next(s._cache.layers[layer_idx] for s in seqs if s.tokens)
    _, heads, _, dim = ref.keys.shape
    shape = (len(seqs), heads, width, dim)
    keys = torch.zeros(shape, dtype=ref.keys.dtype, device=ref.keys.device)
    values = torch.zeros(shape, dtype=ref.values.dtype, device=ref.values.device)
    for b, seq in enumerate(seqs):
        if seq.tokens:
            layer = seq._cache.layers[layer_idx]
            keys[b, :, width - len(seq.tokens) :] = layer.keys[0]
            values[b, :, width - len(seq.tokens) :] = layer.values[0]
    return keys, values
