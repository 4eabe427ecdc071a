"""The device session across failures: a job whose draft died resumes after the tokens it had committed, and
the continuation is the one the lost run would have made (seeded per position, and with a fixed draft length
the rounds start at the same places), so re-dispatch after a device failure costs only the lost round, never
the whole generation. And a draft model that emits NaN is an error, never a drafted token."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.prompt_request import GenerateJob, RequestError
from draftwire.shared.core.speculation import InProcessEdge, LocalEngine, new_session, speculate
from draftwire.shared.core.verifier_sessions import VerifierCore
from tests.toy_models import bigram_pair


def _resumed_run(target, draft, params, spec, resume, eos_ids=None):
    core = VerifierCore(target)
    eos_ids = target.eos_token_ids if eos_ids is None else eos_ids
    s = new_session(draft, draft, eos_ids, target.vocab_size, [2], params, spec, "s1", resume=resume)
    return asyncio.run(speculate(s, InProcessEdge(core), decode=draft.decode))


@pytest.mark.parametrize("mode", ["tkslt", "full", "dssd"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_resuming_at_any_round_boundary_gives_the_identical_continuation(mode, temperature):
    target, draft = bigram_pair(16, seed=4)
    params = SamplingParams(temperature=temperature, seed=77, max_new_tokens=40)
    spec = SpecParams(mode=mode, gamma=3, k=4)
    full = LocalEngine(target, draft).generate([2], params, spec)
    boundaries, n = [], 0
    for r in full.stats.rounds[:-1]:
        n += r.emitted
        boundaries.append(n)
    assert len(boundaries) >= 5
    for cut in boundaries:  # what a session ping can report: the committed tokens after some round
        resumed = _resumed_run(target, draft, params, spec, full.token_ids[:cut])
        assert resumed.token_ids == full.token_ids, cut
        assert len(resumed.stats.rounds) < len(full.stats.rounds)  # only the rest was generated again


def test_resumed_tokens_that_already_end_the_generation_finish_at_once():
    target, draft = bigram_pair(16, seed=4)
    eos = 9
    params = SamplingParams(temperature=0.0, seed=1, max_new_tokens=6)
    spec = SpecParams(mode="tkslt", gamma=3, k=4)
    stopped = _resumed_run(target, draft, params, spec, [3, eos, 5], eos_ids=(eos,))
    assert stopped.token_ids == [3, eos] and stopped.finish_reason == "stop" and not stopped.stats.rounds
    full = _resumed_run(target, draft, params, spec, [3, 4, 5, 6, 7, 8])
    assert full.token_ids == [3, 4, 5, 6, 7, 8] and full.finish_reason == "length"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _resumed_run(target, draft, params, spec, [3, 99])


def _job(**kw) -> GenerateJob:
    base = {"id": "j1", "prompt": "hi", "params": SamplingParams(max_new_tokens=8), "spec": SpecParams(),
            "session": "s1", "deadline": 0.0}
    return GenerateJob(**{**base, **kw})


def test_a_job_carries_its_resume_tokens_compactly():
    job = _job(resume=(1, 70000, 5))
    assert GenerateJob.decode(job.encode()) == job
    assert len(job.encode()) - len(_job().encode()) == 12  # 4 bytes a token


def test_a_job_resuming_more_than_max_new_tokens_is_refused():
    with pytest.raises(RequestError, match="resumes 9 tokens"):
        GenerateJob.decode(_job(resume=tuple(range(9))).encode())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["tkslt", "dssd"])
def test_a_draft_with_non_finite_logits_is_an_error_never_a_guess(mode, temperature):
    """Greedy would have drafted token 0 from a NaN row: the device refuses instead (`non_finite`)."""
    from draftwire.shared.core.rejection_sampling import NonFinite

    target, draft = bigram_pair(16, seed=4)
    draft.log_table = draft.log_table.copy()
    draft.log_table[2, 5] = np.nan
    params = SamplingParams(temperature=temperature, seed=1, max_new_tokens=8)
    with pytest.raises(NonFinite, match="non-finite logits"):
        LocalEngine(target, draft).generate([2], params, SpecParams(mode=mode, gamma=3, k=4))
