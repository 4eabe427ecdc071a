"""Trustworthy sessions in the pure core: identity (digest), numerics, verdict checks, deadlines, context
length, stopping between rounds, CloseSession, and one EOS set (issue 8)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from draftwire.shared.core import rejection_sampling, session_digest
from draftwire.shared.core.draft_session import BadVerdict
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.proposal import ProposalBlock
from draftwire.shared.core.protocol import CloseSession, ErrorReply, Verdict, VerifyRequest, decode_any
from draftwire.shared.core.speculation import (
    InProcessEdge,
    LocalEngine,
    RemoteError,
    handle_close,
    new_session,
    speculate,
    verify_bytes,
)
from draftwire.shared.core.verifier_sessions import VerifierCore
from tests.toy_models import BigramModel, BigramSequence, bigram_pair

# ---- models --------------------------------------------------------------------------------------------


class _FirstTokenSequence(BigramSequence):
    def next_logits(self, tokens: Sequence[int], n_out: int = 1) -> torch.Tensor:
        self.tokens = list(tokens)
        rows = [self._log[tokens[0], t] for t in tokens[len(tokens) - n_out :]]
        return torch.tensor(np.stack(rows), dtype=torch.float32)


class FirstTokenModel(BigramModel):
    """p(next | context) depends on the context's first token as well as its last, so verifying one
    generation against another's cache (same length, same last token) visibly changes what is emitted."""

    def __init__(self, tables: np.ndarray) -> None:  # tables [V, V, V]: first token, last token -> p
        super().__init__(tables[0], "first-token")
        self.log_table = np.log(np.maximum(tables, 1e-30)).astype(np.float32)

    def new_sequence(self) -> _FirstTokenSequence:
        return _FirstTokenSequence(self.log_table)


class NaNModel(BigramModel):
    """A target whose forward pass is broken: every logit is NaN."""

    def new_sequence(self) -> BigramSequence:
        return BigramSequence(np.full_like(self.log_table, np.nan))


def _run(session, link, **kwargs):
    return asyncio.run(speculate(session, link, decode=lambda ids: " ".join(map(str, ids)), **kwargs))


class CountingEdge(InProcessEdge):
    """The in-process edge, recording every request it carried and yielding to other generations first."""

    def __init__(self, core: VerifierCore) -> None:
        super().__init__(core)
        self.requests: list[VerifyRequest] = []

    async def exchange(self, uplink: bytes, req: VerifyRequest) -> bytes:
        self.requests.append(VerifyRequest.decode(uplink))
        await asyncio.sleep(0)
        return await super().exchange(uplink, req)


def _session(draft, target, prompt, params, spec, sid=None, deadline=0.0):
    return new_session(draft, draft, target.eos_token_ids, target.vocab_size, prompt, params, spec, sid, deadline)


# ---- the digest ----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=40), st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_digest_is_incremental_and_fits_64_bits(a: list[int], b: list[int]) -> None:
    h = session_digest.of(a + b)
    assert session_digest.extend(session_digest.of(a), b) == h == session_digest.of(np.array(a + b, np.int64))
    assert 0 <= h < 2**64


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 70000), min_size=1, max_size=60), st.data())
def test_sequences_differing_in_one_position_never_collide(ids: list[int], data) -> None:
    i = data.draw(st.integers(0, len(ids) - 1))
    other = list(ids)
    other[i] = data.draw(st.integers(0, 70000).filter(lambda t: t != ids[i]))
    assert session_digest.of(ids) != session_digest.of(other)


# ---- identity: a verifier never verifies against another generation's cache ---------------------------


def _opening(history: list[int], vocab: int, **kw) -> VerifyRequest:
    return VerifyRequest(
        session="s", round=0, base=len(history), last_token=history[-1], tokens=np.zeros(0, np.int64),
        proposals=None, vocab_size=vocab, history=np.array(history), params=SamplingParams(temperature=1.0, seed=3),
        prompt_len=len(history), digest=session_digest.of(history), **kw,
    )


def _continuing(committed: list[int], vocab: int, round_: int = 1) -> VerifyRequest:
    return VerifyRequest(
        session="s", round=round_, base=len(committed), last_token=committed[-1], tokens=np.zeros(0, np.int64),
        proposals=None, vocab_size=vocab, digest=session_digest.of(committed),
    )


