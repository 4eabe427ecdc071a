"""The tokenizer bundle a verifier publishes and a device checks (shared/core/vocab_bundle.py), and the
opening request that states both vocabularies' digests."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from draftwire.shared.core import session_digest
from draftwire.shared.core.params import SamplingParams
from draftwire.shared.core.protocol import ProtocolError, VerifyRequest
from draftwire.shared.core.vocab_bundle import pack, unpack
from draftwire.shared.core.vocab_mapping import VocabularyError
from tests.toy_models import byte_level_tokenizer, cross_bigram_pair


@pytest.fixture(scope="module")
def pair():
    target, draft = cross_bigram_pair(0)
    return target, draft


def test_a_bundle_round_trips_and_encodes_as_the_target(pair) -> None:
    target, _ = pair
    digest, data = pack(target.tokenizer, target.vocab_size)
    got = unpack(data, digest)
    assert got.digest == digest
    assert got.encode("abcc") == list(target.tokenizer.encode("abcc"))
    assert got.decode(got.encode("abcc")) == "abcc"


def test_bytes_that_are_not_that_vocabulary_are_refused(pair) -> None:
    target, draft = pair
    digest, data = pack(target.tokenizer, target.vocab_size)
    other_digest, other = pack(draft.tokenizer, draft.vocab_size)
    with pytest.raises(VocabularyError, match="do not hash"):
        unpack(other, digest)  # a valid bundle, of another vocabulary
    with pytest.raises(VocabularyError, match="not a draftwire tokenizer bundle"):
        unpack(b"garbage", digest)
    body = msgpack.unpackb(data, raw=False)  # right vocabulary bytes, another tokenizer beside them
    body["tokenizer"] = msgpack.unpackb(other, raw=False)["tokenizer"]
    with pytest.raises(VocabularyError, match="spells vocabulary"):
        unpack(msgpack.packb(body, use_bin_type=True), digest)
    assert unpack(other, other_digest).digest == other_digest


def test_an_unexchangeable_tokenizer_is_refused() -> None:
    tok = byte_level_tokenizer(["a", "b"], [], ["</s>"])
    with pytest.raises(VocabularyError):
        pack(object(), 3)
    assert pack(tok, 3)[0]


def test_the_opening_request_states_both_digests() -> None:
    base = {"session": "s1", "round": 0, "base": 1, "last_token": 0, "tokens": np.array([], dtype=np.int64), "vocab_size": 8,
            "proposals": None, "history": np.array([0]), "prompt_len": 1,
            "params": SamplingParams(), "digest": session_digest.of([0])}
    req = VerifyRequest(**base, vocab="a" * 64, draft_vocab="b" * 64)
    back = VerifyRequest.decode(req.encode())
    assert (back.vocab, back.draft_vocab) == ("a" * 64, "b" * 64)
    with pytest.raises(ProtocolError, match="draft_vocab"):
        VerifyRequest(**base, draft_vocab="b" * 64).encode()
