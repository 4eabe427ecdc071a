"""Cross-tokenizer speculation, the pure core: the TLI mapping, its losslessness, and re-tokenization.

(a) exact: the first emitted token's distribution, draft restricted to the token-level intersection and sent
    through today's wire path (top-K, quantize-then-sample, `ProposalBlock`) and verification functions,
    equals the target's p within 1e-9 on toy vocabularies with overlapping parts, disjoint parts and strings
    one side spells in several tokens; greedy output is the target's argmax whatever the draft proposes;
(b) the mapping means what it says: proposals are the draft's own distribution over shared strings (exactly),
    and a draft that IS the target under shuffled ids is accepted with probability 1;
(c) re-tokenization of committed text gives the draft tokenizer's own encoding, on real tokenizers too.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from draftwire.shared.core import rejection_sampling as verification
from draftwire.shared.core.proposal import ProposalBlock, sparse_row
from draftwire.shared.core.retokenize import committed_stream, encode_bytes, hf_encoder, retokenize
from draftwire.shared.core.vocab_mapping import (
    VocabMapping,
    Vocabulary,
    VocabularyError,
    pair_specials,
    vocabulary_of,
)
from draftwire.shared.core.warpers import warp

# Target: "abc" is one token, which the draft can only spell in pieces; " " and "zz" only the target has.
TARGET = Vocabulary(
    (b"a", b"b", b"ab", b"c", b"abc", b" ", b" a", None, b"zz", None),  # 9: a logits row past the tokenizer
    specials={7: "</s>"},
)
# Draft: "x", "y", "cab" only the draft has; b"a" twice (a normal token and a byte-fallback one).
DRAFT = Vocabulary(
    (b"b", b"a", b"x", b"ab", b"cab", b"y", b" a", None, b"a", b"c"),
    specials={7: "<eos>"},
    fallback=frozenset({8}),
)
PAIRS = [(7, 7)]  # the draft's end of sequence is the target's, named explicitly


def _mapping() -> VocabMapping:
    return VocabMapping.build(DRAFT, TARGET, PAIRS)


def _target_p(rng: np.random.Generator, peaked: bool = False) -> np.ndarray:
    """A target row: mass on every id with text or a paired special, none on the padding row."""
    p = np.zeros(TARGET.size)
    live = [i for i in range(TARGET.size) if TARGET.pieces[i] is not None or i in TARGET.specials]
    p[live] = rng.dirichlet(np.full(len(live), 0.3 if peaked else 1.0))
    return p


def _wire_block(q_target: np.ndarray, k: int, quant: str) -> ProposalBlock:
    """The proposal exactly as the device samples it and the edge reads it (one position)."""
    return ProposalBlock.from_rows([sparse_row(q_target, k, quant)], len(q_target), quant)


def emitted_distribution(p: np.ndarray, block: ProposalBlock, reported=None) -> np.ndarray:
    """Enumerate one position: x ~ the block's row, kept w.p. acceptance_probability(p(x), q(x)) with q(x) as
    the edge reads it (`reported(x)` overrides that: a device that reports another q), else the residual."""
    ids, q = block.row(0)
    reported = reported or (lambda x: block.prob_of(0, x))
    dist, reject = np.zeros_like(p), 0.0
    for x, q_x in zip(ids.tolist(), q.tolist(), strict=True):
        if q_x == 0:  # `full` rows are dense: the device never samples these
            continue
        a = verification.acceptance_probability(p[x], reported(x))
        dist[x] += q_x * a
        reject += q_x * (1 - a)
    return dist + reject * verification.residual(p, block.dense_row(0))


# --- the mapping -----------------------------------------------------------------------------------------


def test_mapping_joins_equal_strings_only() -> None:
    m = _mapping()
    # draft: b a x ab cab y " a" <eos> a(fallback) c
    assert m.draft_to_target.tolist() == [1, 0, -1, 2, -1, -1, 6, 7, 0, 3]
    # target: a b ab c abc " " " a" </s> zz (pad): "a" continues as the draft's normal "a", not its fallback
    assert m.target_to_draft.tolist() == [1, 0, 3, 9, -1, -1, 6, 7, -1, -1]
    assert m.intersection == 6 and not m.identity
    for d, t in enumerate(m.draft_to_target.tolist()):
        if t >= 0 and d not in DRAFT.specials:
            assert DRAFT.pieces[d] == TARGET.pieces[t]


def test_special_tokens_join_only_when_named() -> None:
    m = VocabMapping.build(DRAFT, TARGET)
    assert m.draft_to_target[7] == -1 and m.target_to_draft[7] == -1
    assert pair_specials(DRAFT, TARGET, []) == []
    with pytest.raises(VocabularyError):
        pair_specials(DRAFT, TARGET, ["<eos>"])  # the target has no special of that name
    with pytest.raises(VocabularyError):
        VocabMapping.build(DRAFT, TARGET, [(1, 7)])  # a normal token is never paired with a special one


def test_identical_vocabularies_map_to_themselves() -> None:
    m = VocabMapping.build(TARGET, Vocabulary(TARGET.pieces, dict(TARGET.specials)))
    assert m.identity and m.draft_to_target.tolist() == list(range(TARGET.size))


def test_vocabulary_bytes_and_digest() -> None:
    data = DRAFT.to_bytes()
    back = Vocabulary.from_bytes(data, DRAFT.digest)
    assert back.pieces == DRAFT.pieces and dict(back.specials) == dict(DRAFT.specials)
    assert back.fallback == DRAFT.fallback and back.digest == DRAFT.digest
    with pytest.raises(VocabularyError):
        Vocabulary.from_bytes(data, TARGET.digest)  # a copy that is not the vocabulary asked for
    with pytest.raises(VocabularyError):
        Vocabulary.from_bytes(data[:-1])
    # the digest sees every part: a piece, which id is special, which is byte fallback
    assert Vocabulary((b"z", *DRAFT.pieces[1:]), dict(DRAFT.specials), DRAFT.fallback).digest != DRAFT.digest
    assert Vocabulary(DRAFT.pieces, {}, DRAFT.fallback).digest != DRAFT.digest
    assert Vocabulary(DRAFT.pieces, dict(DRAFT.specials)).digest != DRAFT.digest


# --- (a) exact: the first emitted token is distributed as p ----------------------------------------------


@pytest.mark.parametrize("quant", ["f16", "u8"])
@pytest.mark.parametrize("k", [1, 2, 4, 7, TARGET.size])  # tkslt's top-K, and K = V: `full` and `dssd`
def test_first_token_exact(k: int, quant: str) -> None:
    rng = np.random.default_rng(500 + k)
    m = _mapping()
    for trial in range(60):
        p = _target_p(rng, peaked=trial % 2 == 0)
        q = rng.dirichlet(np.full(DRAFT.size, 0.3 if trial % 3 == 0 else 1.0))
        block = _wire_block(m.to_target(q), k, quant)
        np.testing.assert_allclose(emitted_distribution(p, block), p, atol=1e-9, rtol=0)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 1.0), (1.3, 0.8), (1.0, 0.4)])
def test_first_token_exact_from_masked_logits(temperature: float, top_p: float) -> None:
    """The device's path: draft logits masked to the intersection, warped, mapped, top-K'd, quantized."""
    rng = np.random.default_rng(31)
    m = _mapping()
    for _ in range(40):
        p = warp(np.where(np.arange(TARGET.size) == 9, -np.inf, rng.normal(size=TARGET.size) * 2), temperature,
                 top_p)
        q = warp(m.mask_logits(rng.normal(size=DRAFT.size) * 2), temperature, top_p)
        assert q[~m.shared].sum() == 0
        for k in (1, 3, TARGET.size):
            block = _wire_block(m.to_target(q), k, "f16")
            np.testing.assert_allclose(emitted_distribution(p, block), p, atol=1e-9, rtol=0)


def test_greedy_is_the_target_argmax_whatever_the_draft() -> None:
    rng = np.random.default_rng(5)
    m = _mapping()
    for _ in range(30):
        p = warp(rng.normal(size=TARGET.size)[None], 0.0, 1.0)[0]
        q = warp(m.mask_logits(rng.normal(size=DRAFT.size)), 0.0, 1.0)
        emitted = emitted_distribution(p, _wire_block(m.to_target(q), 1, "f16"))
        assert emitted.tolist() == p.tolist()  # one-hot at the target's argmax, exactly
    # the draft's best token has no counterpart ("x"): masking makes it draft its best shared one instead
    logits = np.array([0.0, 1.0, 9.0, 0.5, 8.0, 7.0, 0.0, 0.0, 0.0, 0.0])
    assert int(np.argmax(m.to_target(warp(m.mask_logits(logits), 0.0, 1.0)))) == 0  # "a"


def test_no_mass_in_the_intersection_proposes_nothing() -> None:
    """All the draft's mass on tokens the target lacks: nothing to propose. The round then carries no draft
    token at that position and the target samples from p itself (a zero-token round)."""
    m = _mapping()
    q = np.zeros(DRAFT.size)
    q[[2, 4, 5]] = [0.5, 0.3, 0.2]  # x, cab, y
    assert m.to_target(q) is None
    p = _target_p(np.random.default_rng(1))
    out = verification.verify_block(p[None], [], ProposalBlock.from_rows([], TARGET.size, "f16"),
                                    np.random.default_rng(0))
    assert out.n_accepted == 0 and p[out.token] > 0


def test_exact_negative_control_reported_q_not_renormalised() -> None:
    """The q(x) the edge tests must be the restricted, renormalised one the device sampled from: a device that
    reports the draft's own q(d) (normalised over the whole draft vocabulary) is caught by the same
    enumeration. (A wrong mapping alone cannot break (a): any q' in target ids is lossless; (b) catches it.)"""
    rng = np.random.default_rng(8)
    m = _mapping()
    worst = 0.0
    for _ in range(20):
        p, q = _target_p(rng), rng.dirichlet(np.ones(DRAFT.size))
        block = _wire_block(m.to_target(q), TARGET.size, "f16")
        own = {int(t): float(q[m.draft_to_target == t].sum()) for t in np.unique(m.draft_to_target[m.shared])}
        worst = max(worst, float(np.abs(emitted_distribution(p, block, own.__getitem__) - p).max()))
    assert worst > 1e-2


# --- (b) the mapping means what it says ------------------------------------------------------------------


def _by_string(vocab: Vocabulary, dist: np.ndarray) -> dict[bytes | str, float]:
    out: dict[bytes | str, float] = {}
    for i, mass in enumerate(dist.tolist()):
        if mass:
            key = vocab.pieces[i] if vocab.pieces[i] is not None else vocab.specials[i]
            out[key] = out.get(key, 0.0) + mass
    return out


def test_proposals_are_the_draft_distribution_over_shared_strings() -> None:
    """P(propose string s) = q(s | s is shared), exactly: an id off by one, or renormalising over the whole
    draft vocabulary, moves it."""
    rng = np.random.default_rng(2)
    m = _mapping()
    shared = {TARGET.pieces[t] for t in m.draft_to_target[m.shared].tolist() if TARGET.pieces[t] is not None}
    for _ in range(20):
        q = rng.dirichlet(np.ones(DRAFT.size))
        want = {s: v for s, v in _by_string(DRAFT, q).items() if s in shared or s == "<eos>"}
        total = sum(want.values())
        got = _by_string(TARGET, m.to_target(q))
        assert set(got) == {s if s != "<eos>" else "</s>" for s in want}
        for s, v in want.items():
            assert got[s if s != "<eos>" else "</s>"] == pytest.approx(v / total, abs=1e-12)


def test_same_tokenizer_under_shuffled_ids_is_always_accepted() -> None:
    """A draft that is the target, with its ids permuted: TLI recovers p exactly, every proposal is kept."""
    rng = np.random.default_rng(4)
    perm = rng.permutation(TARGET.size)  # draft id d is target id perm[d]
    pieces = [TARGET.pieces[perm[d]] for d in range(TARGET.size)]
    draft = Vocabulary(tuple(pieces), {d: TARGET.specials[perm[d]] for d in range(TARGET.size)
                                       if perm[d] in TARGET.specials})
    specials = [(d, int(perm[d])) for d in draft.specials]
    m = VocabMapping.build(draft, TARGET, specials)
    for _ in range(10):
        p = _target_p(rng)
        q_target = m.to_target(p[perm])
        np.testing.assert_allclose(q_target, p, atol=1e-15, rtol=0)
        assert sum(min(a, b) for a, b in zip(q_target, p, strict=True)) == pytest.approx(1.0, abs=1e-12)


# --- tokenizers -> vocabularies -------------------------------------------------------------------------


def _sentencepiece_tokenizer():
    """A Gemma-style tokenizer built here: sentencepiece BPE with `▁` for space and <0xNN> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab |= {f"<0x{b:02X}>": 4 + b for b in range(256)}
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "ld", "▁wor", "▁world", "A"]
    vocab |= {w: 260 + i for i, w in enumerate(words)}
    merges = [("h", "e"), ("l", "l"), ("ll", "o"), ("he", "llo"), ("▁", "hello"), ("▁", "w"), ("o", "r"),
              ("l", "d"), ("▁w", "or"), ("▁wor", "ld")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_sentencepiece_vocabulary() -> None:
    tok = _sentencepiece_tokenizer()
    v = vocabulary_of(tok, size=300)
    assert v.size == 300 and v.pieces[299] is None
    assert set(v.specials) == {0, 1, 2, 3} and all(v.pieces[i] is None for i in range(4))
    assert v.pieces[4 + 0x0A] == b"\n" and 4 + 0x0A in v.fallback
    assert v.pieces[vocab_id(tok, "▁hello")] == b" hello"
    assert v.canonical[b"A"] == vocab_id(tok, "A")  # the normal "A", not the byte fallback <0x41>
    text = "hello world\né!"
    ids = tok.encode(text, add_special_tokens=False)
    assert v.spell(ids) == text.encode()  # é and "!" come out as byte-fallback pieces


def vocab_id(tok, piece: str) -> int:
    return tok.convert_tokens_to_ids(piece)


def test_byte_tokenizer_vocabulary() -> None:
    from draftwire.shared.models.byte_tokenizer import ByteTokenizer

    v = vocabulary_of(ByteTokenizer(), size=300)
    assert v.pieces[0xC3] == b"\xc3" and v.pieces[256] is None and v.specials[257] == "</s>"


def test_unsupported_tokenizer_is_refused() -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    with pytest.raises(VocabularyError, match="unsupported"):
        vocabulary_of(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"))


# --- (c) re-tokenization ----------------------------------------------------------------------------------

TOY = Vocabulary(
    (b"a", b"b", b"ab", b"abc", b"c", None, b"\xc3", b"\xa9", b"\xc3\xa9", b" ", b"a\xc3", b"\xa9b"), {5: "<s>"}
)


def _greedy(text: str) -> list[int]:
    """A toy tokenizer: longest match (so "ab" becomes one token once the "b" arrives)."""
    from draftwire.shared.core.retokenize import _spell_greedy

    return _spell_greedy(text.encode(), TOY)


def test_retokenize_replaces_the_last_token_and_keeps_the_prefix() -> None:
    r = retokenize([5, b"a b a"], [5, 0, 9, 1, 9, 0], TOY, _greedy)
    assert r.ids == [5, 0, 9, 1, 9, 0] and r.keep == 6
    r = retokenize([5, b"a b abc"], r.ids, TOY, _greedy)
    assert r.ids == [5, 0, 9, 1, 9, 3] and r.keep == 5  # "a" became "abc": only it is recomputed
    # drafted tokens in the cache (not settled) are kept where the re-tokenization agrees with them
    r2 = retokenize([5, b"a b abca"], [*r.ids, 0, 1], TOY, _greedy, settled=len(r.ids))
    assert r2.ids == [5, 0, 9, 1, 9, 3, 0] and r2.keep == 7


def test_retokenize_mid_character() -> None:
    """A target token ends inside "é" (c3 a9): the draft gets its byte token, and the whole character's token
    once the rest arrives; the incomplete byte is never a base for the next call."""
    r = retokenize([b"ab\xc3"], [], TOY, _greedy)
    assert r.ids == [2, 6] and r.settled == 1
    r = retokenize([b"ab\xc3\xa9"], r.ids, TOY, _greedy, settled=r.settled, margin=0)
    assert r.ids == [2, 8] and r.keep == 1
    assert encode_bytes(b"\xa9a", TOY, _greedy) == ([7, 0], 0)  # a stray continuation byte: its own token


def test_retokenize_never_restarts_inside_a_character() -> None:
    """Byte-level BPE may split a character across tokens ("a\\xc3" + "\\xa9b" for "aéb"): re-tokenizing from
    that boundary would see a stray continuation byte, so it starts before the character."""
    cached = _greedy("aéb")
    assert cached == [10, 11]
    r = retokenize([b"a\xc3\xa9bc"], cached, TOY, _greedy, margin=1)
    assert r.ids == _greedy("aébc") == [10, 11, 4] and r.keep == 2 and r.encoded_from == 0


def test_committed_stream_specials() -> None:
    """Target specials become their paired draft id; unpaired ones are left out of the draft's context."""
    ids = [0, 7, 1, 2, 7]  # a </s> b ab </s>
    assert committed_stream(ids, TARGET, {7: 5}, lead=[5]) == [5, b"a", 5, b"bab", 5]
    assert committed_stream(ids, TARGET, {}) == [b"abab"]


# --- real tokenizers --------------------------------------------------------------------------------------


def _cached_tokenizer(name: str):
    """A catalog model's tokenizer from the draftwire cache (no weights read); skip when it is not there."""
    from draftwire.shared.models.cache import model_dir
    from draftwire.shared.models.catalog import CATALOG

    path = model_dir(CATALOG[name].sha256)
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{name} is not in the model cache")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # being rebuilt right now
        pytest.skip(f"{name}'s tokenizer cannot be read: {exc}")


@pytest.fixture(scope="module")
def smollm2():
    tok = _cached_tokenizer("smollm2-135m")
    return tok, vocabulary_of(tok)


@pytest.fixture(scope="module")
def qwen():
    tok = _cached_tokenizer("qwen2.5-coder-1.5b")
    return tok, vocabulary_of(tok)


TEXT = (
    'def fibonacci(n: int) -> int:\n    """The n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nclass  Café:  # naïve — déjà vu 😀 中文测试\n"
    "    \t  x = 1_000_000  \n\n    def __repr__(self):\n        return f'<Café {self.x!r}>'\n"
)


def _commit_in_chunks(target_ids, target: Vocabulary, draft_tok, draft: Vocabulary, seed: int) -> list[int]:
    """The device's loop: the target commits 1-6 tokens a round; the draft re-tokenizes what it can, with a
    few drafted tokens of its own left in its cache each round."""
    rng = random.Random(seed)
    encode = hf_encoder(draft_tok)
    cached, settled, n = [], 0, 0
    while n < len(target_ids):
        n = min(len(target_ids), n + rng.randint(1, 6))
        stream = committed_stream(target_ids[:n], target)
        r = retokenize(stream, cached, draft, encode, settled=settled)
        assert draft.spell(r.ids) == b"".join(stream)
        assert r.ids[: r.keep] == cached[: r.keep]
        cached, settled = r.ids + [rng.randrange(draft.size) for _ in range(rng.randint(0, 3))], r.settled
    return r.ids


def test_real_vocabulary_spells_its_encoding(smollm2) -> None:
    tok, v = smollm2
    assert v.size == len(tok) and set(v.specials) >= set(tok.all_special_ids)
    assert v.spell(tok.encode(TEXT, add_special_tokens=False)) == TEXT.encode()


def test_retokenize_real_text_is_the_draft_tokenizers_own(smollm2) -> None:
    """Committed byte by byte (a target whose tokens end mid-character) -> SmolLM2's own encoding."""
    from draftwire.shared.models.byte_tokenizer import ByteTokenizer

    tok, v = smollm2
    target = vocabulary_of(ByteTokenizer())
    want = tok.encode(TEXT, add_special_tokens=False)
    for seed in range(2):
        assert _commit_in_chunks(list(TEXT.encode()), target, tok, v, seed) == want


def test_smollm2_for_qwen(smollm2, qwen) -> None:
    """The issue's pair: the intersection, and re-tokenization both ways on real text."""
    (s_tok, s), (q_tok, q) = smollm2, qwen
    m = VocabMapping.build(s, q, pair_specials(s, q, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    print(f"\nsmollm2-135m -> qwen2.5-coder-1.5b: {m.intersection} shared of {s.size} draft / {q.size} target ids")
    assert m.intersection > 30_000
    q_ids = q_tok.encode(TEXT, add_special_tokens=False)
    s_ids = s_tok.encode(TEXT, add_special_tokens=False)
    assert _commit_in_chunks(q_ids, q, s_tok, s, seed=0) == s_ids
    assert _commit_in_chunks(s_ids, s, q_tok, q, seed=1) == q_ids
