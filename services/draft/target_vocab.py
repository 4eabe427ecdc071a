"""Which vocabulary a draft service speaks to a target in: its own (today's path) or the target's, fetched by digest.

The verifier names its target's vocabulary digest in `draftwire.verifier.info`. Equal to the draft's own: the
session runs exactly as before (no mapping, the draft's tokenizer, no fetch). Different: the device fetches the
target's tokenizer bundle from the `DRAFTWIRE_VOCAB` object store by that digest (never by a model name), checks
it against the digest (`vocab_bundle.unpack`), keeps it in memory by digest, and builds the TLI `CrossVocab`
once per digest. A missing bucket or object is `unknown_vocabulary`, bytes that are not that vocabulary
`bad_vocabulary`: an error reply on the job, never a guess. A failure is not cached: the next job asks again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from draftwire.shared.core.cross_vocab import CrossVocab, cross_for, model_vocabulary
from draftwire.shared.core.protocol import TargetInfo
from draftwire.shared.core.vocab_bundle import TargetVocab, unpack
from draftwire.shared.core.vocab_mapping import Vocabulary, VocabularyError
from draftwire.shared.io import bus

UNKNOWN = "unknown_vocabulary"
BAD = VocabularyError.code  # "bad_vocabulary"


class VocabUnavailable(Exception):
    """The target's vocabulary could not be had; `code` is `unknown_vocabulary` or `bad_vocabulary`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Pairing:
    """How one job talks to its target: `cross` None is today's path; otherwise prompts are encoded and
    output decoded with the target's tokenizer (`target`), since the session's ids are the target's."""

    cross: CrossVocab | None
    target: TargetVocab | None
    draft_digest: str
    target_digest: str

    def encode_prompt(self, model, prompt: str) -> list[int]:
        return model.encode(prompt) if self.target is None else self.target.encode(prompt)

    def render_chat(self, model, messages: Sequence[tuple[str, str]], template: str | None) -> list[int]:
        """A chat in the target's ids: rendered to text with the target's template, encoded by its tokenizer
        (the template writes the special tokens, so none are added)."""
        if self.target is None:
            return model.render_chat(messages, template)
        if template is None:
            raise ValueError("the target has no chat template: send `prompt` instead of `messages`")
        text = model.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                   chat_template=template, add_generation_prompt=True, tokenize=False)
        return list(self.target.tokenizer.encode(text, add_special_tokens=False))

    def decoder(self, model) -> Callable[[list[int]], str]:
        return model.decode if self.target is None else self.target.decode


class TargetVocabs:
    """Target tokenizers and mappings by digest, for one draft model; fetched at most once per digest at a time."""

    def __init__(self, js, model) -> None:
        self.js = js
        self.model = model
        self.mine: Vocabulary | None = None
        self._bundles: dict[str, TargetVocab] = {}
        self._cross: dict[tuple, CrossVocab | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def load_own(self) -> None:
        """The draft's own vocabulary (None for a model without a tokenizer: it is compared by size)."""
        try:
            self.mine = await asyncio.to_thread(model_vocabulary, self.model)
        except VocabularyError:
            self.mine = None

    async def bundle(self, digest: str) -> TargetVocab:
        """The target tokenizer published under `digest`, from memory or the object store."""
        if (hit := self._bundles.get(digest)) is not None:
            return hit
        async with self._locks.setdefault(digest, asyncio.Lock()):
            if (hit := self._bundles.get(digest)) is not None:
                return hit
            try:
                data = await bus.fetch_vocabulary(self.js, digest)
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.ObjectNotFoundError) as exc:
                raise VocabUnavailable(UNKNOWN, f"no tokenizer for target vocabulary {digest[:12]}... in "
                                                f"{bus.VOCAB_BUCKET} ({type(exc).__name__})") from None
            except (nats.errors.Error, TimeoutError) as exc:
                raise VocabUnavailable(UNKNOWN, f"cannot fetch target vocabulary {digest[:12]}... from "
                                                f"{bus.VOCAB_BUCKET}: {exc!r}") from None
            try:
                bundle = await asyncio.to_thread(unpack, data, digest)
            except VocabularyError as exc:
                raise VocabUnavailable(BAD, f"target vocabulary {digest[:12]}...: {exc}") from None
            self._bundles[digest] = bundle
            return bundle

    async def pairing(self, target: TargetInfo, needs_draft: bool) -> Pairing:
        """The pairing for a target. Raises VocabUnavailable, or ParamError for a pair that cannot work."""
        mine = self.mine.digest if self.mine is not None else ""
        if not target.vocab or self.mine is None or target.vocab == mine:  # one vocabulary, or sizes decide
            if self.model.vocab_size != target.vocab_size:
                raise VocabUnavailable("vocab_mismatch", f"draft {self.model.name} has vocabulary "
                                                         f"{self.model.vocab_size} but target {target.model} has "
                                                         f"{target.vocab_size}, and no digest to map one to the other")
            return Pairing(None, None, mine, target.vocab)
        bundle = await self.bundle(target.vocab)
        if not needs_draft:
            return Pairing(None, bundle, mine, target.vocab)
        key = (target.vocab, target.eos_token_ids)
        if key not in self._cross:
            self._cross[key] = await asyncio.to_thread(cross_for, self.model, bundle.vocabulary,
                                                       target.vocab_size, target.eos_token_ids)
        return Pairing(self._cross[key], bundle, mine, target.vocab)


__all__ = ["BAD", "UNKNOWN", "Pairing", "TargetVocabs", "VocabUnavailable"]