def test_same_length_and_last_token_but_another_generation_is_unknown_session() -> None:
    target, _ = bigram_pair(16, seed=1)
    core = VerifierCore(target)
    a = [3, 1, 4, 1, 5]
    verdict = decode_any(verify_bytes(core, _opening(a, 16).encode()))
    assert isinstance(verdict, Verdict)
    a.append(verdict.token)
    b = [3, 9, 4, 1, 5, verdict.token]  # another generation: same length, same last token, one early token differs
    reply = decode_any(verify_bytes(core, _continuing(b, 16).encode()))
    assert isinstance(reply, ErrorReply) and reply.code == "unknown_session"
    assert "s" not in core  # the stale copy is dropped, so the resend with history rebuilds it
    reopened = decode_any(verify_bytes(core, _opening(b, 16).encode()))
    assert isinstance(reopened, Verdict)
    b.append(reopened.token)
    assert isinstance(decode_any(verify_bytes(core, _continuing(b, 16, 2).encode())), Verdict)  # control


def test_colliding_session_ids_interleaved_still_produce_each_generations_own_output() -> None:
    """Two generations under one session id on one verifier, alternating rounds: every round finds the other
    one's copy and resyncs, and each output equals its solo run (the target looks at the first token)."""
    rng = np.random.default_rng(0)
    v = 3
    target = FirstTokenModel(rng.dirichlet(np.full(v, 0.3), size=(v, v)))
    draft = target  # near-total acceptance: both generations grow in step, so lengths keep coinciding
    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=60)
    spec = SpecParams(mode="tkslt", gamma=2, k=v)
    prompts = ([0, 2], [1, 2])  # same length, same last token
    solo = [_run(_session(draft, target, p, params, spec, "s"), InProcessEdge(VerifierCore(target))).token_ids
            for p in prompts]
    assert solo[0] != solo[1]
    core = VerifierCore(target)
    edge = CountingEdge(core)

    async def both():
        return await asyncio.gather(
            *(speculate(_session(draft, target, p, params, spec, "s"), edge, decode=str) for p in prompts)
        )

    outs = asyncio.run(both())
    assert [o.token_ids for o in outs] == solo
    # they kept colliding (each resync is a history resend), and were told apart every time
    assert sum(r.history is not None for r in edge.requests) > 10


@pytest.mark.parametrize("mode", ["ar", "full", "tkslt", "dssd"])
def test_a_normal_generation_opens_once_and_stays_in_step(mode: str) -> None:
    """Device and verifier digests agree round after round (the DSSD case included, where the device commits
    a token the verifier did not choose): only the first request carries history."""
    target, draft = bigram_pair(8, seed=4)
    edge = CountingEdge(VerifierCore(target))
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=50)
    out = _run(_session(draft, target, [1, 2], params, SpecParams(mode=mode, gamma=3, k=3)), edge)
    assert len(out.token_ids) == 50
    assert [r.history is not None for r in edge.requests] == [True] + [False] * (len(edge.requests) - 1)


def test_requests_carry_the_digest_of_the_committed_tokens_and_the_deadline_only_when_opening() -> None:
    target, draft = bigram_pair(8, seed=4)
    s = _session(draft, target, [1, 2], SamplingParams(max_new_tokens=20), SpecParams(gamma=2, k=2),
                 deadline=1e10)
    edge = CountingEdge(VerifierCore(target))
    _run(s, edge)
    assert edge.requests[0].deadline == 1e10 and all(r.deadline == 0 for r in edge.requests[1:])
    committed = [1, 2] + s.generated
    for r in edge.requests:
        assert r.digest == session_digest.of(committed[: r.base])
    req, _ = s.next_request()
    assert s.reopen(req).deadline == 1e10 and s.reopen(req).digest == session_digest.of(s.committed)


# ---- numerics: NaN is an error, never an acceptance --------------------------------------------------


def test_nan_target_probability_is_not_an_acceptance() -> None:
    rng = np.random.default_rng(0)
    p = np.full((2, 4), 0.25)
    p[0, 1] = np.nan  # min(1, nan / q) is 1: today this would accept token 1
    block = ProposalBlock.from_rows([(np.array([1]), np.array([1.0], np.float16))], 4, "f16")
    with pytest.raises(rejection_sampling.NonFinite):
        rejection_sampling.verify_block(p, [1], block, rng)
    with pytest.raises(rejection_sampling.NonFinite):
        rejection_sampling.split_verify(p, [1], [1.0], rng)
    with pytest.raises(rejection_sampling.NonFinite):
        rejection_sampling.count_accepted(p, [1], [1.0], rng)
    p[0, 1] = 0.25
    p[1] = [np.inf, 0, 0, 0]  # the bonus row
    with pytest.raises(rejection_sampling.NonFinite):
        rejection_sampling.verify_block(p, [1], block, rng)


