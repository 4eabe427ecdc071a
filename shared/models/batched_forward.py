"""One target (or draft) forward pass over many sequences: the model call of continuous batching.

Every `KVSequence` keeps its own KV cache (so a session rolls back alone after a rejection, and is evicted
alone). A batch PACKS every row's new tokens into one sequence of N tokens (no padding), so the projections,
MLPs and output layer multiply N rows, not rows x the longest row's new tokens (at 16 sessions that padding
was 29% of the verifier's and 33% of the draft's matmul rows). Only attention sees a padded layout: an
attention function (`_packed_attention`, registered with transformers' AttentionInterface and delegating to
its SDPA when nothing is packed) scatters the N queries, keys and values to [rows, width], puts each row's
own past in front (gathered into one tensor, LEFT-padded to the longest), runs SDPA there, and gathers the N
outputs back. The three things batched speculative decoding gets wrong are set per row here and nowhere else:

- position ids: row b's new token i is at position L_b + i (its own length, never the batch's);
- attention mask: a row sees its own past and its own new tokens up to itself (pad columns are masked; a
  pad query still sees the row's real tokens, so no query row is fully masked and none can turn NaN);
- KV write-back: row b's new keys/values are packed columns [offset_b, offset_b + n_b), appended to its own
  cache; nothing of another row, and no pad, enters it.

A long new segment (a prompt's prefill, a resync) would pad every other row's attention to its length, so rows
with more than `PREFILL_ROWS` new tokens share a pass only with rows of a similar length (prefills arriving
together). Models whose caches are not plain full-attention layers (sliding windows: Gemma 3), models not on
SDPA attention, and sequences that are not `KVSequence`s (test doubles) run one at a time through
`next_logits`: same results, no batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .kv_sequence import KVSequence, common_prefix

PREFILL_ROWS = 32  # new tokens above which a row only shares a pass with rows of a similar length
PREFILL_GROUP = 8  # prefills in one pass at most (bounds the pass's activations)
PREFILL_CHUNK = 512  # prompt tokens a service's prefill feeds per pass (chunked prefill, as vLLM's default)


PACKED_ATTENTION = "draftwire_packed"  # SDPA, plus the packed batch when a forward passes `draftwire_packing`


@dataclass
class _Packing:
    """What the attention of one packed forward needs besides q, k, v: where packed token j sits in the
    padded [rows, width] layout, each layer's gathered past, the mask; it collects each layer's new k, v."""

    row_of: torch.Tensor  # [N] row of packed token j
    col_of: torch.Tensor  # [N] its column among the row's new tokens
    rows: int
    width: int
    past: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer [rows, kv_heads, past_width, dim]
    mask: torch.Tensor  # [rows, 1, width, past_width + width], True where a query may attend
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> packed k, v

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, heads, N, dim] -> [rows, heads, width, dim], pads zero."""
        out = x.new_zeros(self.rows, self.width, x.shape[1], x.shape[3])
        out[self.row_of, self.col_of] = x[0].transpose(0, 1)
        return out.transpose(1, 2)


def _packed_attention(module, query, key, value, attention_mask, draftwire_packing: _Packing | None = None,
                      **kwargs):
    """Transformers' SDPA attention; in a packed forward, run per row on the padded layout (see module doc)."""
    if draftwire_packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    packing = draftwire_packing
    packing.new_kv[module.layer_idx] = (key, value)
    q, k, v = packing.unpack(query), packing.unpack(key), packing.unpack(value)
    if packing.past is not None:
        past_k, past_v = packing.past[module.layer_idx]
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    out, weights = sdpa_attention_forward(module, q, k, v, packing.mask, **kwargs)  # out: [rows, width, heads, dim]
    return out[packing.row_of, packing.col_of].unsqueeze(0), weights


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # unpacked calls get SDPA's masks, unchanged


def _batchable(seq: object) -> bool:
    return (isinstance(seq, KVSequence) and all(type(layer) is DynamicLayer for layer in seq._cache.layers)
            and seq._model.config._attn_implementation in ("sdpa", PACKED_ATTENTION))


def position_ids(past: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """[1, N]: row b's new token i is at position past[b] + i."""
    return torch.tensor([[p + i for p, n in zip(past, new, strict=True) for i in range(n)]], dtype=torch.long)


def attention_mask(past: Sequence[int], new: Sequence[int], past_width: int, width: int) -> torch.Tensor:
    """[rows, 1, width, past_width + width] bool: row b's query i sees its own past (right-aligned in the
    gathered cache) and its own new tokens 0..i; a pad query (i >= new[b]) sees all of the row's real ones."""
    p = torch.tensor(past, dtype=torch.long)[:, None, None]
    last = torch.tensor(new, dtype=torch.long)[:, None, None] - 1
    query = torch.arange(width)[None, :, None]
    column = torch.arange(past_width + width)[None, None, :]
    own_past = (column >= past_width - p) & (column < past_width)
    own_new = (column >= past_width) & (column - past_width <= torch.minimum(query, last))
    return (own_past | own_new)[:, None]


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
    """One packed forward over rows whose caches already hold a prefix of their tokens."""
    model = seqs[0]._model
    model.config._attn_implementation = PACKED_ATTENTION  # SDPA itself when nothing is packed: set once, for good
    device = next(model.parameters()).device
    past = [len(s.tokens) for s in seqs]
    new = [t[p:] for t, p in zip(token_lists, past, strict=True)]
    widths = [len(n) for n in new]
    offsets = [sum(widths[:b]) for b in range(len(widths))]
    past_width, width = max(past), max(widths)
    packing = _Packing(
        row_of=torch.tensor([b for b, n in enumerate(widths) for _ in range(n)], device=device),
        col_of=torch.tensor([i for n in widths for i in range(n)], device=device),
        rows=len(seqs), width=width,
        past=[_gather(seqs, layer_idx, past_width) for layer_idx in range(len(seqs[0]._cache.layers))]
        if past_width else None,
        mask=attention_mask(past, widths, past_width, width).to(device),
    )
    input_ids = torch.tensor([[t for n in new for t in n]], dtype=torch.long, device=device)
    # logits only where a row needs them: its last n_out positions (a prefill row needs one, not all)
    keep = [off + n - n_out + j for off, n, n_out in zip(offsets, widths, n_outs, strict=True) for j in range(n_out)]
    kwargs = {"logits_to_keep": torch.tensor(keep, device=device)} if seqs[0]._logits_to_keep else {}
    with torch.inference_mode():
        result = model(
            input_ids=input_ids,
            position_ids=position_ids(past, widths).to(device),
            use_cache=False,  # each row's past comes through `packing`, its new keys/values go back below
            draftwire_packing=packing,
            **kwargs,
        )
        logits = result.logits[0] if kwargs else result.logits[0, keep]
        rows, at = [], 0
        for n_out in n_outs:
            rows.append(logits[at : at + n_out].float())
            at += n_out
        write_back(seqs, packing.new_kv, offsets, widths)
    for seq, tokens in zip(seqs, token_lists, strict=True):
        seq.tokens = tokens
    return rows


def write_back(seqs: Sequence[KVSequence], new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
               offsets: Sequence[int], widths: Sequence[int]) -> None:
    """Append row b's new keys/values (packed columns [offsets[b], offsets[b] + widths[b])) to its own cache."""
    for seq, off, n in zip(seqs, offsets, widths, strict=True):
        for layer_idx in range(len(new_kv)):
            keys, values = new_kv[layer_idx]
            seq._cache.update(keys[:, :, off : off + n], values[:, :, off : off + n], layer_idx)


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
