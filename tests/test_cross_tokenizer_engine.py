"""Cross-tokenizer speculation through the engine (issue 13): the draft keeps its own tokens, proposals cross
in the target's ids, and the output is the target's.

- greedy: a tiny Llama drafting under another tokenizer (its ids reversed, a merge of its own) gives the
  target's own greedy tokens, and, being the target's weights in other ids, has every draft accepted: any
  slip in the id mapping or the draft's context shows as lost acceptance;
- sampling: the joint of the first three tokens on toy bigrams with partly overlapping vocabularies, by
  chi-square against the target's exact distribution (tests/exact_distribution.py), with negative controls;
- the draft's context after every round is its tokenizer's own encoding of what the target committed;
- pipelining keeps a pre-drafted block only when the draft's context is the one drafting afresh would see.
"""

from __future__ import annotations

import asyncio

import pytest

from draftwire.shared.core.cross_vocab import model_vocabulary
from draftwire.shared.core.draft_session import DraftSession
from draftwire.shared.core.params import ParamError, SamplingParams, SpecParams
from draftwire.shared.core.speculation import LocalEngine, check_pair
from draftwire.shared.core.vocab_mapping import Vocabulary
from tests.exact_distribution import chi_square_pvalue, exact_prefixes, generate_seeds
from tests.test_chi_square import acceptance_with_p_and_q_swapped, plant, verifier_scores_with_the_next_row
from tests.toy_models import BigramModel, cross_bigram_pair, retokenized_llama

GAMMA = 3
SAMPLES = 1500
PASS_P, REJECT_P = 1e-3, 1e-6
PROMPTS = ["a cat sat", "def f(x):\n    return", "naïve café — 中文"]


@pytest.fixture(scope="module")
def tiny_pair():
    from draftwire.shared.models.runtime import load_model

    target = load_model("tiny-random", "fp32")
    return target, retokenized_llama(target)


def test_pairs_are_decided_by_digest(tiny_pair) -> None:
    target, draft = tiny_pair
    assert check_pair(target, target) is None  # one tokenizer: today's path
    cross = check_pair(draft, target)
    assert cross is not None and draft.vocab_size == target.vocab_size  # same size, different meaning
    assert cross.mapping.intersection == 256 + 3  # every byte; <s>, </s>, <pad> paired by content
    with pytest.raises(ParamError, match="shares no token"):
        disjoint = Vocabulary((b"zz",) * target.vocab_size)
        from draftwire.shared.core.cross_vocab import build_cross

        build_cross(draft.tokenizer, model_vocabulary(draft), disjoint)
    with pytest.raises(ParamError, match="no tokenizer"):  # a toy without a tokenizer, another size
        check_pair(BigramModel(cross_bigram_pair(0)[0].table[:, :5] / 2), target)


@pytest.mark.parametrize("mode", ["tkslt", "dssd"])
def test_greedy_is_the_targets_own(tiny_pair, mode: str) -> None:
    target, draft = tiny_pair
    params = SamplingParams(temperature=0, max_new_tokens=40)
    alone, engine = LocalEngine(target), LocalEngine(target, draft)
    for prompt in PROMPTS:
        want = alone.generate(prompt, params, SpecParams(mode="ar")).token_ids
        got = engine.generate(prompt, params, SpecParams(mode=mode, gamma=4, k=8))
        assert got.token_ids == want
        if target.vocab_size - 1 not in want:
            # the draft IS the target in other ids, so every draft is kept, unless the (random) target emits
            # its padding id, which spells nothing and is left out of the draft's context
            assert got.stats.summary()["acceptance_rate"] == 1.0, prompt


def _draft_contexts(monkeypatch: pytest.MonkeyPatch) -> list[DraftSession]:
    sessions: list[DraftSession] = []
    original = DraftSession.__post_init__

    def spy(self) -> None:
        original(self)
        sessions.append(self)

    monkeypatch.setattr(DraftSession, "__post_init__", spy)
    return sessions


