"""A draft whose tokenizer is not the target's: what the device needs to draft in the target's id space.

`CrossVocab` bundles the pieces the core modules provide (docs/cross_tokenizer.md): the TLI `VocabMapping`
(draft rows -> proposals in target ids), both `Vocabulary`s (the target's to spell what it commits, the draft's
to re-tokenize it) and the draft tokenizer's own encoder. `DraftSession` holds one when the digests differ and
none when they are equal, so a same-tokenizer pair keeps today's path and cost. Special tokens join by equal
content (`<|im_end|>` on both sides), and the draft's end of sequence always stands for the target's: a draft
that may propose stopping is a better draft, and any proposal stays lossless.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from draftwire.shared.core.params import ParamError
from draftwire.shared.core.retokenize import Encoder, Item, committed_stream, hf_encoder, retokenize
from draftwire.shared.core.vocab_mapping import VocabMapping, Vocabulary, VocabularyError, vocabulary_of

_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {size: Vocabulary}


def model_vocabulary(model) -> Vocabulary | None:
    """The Vocabulary of a loaded model (its tokenizer at its logits width), computed once per tokenizer;
    None for a model without a tokenizer (the statistical toys), which is compared by size only."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    per_size = _VOCABS.setdefault(tokenizer, {})
    if model.vocab_size not in per_size:
        per_size[model.vocab_size] = vocabulary_of(tokenizer, model.vocab_size)
    return per_size[model.vocab_size]


def _eos_id(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if isinstance(eos, int) else None


@dataclass(frozen=True, eq=False)
class CrossVocab:
    mapping: VocabMapping
    draft: Vocabulary
    target: Vocabulary
    encode: Encoder  # draft tokenizer: text -> draft ids, no special tokens
    specials: dict[int, int]  # paired target special id -> draft id
    lead: tuple[int, ...]  # the draft ids its tokenizer opens a text with (its BOS), if any

    def stream(self, target_ids) -> list[Item]:
        """What the target committed as the draft sees it; the draft's BOS leads unless a paired special
        already opens it."""
        out = committed_stream(target_ids, self.target, self.specials)
        if self.lead and not (out and out[0] == self.lead[0]):
            out = [*self.lead, *out]
        return out

    def draft_ids(self, target_ids, cached=(), settled: int | None = None):
        """`retokenize` of the committed target ids against the draft ids `cached` (see retokenize.py)."""
        return retokenize(self.stream(target_ids), list(cached), self.draft, self.encode, settled=settled)

    def draft_eos(self, target_eos) -> tuple[int, ...]:
        """The draft ids that propose the target's EOS ids (for the EOS mask in draft space)."""
        t2d = self.mapping.target_to_draft
        return tuple(int(t2d[e]) for e in target_eos if 0 <= e < len(t2d) and t2d[e] >= 0)


def build_cross(draft_tokenizer, draft: Vocabulary, target: Vocabulary, target_eos: int | None = None,
                ) -> CrossVocab | None:
    """None when the two vocabularies are one (equal digests: today's path). Raises ParamError for a pair
    that cannot speculate: no token in common."""
    if draft.digest == target.digest:
        return None
    by_content = {c: t for t, c in target.specials.items()}
    pairs = {d: by_content[c] for d, c in draft.specials.items() if c in by_content}
    d_eos = _eos_id(draft_tokenizer)
    if d_eos in draft.specials and target_eos in target.specials and target_eos not in pairs.values():
        pairs.setdefault(d_eos, target_eos)
    mapping = VocabMapping.build(draft, target, sorted(pairs.items()))
    if mapping.intersection == 0:
        raise ParamError(f"the draft's vocabulary ({draft.digest[:12]}) shares no token with the target's "
                         f"({target.digest[:12]}): pick a draft whose tokenizer spells some of the same text")
    lead: tuple[int, ...] = ()
    bos = getattr(draft_tokenizer, "bos_token_id", None)
    if isinstance(bos, int):
        try:
            if list(draft_tokenizer.encode("a"))[:1] == [bos]:
                lead = (bos,)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot encode plain text has no lead to offer
            lead = ()
    return CrossVocab(mapping, draft, target, hf_encoder(draft_tokenizer), {t: d for d, t in pairs.items()}, lead)


def cross_for(draft_model, target: Vocabulary | None, target_size: int, target_eos=()) -> CrossVocab | None:
    """The CrossVocab a draft model needs for a target (None: same vocabulary). A pair that cannot work is a
    ParamError naming why: an unreadable tokenizer, different vocabularies without a target vocabulary to map
    to, or nothing in common."""
    if draft_model is None:
        return None
    try:
        mine = model_vocabulary(draft_model)
    except VocabularyError as exc:
        raise ParamError(f"draft {draft_model.name}: {exc}") from exc
    if mine is None or target is None:  # a toy without a tokenizer: one vocabulary iff one size
        if draft_model.vocab_size != target_size:
            raise ParamError(f"draft {draft_model.name} has vocabulary {draft_model.vocab_size} but the target "
                             f"{target_size}, and no tokenizer to map one to the other")
        return None
    if target.size != target_size:
        raise ParamError(f"the target's vocabulary has {target.size} ids but its logits {target_size}")
    eos = next((int(e) for e in target_eos if int(e) in target.specials), None)
    return build_cross(draft_model.tokenizer, mine, target, eos)


def drafted_counterparts(cross: CrossVocab, target_ids) -> list[int]:
    """Draft ids for target tokens the draft proposed itself (they have counterparts by construction)."""
    return cross.mapping.to_draft([int(t) for t in np.asarray(target_ids).tolist()])


__all__ = ["CrossVocab", "build_cross", "cross_for", "drafted_counterparts", "model_vocabulary"]
