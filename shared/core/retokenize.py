"""The draft's own tokens for what the target committed, recomputing as little of its KV cache as it can.

With different tokenizers the device keeps its draft KV cache in draft tokens, while the session commits
target tokens (accepted drafts and the target's corrections). After every round the device turns the
committed target ids into a stream (`committed_stream`: the bytes they spell, with paired special tokens as
draft ids) and calls `retokenize` with the draft tokens in its cache. It returns the draft tokenization of the
stream and `keep`, the longest common prefix with the cache: roll the cache back to `keep`, feed `ids[keep:]`.

Two boundaries need care. Target tokens may end in the middle of a UTF-8 character, so everything works on
bytes, never on decoded text; an incomplete (or invalid) run of bytes is spelled with the draft's single-byte
tokens, and re-tokenized into whole-character tokens once the rest of the character is committed. And the
draft tokenizer's encoding of a longer text can change its last tokens ("hel" + "lo" becomes "hello"), so
re-tokenization starts a few (`margin`) tokens before the end of the part of the cache that still spells the
stream, not at its end; the common prefix then keeps whatever did not change. Tokens the device drafted
itself are in its cache too, but they are the draft's choice of segmentation, not its tokenizer's: the caller
says how many cached tokens came from an earlier `retokenize` (`settled`), and only those are trusted as a
starting point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from draftwire.shared.core.vocab_mapping import Vocabulary

MARGIN = 4  # tokens re-tokenized before the end of what the cache spells: a merge rarely reaches further back

Item = bytes | int  # a run of text bytes, or a draft special token id (a hard boundary, as in tokenizers)
Encoder = Callable[[str], Sequence[int]]  # text -> draft ids, no special tokens added or parsed


@dataclass(frozen=True)
class Retokenized:
    ids: list[int]  # the draft's tokens for the whole stream
    keep: int  # how many of the cached tokens are still valid: the draft KV cache is rolled back to this
    settled: int  # the first `settled` ids are a safe base for the next call (not an incomplete character)
    encoded_from: int  # the token index re-tokenization started at (all before it was taken from the cache)


def committed_stream(
    target_ids: Sequence[int], target: Vocabulary, specials: Mapping[int, int] = {}, lead: Sequence[int] = ()
) -> list[Item]:
    """The committed target tokens as the draft should see them: `lead` (draft ids that open the draft's
    context, such as its BOS), then the bytes the target ids spell, with target special tokens replaced by
    their paired draft ids (`specials`: target id -> draft id). An unpaired special token (or an id without
    text) is left out: it shapes only the draft's context, never a proposal, so leaving it out costs
    acceptance, never correctness."""
    out: list[Item] = [int(d) for d in lead]
    run = bytearray()
    for t in target_ids:
        t = int(t)
        piece = target.pieces[t] if 0 <= t < target.size else None
        if piece is not None:
            run += piece
        elif t in specials:
            if run:
                out.append(bytes(run))
                run.clear()
            out.append(int(specials[t]))
    if run:
        out.append(bytes(run))
    return out


def hf_encoder(tokenizer) -> Encoder:
    """A Hugging Face tokenizer's encoding of plain text: no BOS, and text that happens to spell a special
    token (`<|im_end|>`) stays text."""
    from draftwire.shared.models.byte_tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return lambda text: tokenizer.encode(text, add_special_tokens=False)
    return lambda text: tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _spell_greedy(data: bytes, draft: Vocabulary) -> list[int]:
    """Longest match over the draft's pieces: a correct (if not the tokenizer's) spelling of any bytes the
    draft has tokens for; the fallback when the tokenizer's own encoding does not spell them back."""
    lookup, longest = draft.canonical, draft.longest
    out, i = [], 0
    while i < len(data):
        for n in range(min(longest, len(data) - i), 0, -1):
            if (d := lookup.get(data[i : i + n])) is not None:
                out.append(d)
                i += n
                break
        else:
            raise ValueError(f"the draft vocabulary has no token for byte {data[i]:#04x}")
    return out