def test_draft_context_is_its_tokenizers_own_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round by round the target commits "c" then "a" (draft: "ca"), "a" then "b" (one target token "ab")...:
    re-tokenized from the cache, the draft's tokens are what its tokenizer makes of the whole text."""
    target, draft = cross_bigram_pair(3)
    sessions = _draft_contexts(monkeypatch)
    checked = 0
    original_apply = DraftSession.apply

    def apply(self, req, verdict):
        nonlocal checked
        new = original_apply(self, req, verdict)
        assert self._draft_ids == self.cross.draft_ids(self.committed).ids  # from scratch
        checked += 1
        return new

    monkeypatch.setattr(DraftSession, "apply", apply)
    engine = LocalEngine(target, draft)
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    generate_seeds(engine, [0], params, SpecParams(mode="tkslt", gamma=GAMMA, k=3), 20)
    assert checked > 30 and sessions


def test_context_check_catches_a_retokenization_without_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: re-tokenize from the very end of the cache (no margin), so "c" + "a" never becomes "ca"."""
    from draftwire.shared.core import cross_vocab

    plant(monkeypatch, cross_vocab.CrossVocab, "draft_ids", "settled=settled)", "settled=settled, margin=0)")
    with pytest.raises(AssertionError):
        test_draft_context_is_its_tokenizers_own_encoding(monkeypatch)


def _first_tokens_pvalue(mode: str, temperature: float = 1.0, top_p: float = 1.0) -> float:
    target, draft = cross_bigram_pair(7)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=GAMMA)
    outputs = generate_seeds(LocalEngine(target, draft), [0], params,
                             SpecParams(mode=mode, gamma=GAMMA, k=2, quant="f16"), SAMPLES)
    return chi_square_pvalue(outputs, exact_prefixes(target, [0], params, GAMMA))


CASES = {"tkslt": ("tkslt",), "full": ("full", 0.8), "dssd": ("dssd", 1.2, 0.9)}


@pytest.mark.parametrize("name", CASES)
def test_sampled_output_is_distributed_as_the_target(name: str) -> None:
    assert _first_tokens_pvalue(*CASES[name]) > PASS_P


@pytest.mark.parametrize("bug,name", [(acceptance_with_p_and_q_swapped, "tkslt"),
                                      (verifier_scores_with_the_next_row, "dssd")])
def test_planted_bug_is_rejected(monkeypatch: pytest.MonkeyPatch, bug, name: str) -> None:
    bug(monkeypatch)
    assert _first_tokens_pvalue(*CASES[name]) < REJECT_P


def test_dssd_report_must_be_the_renormalised_q(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: a device that does not mask its logits and reports, for DSSD, its own q(x) (normalised over
    its whole vocabulary) while sampling from the restricted, renormalised row: the one way the mapping can
    break losslessness. Without the report bug, the unmasked device alone passes (any q' is lossless)."""
    from draftwire.shared.core import draft_session, vocab_mapping

    original = vocab_mapping.VocabMapping.to_target
    mass: list[float] = []

    def to_target(self, q):
        mass.append(float(q[self.shared].sum()))
        return original(self, q)

    monkeypatch.setattr(vocab_mapping.VocabMapping, "mask_logits", lambda self, logits: logits)
    monkeypatch.setattr(vocab_mapping.VocabMapping, "to_target", to_target)
    assert _first_tokens_pvalue(*CASES["dssd"]) > PASS_P
    monkeypatch.setattr(draft_session, "mass", mass, raising=False)
    plant(monkeypatch, DraftSession, "_draft", "rows.append((ids, raw))",
          "rows.append((ids, raw)); self._mass = [*getattr(self, '_mass', []), mass[-1]][-n:]")
    plant(monkeypatch, DraftSession, "next_request", "block.prob_of(i, t) for",
          "block.prob_of(i, t) * self._mass[i] for")
    assert _first_tokens_pvalue(*CASES["dssd"]) < REJECT_P


