"""A target's tokenizer as one self-checking object: what a device with another tokenizer needs from the edge.

The verifier publishes `pack(tokenizer, size)` once, named by the vocabulary digest (docs/cross_tokenizer.md);
a device that meets that digest in `draftwire.verifier.info` fetches it by the digest and `unpack`s it. The
bundle holds the canonical `Vocabulary.to_bytes()` (what the TLI mapping needs) and the tokenizer itself
(`tokenizer.json` for a Hugging Face fast tokenizer, or a marker for the byte tokenizer), because the session's
ids are the target's: the device encodes the prompt and decodes the output with it. `unpack` trusts nothing it
was sent: the vocabulary bytes must hash to the digest asked for, and the rebuilt tokenizer must spell that
very vocabulary, or it is a `VocabularyError` (`bad_vocabulary`), never a silent mis-mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from draftwire.shared.core.vocab_mapping import Vocabulary, VocabularyError, vocabulary_of

FORMAT = "draftwire-tokenizer/1"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True, eq=False)
class TargetVocab:
    """The target's vocabulary and a tokenizer that encodes and decodes in its ids."""

    vocabulary: Vocabulary
    tokenizer: object  # `encode(text)` with the target's special tokens, `decode(ids, skip_special_tokens=)`

    @property
    def digest(self) -> str:
        return self.vocabulary.digest

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _tokenizer_spec(tokenizer) -> dict:
    from draftwire.shared.models.byte_tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "bytes"}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabularyError(f"{type(tokenizer).__name__} cannot be exchanged: not a fast (tokenizers) tokenizer")
    named = {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()
             if k in _SPECIAL_KEYS and isinstance(v, str)}
    return {"kind": "hf", "json": backend.to_str(), "specials": named}


def pack(tokenizer, size: int, vocabulary: Vocabulary | None = None) -> tuple[str, bytes]:
    """(digest, bundle bytes) for a target whose logits are `size` wide (`vocabulary`: already computed)."""
    vocabulary = vocabulary or vocabulary_of(tokenizer, size)
    body = {"format": FORMAT, "vocab": vocabulary.to_bytes(), "tokenizer": _tokenizer_spec(tokenizer)}
    return vocabulary.digest, msgpack.packb(body, use_bin_type=True)


def _rebuild(spec: dict):
    kind = spec.get("kind")
    if kind == "bytes":
        from draftwire.shared.models.byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    if kind == "hf" and isinstance(spec.get("json"), str):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        named = {k: v for k, v in (spec.get("specials") or {}).items() if k in _SPECIAL_KEYS and isinstance(v, str)}
        try:
            return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec["json"]), **named)
        except Exception as exc:  # noqa: BLE001 - any failure to parse is bad bytes, said as such
            raise VocabularyError(f"the tokenizer in the bundle cannot be read: {type(exc).__name__}: {exc}") from None
    raise VocabularyError(f"unknown tokenizer kind {kind!r} in the bundle")


def unpack(data: bytes, digest: str) -> TargetVocab:
    """The bundle published under `digest`; VocabularyError unless it is exactly that vocabulary."""
    try:
        body = msgpack.unpackb(data, raw=False)
        vocab_bytes, spec = body["vocab"], body["tokenizer"]
        ok = body.get("format") == FORMAT and isinstance(vocab_bytes, bytes) and isinstance(spec, dict)
    except Exception as exc:  # noqa: BLE001 - msgpack and shape errors alike: not a bundle
        raise VocabularyError(f"not a draftwire tokenizer bundle: {type(exc).__name__}") from None
    if not ok:
        raise VocabularyError("not a draftwire tokenizer bundle (format or fields)")
    vocabulary = Vocabulary.from_bytes(vocab_bytes, digest)  # refuses bytes that do not hash to it
    tokenizer = _rebuild(spec)
    try:
        rebuilt = vocabulary_of(tokenizer, vocabulary.size).digest
    except VocabularyError as exc:
        raise VocabularyError(f"the bundle's tokenizer cannot be read as a vocabulary: {exc}") from None
    if rebuilt != digest:
        raise VocabularyError(f"the bundle's tokenizer spells vocabulary {rebuilt[:12]}..., not {digest[:12]}...")
    return TargetVocab(vocabulary, tokenizer)


__all__ = ["FORMAT", "TargetVocab", "pack", "unpack"]
