"""A draft and a target with different tokenizers: the draft's proposals expressed in the target's ids (TLI).

Speculative decoding needs the proposal q in the target's id space; nothing else. A `Vocabulary` is a
tokenizer reduced to what that needs: for each id the byte string it spells (None for special tokens and ids
without text), which ids are special, and which are byte-fallback pieces (`<0x0A>`). Its `digest` (sha256 of
its canonical bytes, `to_bytes`) is the tokenizer's identity: sessions compare digests, never names, and a
vocabulary fetched from elsewhere is checked against the digest it was asked for.

`VocabMapping` joins two vocabularies on equal byte strings, the token-level intersection (TLI, Timor et al.
2025): draft token d and target token t are one token iff they spell the same bytes. Special tokens never
join by bytes (`<|im_end|>` on one side may be text on the other); a pair of them joins only when the caller
names it (`special_pairs`, `pair_specials`). `to_target(q)` restricts the draft's distribution to the
intersection, renormalises it and writes it in target ids; the result goes through today's top-K /
quantize-then-sample path (`proposal.sparse_row`) unchanged, so `tkslt`, `full` and `dssd` keep working.

Why it stays lossless. Rejection sampling emits exactly the target's p for ANY proposal q' over the target's
ids, provided the device samples its token from the very q' the edge tests against: a token x drafted from q'
is kept with probability min(1, p(x)/q'(x)), so P(emit x and accept) = min(q'(x), p(x)); a rejection has
probability 1 - sum_y min(q'(y), p(y)) = sum_y max(0, p(y) - q'(y)), and the residual norm(max(0, p - q'))
then adds exactly max(0, p(x) - q'(x)); the sum is p(x). Nothing in this uses where q' came from, so TLI
changes only q' (and with it the acceptance rate), never the output distribution, and the edge's
verification code does not change. A draft token with no counterpart in the target gets no mass: the draft's
mass on it is dropped and the rest renormalised. When the draft puts ALL its mass outside the intersection,
`to_target` returns None and the device proposes nothing more that round (at the first position: zero
tokens, so the target samples its token from p itself, as in `ar`): proposing fewer tokens is still
rejection sampling, just with a shorter block. Greedy (temperature 0): p is one-hot at the target's argmax, a
draft token is kept iff it is that argmax and a rejection emits that argmax, so the output equals the
target's own greedy output token for token, whatever the draft proposes; `mask_logits` before warping makes
the draft's greedy choice the best *shared* token instead of one the target cannot take.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

_MAGIC = b"draftwire-vocab/1\n"
_NORMAL, _FALLBACK, _SPECIAL, _NONE = b"n", b"f", b"s", b"-"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPIECE = "\u2581"  # sentencepiece's visible space


class VocabularyError(ValueError):
    """A vocabulary that cannot be read, does not match its digest, or comes from an unsupported tokenizer."""

    code = "bad_vocabulary"


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """What a tokenizer means, id by id: the bytes each id spells; special tokens by their content only.

    `pieces[i]` is None for a special token and for an id with no text (logits rows past the tokenizer,
    which models pad for speed); `len(pieces)` is the logits width. `fallback` holds byte-fallback ids
    (`<0xC3>`): they spell one byte that a normal token may spell too, and the normal one is preferred.
    """

    pieces: tuple[bytes | None, ...]
    specials: Mapping[int, str] = field(default_factory=dict)  # id -> content, e.g. 0 -> "<|endoftext|>"
    fallback: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        bad = [i for i in self.specials if not (0 <= i < len(self.pieces) and self.pieces[i] is None)]
        if bad:
            raise VocabularyError(f"special ids {bad[:3]} are outside the vocabulary or spell bytes")

    @property
    def size(self) -> int:
        return len(self.pieces)

    def to_bytes(self) -> bytes:
        """The canonical form: what `digest` hashes and what a session fetches (a few MB for 150k tokens)."""
        out = [_MAGIC, struct.pack("<I", self.size)]
        for i, piece in enumerate(self.pieces):
            if i in self.specials:
                kind, data = _SPECIAL, self.specials[i].encode("utf-8")
            elif piece is None:
                kind, data = _NONE, b""
            else:
                kind, data = (_FALLBACK if i in self.fallback else _NORMAL), piece
            out += [kind, struct.pack("<I", len(data)), data]
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes, digest: str | None = None) -> Vocabulary:
        """Read `to_bytes` output; with `digest`, refuse bytes that do not hash to it (never a silent
        mis-mapping from a stale or corrupt copy)."""
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise VocabularyError(f"vocabulary bytes do not hash to {digest[:16]}...")
        if not data.startswith(_MAGIC):
            raise VocabularyError("not a draftwire vocabulary")
        try:
            pos = len(_MAGIC)
            (size,) = struct.unpack_from("<I", data, pos)
            pos += 4
            pieces: list[bytes | None] = []
            specials, fallback = {}, set()
            for i in range(size):
                kind = data[pos : pos + 1]
                (n,) = struct.unpack_from("<I", data, pos + 1)
                body = data[pos + 5 : pos + 5 + n]
                if len(body) != n or kind not in (_NORMAL, _FALLBACK, _SPECIAL, _NONE):
                    raise VocabularyError(f"vocabulary entry {i} is truncated or of unknown kind {kind!r}")
                pos += 5 + n
                pieces.append(body if kind in (_NORMAL, _FALLBACK) else None)
                if kind == _SPECIAL:
                    specials[i] = body.decode("utf-8")
                elif kind == _FALLBACK:
                    fallback.add(i)
        except (struct.error, UnicodeDecodeError) as exc:
            raise VocabularyError(f"vocabulary bytes are malformed: {exc}") from exc
        if pos != len(data):
            raise VocabularyError(f"{len(data) - pos} bytes after the last vocabulary entry")
        return cls(tuple(pieces), specials, frozenset(fallback))

    @cached_property
    def digest(self) -> str:
        """sha256 (hex) of `to_bytes()`: the tokenizer's identity, exchanged by sessions."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @cached_property
    def canonical(self) -> dict[bytes, int]:
        """bytes -> the one id that stands for them: a normal token before a byte-fallback one, then the
        lowest id. Empty pieces spell nothing and are never a proposal."""
        out: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            if not piece:
                continue
            prev = out.get(piece)
            if prev is None or (prev in self.fallback and i not in self.fallback):
                out[piece] = i
        return out

    @cached_property
    def longest(self) -> int:
        """The longest piece, in bytes."""
        return max(map(len, self.canonical), default=0)

    def spell(self, ids: Iterable[int]) -> bytes | None:
        """The bytes `ids` spell, or None if one of them is special or has no text."""
        out = []
        for i in ids:
            piece = self.pieces[i] if 0 <= i < self.size else None
            if piece is None:
                return None
            out.append(piece)
        return b"".join(out)

    def special_id(self, content: str) -> int:
        """The id of the special token with this content."""
        for i, c in self.specials.items():
            if c == content:
                return i
        raise VocabularyError(f"no special token {content!r} in this vocabulary")