def test_pipelining_keeps_only_a_block_drafted_from_the_same_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-drafted blocks are kept only where the re-tokenized context is the one they were drafted from, so
    pipelining never changes tokens (bigram draft: its rows depend on its last token, which "c" + "a" -> "ca"
    changes)."""
    target, draft = cross_bigram_pair(3, blur=0.05, peak=0.2)
    engine = LocalEngine(target, draft)
    params = SamplingParams(temperature=1.0, max_new_tokens=30)

    def run(pipeline: bool) -> list[list[int]]:
        spec = SpecParams(mode="tkslt", gamma=GAMMA, k=3, pipeline=pipeline)
        return generate_seeds(engine, [0], params, spec, 30)

    assert run(True) == run(False)


def test_a_block_drafted_from_another_context_is_dropped() -> None:
    """The target commits "c" then "a": the draft drafted on after its tokens "c", "a", but its tokenizer makes
    "ca" of them, so the block was drafted from a context drafting afresh would not see."""
    from draftwire.shared.core.draft_session import Prefetch
    from draftwire.shared.core.speculation import new_session

    target, draft = cross_bigram_pair(3)
    cross = check_pair(draft, target)
    session = new_session(draft, target, (5,), 6, [3, 0], SamplingParams(max_new_tokens=8),
                          SpecParams(mode="tkslt", gamma=2, k=3), cross=cross)
    assert session._draft_ids == [3]  # "ca"
    stale = Prefetch(base=2, tokens=[1], rows=[None], guess=0, context=[1, 2])  # "c", "a"
    assert not session.usable(stale)
    assert session.usable(Prefetch(base=2, tokens=[1], rows=[None], guess=0, context=[3]))


def test_engine_loop_runs_cross_tokenizer_sessions_concurrently(tiny_pair) -> None:
    """Two sessions on one engine: each keeps its own draft context."""
    target, draft = tiny_pair
    engine = LocalEngine(target, draft)
    params = SamplingParams(temperature=0, max_new_tokens=16)

    async def both():
        return await asyncio.gather(*(engine.agenerate(p, params, SpecParams(mode="tkslt", gamma=3, k=4))
                                      for p in PROMPTS[:2]))

    alone = LocalEngine(target)
    want = [alone.generate(p, params, SpecParams(mode="ar")).token_ids for p in PROMPTS[:2]]
    assert [r.token_ids for r in asyncio.run(both())] == want


def test_a_verifier_with_another_target_refuses_the_session(tiny_pair) -> None:
    """A session opens with the target vocabulary's digest it mapped to (on the wire, `tv`); an edge whose
    target has another vocabulary (a failover to another model) refuses it instead of verifying ids that
    mean something else there. Same-tokenizer sessions send nothing."""
    from draftwire.shared.core.protocol import VerifyRequest
    from draftwire.shared.core.speculation import RemoteError
    from draftwire.shared.core.verifier_sessions import VerifierCore

    target, draft = tiny_pair
    engine = LocalEngine(target, draft)
    engine.verifier = VerifierCore(draft, max_sessions=4)  # same size, other vocabulary
    with pytest.raises(RemoteError, match="vocab_mismatch"):
        engine.generate("a cat", SamplingParams(temperature=0, max_new_tokens=8), SpecParams(mode="tkslt"))
    seen: list[VerifyRequest] = []
    engine = LocalEngine(target, draft)
    exchange = engine.verifier

    class Spy:
        def __getattr__(self, name):
            return getattr(exchange, name)

        def handle_batch(self, reqs, budget=None):
            seen.extend(reqs)
            return exchange.handle_batch(reqs, budget)

    engine.verifier = Spy()
    engine.generate("a cat", SamplingParams(temperature=0, max_new_tokens=8), SpecParams(mode="tkslt"))
    assert seen[0].vocab == model_vocabulary(target).digest and VerifyRequest.decode(seen[0].encode()).vocab
    assert all(not r.vocab for r in seen[1:])  # only the opening request carries it
    seen.clear()
    engine = LocalEngine(target, target)
    engine.verifier, exchange = Spy(), engine.verifier
    engine.generate("a cat", SamplingParams(temperature=0, max_new_tokens=8), SpecParams(mode="tkslt"))
    assert seen and not any(r.vocab for r in seen)