def _complete(data: bytes) -> int:
    """The length of `data` without an incomplete UTF-8 character at its end (the rest of it not committed
    yet)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return len(data)
        if b >= 0xC0:  # a lead byte: 110xxxxx needs 2 bytes, 1110xxxx 3, 11110xxx 4
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return len(data) - back if back < need else len(data)
    return len(data)


def encode_bytes(data: bytes, draft: Vocabulary, encode: Encoder) -> tuple[list[int], int]:
    """Draft ids that spell exactly `data`, and how many of the last ones spell an incomplete character at
    its end (one byte token each). Each valid UTF-8 stretch is the tokenizer's own encoding (checked: a
    normalizer or a dummy prefix could change the bytes; a longest match over the pieces when it does); a
    byte that is not part of a whole character is the draft's token for that byte."""
    out: list[int] = []
    complete = _complete(data)
    pos = 0
    while pos < complete:
        try:
            text, stop = data[pos:complete].decode("utf-8"), complete
        except UnicodeDecodeError as exc:
            text, stop = data[pos : pos + exc.start].decode("utf-8"), pos + exc.start
        if text:
            chunk = data[pos:stop]
            ids = [int(i) for i in encode(text)]
            out += ids if draft.spell(ids) == chunk else _spell_greedy(chunk, draft)
            pos = stop
        if pos < complete:  # a byte that is not part of a whole character
            out += _spell_greedy(data[pos : pos + 1], draft)
            pos += 1
    tail = _spell_greedy(data[complete:], draft) if complete < len(data) else []
    return out + tail, len(tail)


def _walk(stream: Sequence[Item], cached: Sequence[int], draft: Vocabulary) -> list[tuple[int, int]]:
    """Positions (item, byte offset) in `stream` after each cached token, for as long as they spell it."""
    positions = [(0, 0)]
    item, offset = 0, 0
    for d in cached:
        if item >= len(stream):
            break
        here = stream[item]
        if isinstance(here, int):
            if d != here:
                break
            item += 1
        else:
            piece = draft.pieces[d] if 0 <= d < draft.size else None
            if not piece or not here.startswith(piece, offset):
                break
            offset += len(piece)
            if offset == len(here):
                item, offset = item + 1, 0
        positions.append((item, offset))
    return positions


def _mid_character(stream: Sequence[Item], position: tuple[int, int]) -> bool:
    item, offset = position
    return item < len(stream) and offset > 0 and 0x80 <= stream[item][offset] < 0xC0


def retokenize(
    stream: Sequence[Item],
    cached: Sequence[int],
    draft: Vocabulary,
    encode: Encoder,
    settled: int | None = None,
    margin: int = MARGIN,
) -> Retokenized:
    """The draft tokens for `stream`, reusing the cache where it agrees.

    `cached`: the draft ids in the device's KV cache; its first `settled` (default all) are an earlier
    result's `settled` ids (the rest were drafted, or spell a character that was not complete yet).
    Re-tokenization starts `margin` tokens before the end of the settled part that still spells the stream,
    and never inside a character (byte-level BPE may split one across tokens); `keep` is the common prefix of
    `cached` and the result.
    """
    settled = len(cached) if settled is None else min(settled, len(cached))
    positions = _walk(stream, cached[:settled], draft)
    start = max(len(positions) - 1 - margin, 0)
    while start > 0 and _mid_character(stream, positions[start]):
        start -= 1
    item, offset = positions[start]
    ids = [int(d) for d in cached[:start]]
    tail = 0
    for i in range(item, len(stream)):
        here = stream[i]
        if isinstance(here, int):
            ids.append(here)
            tail = 0
        else:
            more, tail = encode_bytes(here[offset:] if i == item else here, draft, encode)
            ids += more
    keep = 0
    for a, b in zip(cached, ids, strict=False):
        if a != b:
            break
        keep += 1
    return Retokenized(ids, keep, len(ids) - tail, start)


__all__ = ["MARGIN", "Retokenized", "committed_stream", "encode_bytes", "hf_encoder", "retokenize"]