# --- tokenizers -> Vocabulary ---------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (what byte-level BPE pieces are written in),
    mapped back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF = _byte_level_alphabet()


def _component_types(node) -> set[str]:
    """Every `type` in a tokenizers component tree (a decoder Sequence nests its parts)."""
    if isinstance(node, dict):
        return {node.get("type", ""), *(t for v in node.values() for t in _component_types(v))}
    if isinstance(node, list):
        return {t for v in node for t in _component_types(v)}
    return set()


def _byte_level_piece(piece: str) -> bytes | None:
    try:
        return bytes(_BYTE_OF[ch] for ch in piece)
    except KeyError:  # not written in the byte alphabet: no text we can vouch for
        return None


def vocabulary_of(tokenizer, size: int | None = None) -> Vocabulary:
    """A Hugging Face tokenizer (or draftwire's `ByteTokenizer`) as a Vocabulary of `size` ids (the model's
    logits width; default the tokenizer's length).

    Byte-level BPE (GPT-2, SmolLM2, Qwen): pieces are written one character per byte in GPT-2's alphabet.
    Sentencepiece (Llama, Gemma 3): `▁` is a space and `<0xNN>` byte-fallback pieces are byte NN. Added
    tokens that are not special spell their content literally. Special tokens (the tokenizer's
    `all_special_ids` and every added token marked special) spell nothing: they join another vocabulary only
    by an explicit pair. Any other tokenizer family is refused rather than guessed at.
    """
    from draftwire.shared.models.byte_tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        n = len(tokenizer)
        special_ids = set(tokenizer.all_special_ids)
        specials = {256: "<s>", 257: "</s>", 258: "<pad>"}
        pieces = [bytes([i]) if i < 256 else None for i in range(max(n, size or 0))]
        return Vocabulary(tuple(pieces), {i: specials[i] for i in special_ids})
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabularyError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    types = _component_types(spec.get("decoder")) | _component_types(spec.get("pre_tokenizer"))
    byte_fallback = bool(spec.get("model", {}).get("byte_fallback"))
    if "ByteLevel" in types:
        normal = _byte_level_piece
    elif "ByteFallback" in types or "Metaspace" in types or byte_fallback or "Replace" in types:
        def normal(piece: str) -> bytes | None:
            return piece.replace(SPIECE, " ").encode("utf-8")
    else:
        raise VocabularyError(f"unsupported tokenizer family (decoder components {sorted(types - {''})})")
    vocab = backend.get_vocab(with_added_tokens=True)
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}))
    special_ids = {i for i, tok in added.items() if getattr(tok, "special", False)}
    special_ids |= set(getattr(tokenizer, "all_special_ids", ()))
    n = max(max(vocab.values()) + 1, len(tokenizer))
    size = n if size is None else size
    if size < n:
        raise VocabularyError(f"the tokenizer has {n} ids but the model only {size} logits")
    pieces: list[bytes | None] = [None] * size
    specials: dict[int, str] = {}
    fallback = set()
    for piece, i in vocab.items():
        if i in special_ids:
            specials[i] = piece
        elif i in added:  # matched literally in text, not written in the model's piece alphabet
            pieces[i] = piece.encode("utf-8")
        elif byte_fallback and (m := _BYTE_PIECE.fullmatch(piece)):
            pieces[i] = bytes([int(m.group(1), 16)])
            fallback.add(i)
        else:
            pieces[i] = normal(piece)
    return Vocabulary(tuple(pieces), specials, frozenset(fallback))