@pytest.mark.parametrize("q", [float("nan"), float("inf"), 1.5, -0.1])
def test_out_of_range_draft_probability_is_refused(q: float) -> None:
    p = np.full((2, 4), 0.25)
    with pytest.raises(rejection_sampling.VerificationError) as e:
        rejection_sampling.count_accepted(p, [1], [q], np.random.default_rng(0))
    assert e.value.code == ("bad_proposal" if q < 0 else "non_finite")


@pytest.mark.parametrize("mode", ["tkslt", "dssd"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_target_producing_nan_logits_is_a_non_finite_error(mode: str, temperature: float) -> None:
    """Greedy included: argmax of a NaN row is a confident one-hot, so the logits themselves are checked."""
    target, draft = bigram_pair(6, seed=2)
    broken = NaNModel(target.table, "nan")
    edge = CountingEdge(VerifierCore(broken))
    s = _session(draft, broken, [1], SamplingParams(temperature=temperature, max_new_tokens=10),
                 SpecParams(mode=mode, gamma=2, k=3))
    with pytest.raises(RemoteError) as e:
        _run(s, edge)
    assert e.value.code == "non_finite" and len(edge.requests) == 1  # refused, not retried
    assert s.generated == []


class _ForgingEdge(InProcessEdge):
    """Answers with the real verdict, but with its token replaced."""

    def __init__(self, core: VerifierCore, token: int) -> None:
        super().__init__(core)
        self.token = token

    async def exchange(self, uplink: bytes, req: VerifyRequest) -> bytes:
        real = decode_any(verify_bytes(self.core, uplink))
        return dataclasses.replace(real, token=self.token).encode()


@pytest.mark.parametrize("token", [8, 1000])
def test_a_verdict_token_outside_the_vocabulary_is_bad_verdict(token: int) -> None:
    target, draft = bigram_pair(8, seed=3)
    s = _session(draft, target, [1], SamplingParams(max_new_tokens=10), SpecParams(gamma=2, k=2))
    with pytest.raises(RemoteError) as e:
        _run(s, _ForgingEdge(VerifierCore(target), token))
    assert e.value.code == "bad_verdict"
    assert s.generated == [] and s.round == 0  # nothing committed


def test_apply_refuses_minus_one_without_a_residual_and_commits_nothing() -> None:
    target, draft = bigram_pair(8, seed=3)
    s = _session(draft, target, [1], SamplingParams(max_new_tokens=10), SpecParams(gamma=2, k=2))
    req, _ = s.next_request()
    verdict = Verdict(s.session, req.round, req.base, 0, -1, 0.0)  # built here: the codec would refuse it
    with pytest.raises(BadVerdict):
        s.apply(req, verdict)
    assert s.committed == [1] and s.digest == session_digest.of([1]) and not s.verifier_knows_session


# ---- deadlines and context length at the edge ------------------------------------------------------------


def test_verifier_refuses_rounds_after_the_sessions_deadline_and_drops_it() -> None:
    target, _ = bigram_pair(16, seed=1)
    now = [1000.0]
    core = VerifierCore(target, clock=lambda: now[0])
    history = [3, 1, 4]
    verdict = decode_any(verify_bytes(core, _opening(history, 16, deadline=1010.0).encode()))
    assert isinstance(verdict, Verdict)
    history.append(verdict.token)
    now[0] = 1010.5
    reply = decode_any(verify_bytes(core, _continuing(history, 16).encode()))
    assert isinstance(reply, ErrorReply) and reply.code == "deadline_exceeded" and "s" not in core
    reply = decode_any(verify_bytes(core, _opening(history, 16, deadline=1010.0).encode()))
    assert isinstance(reply, ErrorReply) and reply.code == "deadline_exceeded" and "s" not in core
    assert isinstance(decode_any(verify_bytes(core, _opening(history, 16).encode())), Verdict)  # 0 = none


def test_speculate_does_not_retry_a_deadline_refusal() -> None:
    target, draft = bigram_pair(8, seed=3)
    edge = CountingEdge(VerifierCore(target))
    s = _session(draft, target, [1], SamplingParams(max_new_tokens=10), SpecParams(gamma=2, k=2), deadline=1.0)
    with pytest.raises(RemoteError) as e:
        _run(s, edge)
    assert e.value.code == "deadline_exceeded" and len(edge.requests) == 1


def test_context_length_is_enforced_on_opening_and_on_every_round() -> None:
    target, draft = bigram_pair(8, seed=3)
    target.context_length = 10
    spec = SpecParams(gamma=4, k=2)
    out = LocalEngine(target, draft).generate([1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=7), spec)
    assert len(out.token_ids) == 7  # exactly fills the context: allowed, and no round runs past it
    edge = CountingEdge(VerifierCore(target))
    with pytest.raises(RemoteError) as e:  # refused on the opening request, before any round could run past it
        _run(_session(draft, target, [1, 2, 3], SamplingParams(max_new_tokens=8), spec), edge)
    assert e.value.code == "context_length_exceeded" and len(edge.requests) == 1
    core = VerifierCore(target)
    history = [1, 2, 3, 4, 5, 6, 7, 0]
    block = ProposalBlock.from_rows([(np.array([1]), np.array([1.0], np.float16))] * 2, 8, "f16")
    req = dataclasses.replace(_opening(history, 8), tokens=np.array([1, 1]), proposals=block, prompt_len=1,
                              params=SamplingParams(max_new_tokens=9))  # 1 + 9 fits; 8 + 2 + 1 does not
    reply = decode_any(verify_bytes(core, req.encode()))
    assert isinstance(reply, ErrorReply) and reply.code == "context_length_exceeded" and "s" not in core
    assert isinstance(decode_any(verify_bytes(core, dataclasses.replace(req, tokens=np.array([1]), proposals=(
        ProposalBlock.from_rows([(np.array([1]), np.array([1.0], np.float16))], 8, "f16"))).encode())), Verdict)


# ---- stopping between rounds ------------------------------------------------------------------------------


def test_should_stop_ends_the_loop_before_the_next_round_with_its_reason() -> None:
    target, draft = bigram_pair(8, seed=6)
    params = SamplingParams(temperature=1.0, seed=2, max_new_tokens=40)
    spec = SpecParams(gamma=3, k=3)
    full = _run(_session(draft, target, [1], params, spec), InProcessEdge(VerifierCore(target)))
    asked = []

    def stop() -> str | None:
        asked.append(1)
        return "cancelled" if len(asked) > 2 else None

    edge = CountingEdge(VerifierCore(target))
    out = _run(_session(draft, target, [1], params, spec), edge, should_stop=stop)
    assert out.finish_reason == "cancelled" and len(out.stats.rounds) == 2 == len(edge.requests) and len(asked) == 3
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and out.token_ids
    never = _run(_session(draft, target, [1], params, spec), InProcessEdge(VerifierCore(target)),
                 should_stop=lambda: None)
    assert never.token_ids == full.token_ids and never.finish_reason == full.finish_reason


# ---- CloseSession ---------------------------------------------------------------------------------------


def test_close_session_frees_the_session_and_garbage_never_raises() -> None:
    target, _ = bigram_pair(16, seed=1)
    core = VerifierCore(target)
    verify_bytes(core, _opening([3, 1, 4], 16).encode())
    assert "s" in core
    assert handle_close(core, CloseSession("s").encode()) is None and "s" not in core
    assert handle_close(core, CloseSession("never-opened").encode()) is None
    for junk in (b"", b"\xc1", _opening([3], 16).encode(), msgpack.packb({"v": 1, "t": "cs", "s": ""})):
        reply = decode_any(handle_close(core, junk))
        assert isinstance(reply, ErrorReply) and reply.code.startswith("bad_")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_handle_close_and_verify_bytes_answer_any_bytes(data: bytes) -> None:
    target, _ = bigram_pair(4, seed=1)
    core = VerifierCore(target)
    reply = handle_close(core, data)
    assert reply is None or isinstance(decode_any(reply), ErrorReply)
    assert isinstance(decode_any(verify_bytes(core, data)), ErrorReply)


def test_error_replies_stay_small_whatever_the_garbage_quotes() -> None:
    target, _ = bigram_pair(4, seed=1)
    core = VerifierCore(target)
    for junk in ({"v": 1, "t": "x" * 1_000_000}, {"v": b"\x00" * 900_000, "t": "vr"}):
        assert len(verify_bytes(core, msgpack.packb(junk))) < 2000
        assert len(handle_close(core, msgpack.packb(junk))) < 2000


# ---- one EOS set: the target's ----------------------------------------------------------------------------


def test_generation_stops_on_the_targets_eos_only() -> None:
    table = np.full((6, 6), 0.02)
    table[:, 5] = 0.9
    table /= table.sum(1, keepdims=True)
    params = SamplingParams(temperature=0, max_new_tokens=6)
    target_without = BigramModel(table, "target", eos=())
    draft_with = BigramModel(table, "draft", eos=(5,))
    out = LocalEngine(target_without, draft_with).generate([0], params, SpecParams(gamma=3, k=2))
    assert out.token_ids == [5] * 6 and out.finish_reason == "length"  # the draft's EOS does not stop it
    out = LocalEngine(BigramModel(table, "target", eos=(5,)), BigramModel(table, "draft")).generate(
        [0], params, SpecParams(gamma=3, k=2))
    assert out.token_ids == [5] and out.finish_reason == "stop"
