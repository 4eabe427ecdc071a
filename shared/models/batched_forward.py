"""One target (or draft) forward pass over many sequences: the model call of continuous batching.

Every `KVSequence` keeps its own KV cache (so a session rolls back alone after a rejection, and is evicted
alone). A batch PACKS every row's new tokens into one sequence of N tokens (no padding), so the projections,
MLPs and output layer multiply N rows, not rows x the longest row's new tokens (at 16 sessions that padding
was 29% of the verifier's and 33% of the draft's matmul rows). Only attention is per row: an attention
function (`_packed_attention`, registered with transformers' AttentionInterface and delegating to its SDPA
when nothing is packed) appends row b's new keys and values to row b's own cache (a `GrowingLayer`: written
in place, no copy of the past) and runs SDPA on that row's queries against that row's cache, then packs the
outputs back. No row's past is copied, padded or masked against another's. A sequence alone takes the very
same path as a batch of one, so a row of a batch and its sequence alone differ at most by how the matmul
rounds N rows. The three things batched speculative decoding gets wrong are set per row here and nowhere
else:

- position ids: row b's new token i is at position L_b + i (its own length, never the batch's);
- attention mask: row b's query i sees its own past and its own new tokens up to itself (`row_mask`);
- KV write-back: row b's new keys/values are packed columns [offset_b, offset_b + n_b) (`row_states`),
  appended to its own cache; nothing of another row enters it. A pass that fails takes them out again.

Rows with more than `PREFILL_ROWS` new tokens (a prompt's prefill, a resync) share a pass only with rows of a
similar length and at most `PREFILL_GROUP` of them, which bounds one pass's activations. Models whose caches
are not plain full-attention layers (sliding windows: Gemma 3), models not on SDPA attention, and sequences
that are not `KVSequence`s (test doubles) run one at a time through transformers' own cache and attention:
same results, no batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .kv_sequence import PACKED_ATTENTION, KVSequence, common_prefix

PREFILL_ROWS = 32  # new tokens above which a row only shares a pass with rows of a similar length
PREFILL_GROUP = 8  # prefills in one pass at most (bounds the pass's activations)
PREFILL_CHUNK = 512  # prompt tokens a service's prefill feeds per pass (chunked prefill, as vLLM's default)


@dataclass
class _Packing:
    """What the attention of one packed forward needs besides q, k, v: each row's sequence, where its new
    tokens sit among the N packed ones, and its mask."""

    seqs: list[KVSequence]
    offsets: list[int]
    widths: list[int]
    masks: list[torch.Tensor | None]


def row_states(keys: torch.Tensor, values: torch.Tensor, offset: int, width: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b's new keys and values: packed columns [offset, offset + width) of [1, kv_heads, N, dim]."""
    return keys[:, :, offset : offset + width], values[:, :, offset : offset + width]


def row_mask(past: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """[1, 1, width, past + width] bool: new query i sees the row's `past` cached tokens and new tokens 0..i
    (causal, aligned to the end). None for one new token: it sees everything (SDPA then needs no mask)."""
    if width == 1:
        return None
    query = torch.arange(width, device=device)[:, None]
    column = torch.arange(past + width, device=device)[None, :]
    return (column <= past + query)[None, None]


def _packed_attention(module, query, key, value, attention_mask, draftwire_packing: _Packing | None = None,
                      **kwargs):
    """Transformers' SDPA attention; in a packed forward, per row against its own cache (see module doc)."""
    if draftwire_packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    packing, layer_idx = draftwire_packing, module.layer_idx
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outs = []
    for seq, off, n, mask in zip(packing.seqs, packing.offsets, packing.widths, packing.masks, strict=True):
        keys, values = seq._cache.layers[layer_idx].update(*row_states(key, value, off, n))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, off : off + n], keys, values, attn_mask=mask, scale=kwargs.get("scaling"), enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [1, heads, N, dim]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # unpacked calls get SDPA's masks, unchanged


def _batchable(seq: object) -> bool:
    return isinstance(seq, KVSequence) and seq.packable()


def position_ids(past: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """[1, N]: row b's new token i is at position past[b] + i."""
    return torch.tensor([[p + i for p, n in zip(past, new, strict=True) for i in range(n)]], dtype=torch.long)


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
        rows = _forward_rows([seqs[i] for i in group], [[int(t) for t in token_lists[i]] for i in group],
                             [n_outs[i] for i in group])
        for i, logits in zip(group, rows, strict=True):
            out[i] = logits
    return out  # type: ignore[return-value]


def _groups(rows: list[int], new: list[int]) -> list[list[int]]:
    """Rows that share a pass: every row with at most PREFILL_ROWS new tokens in one, longer ones (prefills)
    with others of a similar length (the longest at most 1.5x the shortest, at most PREFILL_GROUP of them).
    Nothing is padded any more; the grouping bounds one pass's activations."""
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
    device = seqs[0].device
    past = [len(s.tokens) for s in seqs]
    new = [t[p:] for t, p in zip(token_lists, past, strict=True)]
    widths = [len(n) for n in new]
    offsets = [sum(widths[:b]) for b in range(len(widths))]
    packing = _Packing(seqs=seqs, offsets=offsets, widths=widths,
                       masks=[row_mask(p, n, device) for p, n in zip(past, widths, strict=True)])
    input_ids = torch.tensor([[t for n in new for t in n]], dtype=torch.long, device=device)
    # logits only where a row needs them: its last n_out positions (a prefill row needs one, not all)
    keep = [off + n - n_out + j for off, n, n_out in zip(offsets, widths, n_outs, strict=True) for j in range(n_out)]
    kwargs = {"logits_to_keep": torch.tensor(keep, device=device)} if seqs[0]._logits_to_keep else {}
    try:
        with torch.inference_mode():
            result = model(
                input_ids=input_ids,
                position_ids=position_ids(past, widths).to(device),
                use_cache=False,  # each row's cache comes and goes through `packing`
                draftwire_packing=packing,
                **kwargs,
            )
    except BaseException:
        for seq, p in zip(seqs, past, strict=True):  # the layers written before the failure hold new columns
            seq.restore(p)
        raise
    logits = result.logits[0] if kwargs else result.logits[0, keep]
    rows, at = [], 0
    for n_out in n_outs:
        rows.append(logits[at : at + n_out].float())
        at += n_out
    for seq, tokens in zip(seqs, token_lists, strict=True):
        seq.tokens = tokens
    return rows