# --- the mapping ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VocabMapping:
    """Draft ids <-> target ids over the tokens both vocabularies spell the same (TLI).

    `draft_to_target[d]` is the target id draft token d proposes (-1: none, its mass is dropped);
    `target_to_draft[t]` the draft id that continues the draft's own context after target token t (-1:
    none). Several draft ids spelling one string all propose its one canonical target id (their mass adds).
    """

    draft_digest: str
    target_digest: str
    draft_to_target: np.ndarray  # int64 [draft size]
    target_to_draft: np.ndarray  # int64 [target size]

    @classmethod
    def build(
        cls, draft: Vocabulary, target: Vocabulary, special_pairs: Iterable[tuple[int, int]] = ()
    ) -> VocabMapping:
        """Join `draft` and `target` on equal byte strings, plus the named (draft id, target id) special pairs.
        Identical vocabularies (equal digests) map every id to itself, special tokens included: today's path."""
        if draft.digest == target.digest:
            ids = np.arange(draft.size, dtype=np.int64)
            return cls(draft.digest, target.digest, ids, ids.copy())
        d2t = np.full(draft.size, -1, dtype=np.int64)
        t2d = np.full(target.size, -1, dtype=np.int64)
        t_canon, d_canon = target.canonical, draft.canonical
        for d, piece in enumerate(draft.pieces):
            if piece and (t := t_canon.get(piece)) is not None:
                d2t[d] = t
        for t, piece in enumerate(target.pieces):
            if piece and (d := d_canon.get(piece)) is not None:
                t2d[t] = d
        for d, t in special_pairs:
            if d not in draft.specials or t not in target.specials:
                raise VocabularyError(f"pair ({d}, {t}) is not a special token on both sides")
            d2t[d], t2d[t] = t, d
        return cls(draft.digest, target.digest, d2t, t2d)

    @property
    def draft_size(self) -> int:
        return len(self.draft_to_target)

    @property
    def target_size(self) -> int:
        return len(self.target_to_draft)

    @property
    def identity(self) -> bool:
        """One vocabulary on both sides: no mapping needed (the caller keeps today's path and cost)."""
        return self.draft_digest == self.target_digest

    @cached_property
    def shared(self) -> np.ndarray:
        """bool [draft size]: the draft ids that have a counterpart in the target."""
        return self.draft_to_target >= 0

    @property
    def intersection(self) -> int:
        """How many target ids a draft can propose."""
        return int(np.unique(self.draft_to_target[self.shared]).size)

    @cached_property
    def _src(self) -> np.ndarray:
        return np.flatnonzero(self.shared)

    def to_target(self, q: np.ndarray) -> np.ndarray | None:
        """The draft's distribution q (draft ids, already warped) restricted to the intersection, renormalised,
        in target ids: float64 [target size]. None when q has no mass there (nothing can be proposed: the
        device drafts no further this round). This row, after `sparse_row`, is what the device samples from
        and what crosses the wire."""
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (self.draft_size,):
            raise ValueError(f"expected a draft row of {self.draft_size} probabilities, got shape {q.shape}")
        out = np.bincount(self.draft_to_target[self._src], weights=q[self._src], minlength=self.target_size)
        mass = out.sum()
        return out / mass if mass > 0 else None

    def mask_logits(self, logits: np.ndarray) -> np.ndarray:
        """Draft logits [..., draft size] with the ids that have no counterpart at -inf: warp after this, and
        greedy picks the best token the target can take, top-p builds its nucleus among those only."""
        return np.where(self.shared, logits, -np.inf)

    def to_draft(self, target_ids: Sequence[int]) -> list[int]:
        """The draft ids for target tokens the draft itself proposed (each has a counterpart by construction);
        raises for one without: such a token is re-tokenized from text (`retokenize`), not mapped."""
        out = [int(self.target_to_draft[t]) for t in target_ids]
        if -1 in out:
            raise ValueError(f"target token {target_ids[out.index(-1)]} has no draft counterpart")
        return out


def pair_specials(draft: Vocabulary, target: Vocabulary, contents: Iterable[str]) -> list[tuple[int, int]]:
    """(draft id, target id) for each named special token present on both sides, e.g. ("<|im_end|>",): the
    explicit way special tokens join. A name missing on either side is an error, not a silent skip."""
    return [(draft.special_id(c), target.special_id(c)) for c in contents]


__all__ = ["SPIECE", "VocabMapping", "Vocabulary", "VocabularyError", "pair_specials", "vocabulary_of"]
