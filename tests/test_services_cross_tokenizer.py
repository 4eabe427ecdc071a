"""A draft with another tokenizer through the real services (issue 13, item 2: tokenizer exchange over NATS).

The stack runs as processes, as `draftwire up` starts it. The target is `tiny-random` (byte tokenizer); the
draft is a Hugging Face dir holding a tiny Llama under a byte-level BPE tokenizer whose ids mean other bytes
(tests/toy_models.py `retokenized_llama`): same vocabulary size, different vocabulary digest. The verifier
stores its tokenizer in the `DRAFTWIRE_VOCAB` object store under the digest; the draft fetches it by that
digest and drafts through the TLI mapping. Checked through nothing but the public contract:

- a missing object is `unknown_vocabulary`, bytes that are not that vocabulary `bad_vocabulary` (an error
  reply, the draft keeps serving), and the next job after the right bundle is back succeeds;
- greedy output is the target's own greedy output, token for token, and the stats name both digests;
- sampled replies (a draft blended away from the target, so rejections happen) have the target's
  distribution on the first tokens by chi-square, in `tkslt` and `dssd`; a stack whose verifier scores
  draft token i with target row i + 1 fails the same check (negative control).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from nats.aio.client import Client

from draftwire.shared.core.cross_vocab import model_vocabulary
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.core.subject_names import VOCAB_BUCKET
from draftwire.shared.core.vocab_bundle import pack
from draftwire.shared.models.runtime import load_model
from tests.exact_distribution import chi_square_pvalue, exact_prefixes
from tests.in_process import start_tiny_stack
from tests.test_services_chi_square import VERIFIER_SHIFTED_BY_ONE
from tests.toy_models import blend, retokenized_llama, tiny_llama

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPTS = ["a cat sat", "def f(x):\n    return", "naïve café"]
GREEDY_TOKENS = 24
PROMPT = "def f(x):"
PARAMS = {"temperature": 0.2, "top_p": 0.7}  # as tests/test_services_chi_square.py: few, well-filled cells
LENGTH = 4
GAMMA = 3
REQUESTS = 200
PASS_P = 1e-3
REJECT_P = 1e-6


@pytest.fixture(scope="module")
def target():
    return load_model("tiny-random", "fp32", progress=False)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, target):
    """The target's weights blended 10% towards another model, under the other tokenizer."""
    draft = retokenized_llama(blend(target, tiny_llama(seed=1), 0.1))
    path = tmp_path_factory.mktemp("draft") / "tiny-bpe-draft"
    draft.model.save_pretrained(path)
    draft.tokenizer.save_pretrained(path)
    loaded = load_model(str(path), "fp32", progress=False)
    assert model_vocabulary(loaded).digest != model_vocabulary(target).digest
    assert loaded.vocab_size == target.vocab_size  # same size, different meaning: only the digest tells
    return path


async def _start(tmp_path_factory, draft_dir, env: dict | None = None):
    return await start_tiny_stack(str(tmp_path_factory.mktemp("js")), str(draft_dir), GAMMA, env)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, draft_dir):
    st = await _start(tmp_path_factory, draft_dir)
    yield st
    await st.stop()


async def _ask(url: str, bodies: list[dict]) -> list[dict]:
    nc = Client()
    await nc.connect(url)
    try:
        async def one(body: dict) -> dict:
            return json.loads((await nc.request("draftwire.prompts", json.dumps(body).encode(), timeout=120)).data)

        return list(await asyncio.gather(*(one(b) for b in bodies)))
    finally:
        await nc.close()


def _greedy(prompt: str, mode: str = "tkslt") -> dict:
    return {"prompt": prompt, "max_new_tokens": GREEDY_TOKENS, "temperature": 0, "mode": mode, "gamma": 4, "k": 8}


async def test_missing_or_bad_vocabulary_is_a_clear_error_then_recovers(stack, target, draft_dir) -> None:
    """Runs first: the draft has fetched nothing yet (a failed fetch is not cached)."""
    digest, bundle = pack(target.tokenizer, target.vocab_size)
    nc = Client()
    await nc.connect(stack.url)
    try:
        store = await nc.jetstream().object_store(VOCAB_BUCKET)
        assert (await store.get(digest)).data == bundle  # the verifier stored it, under its digest
        await store.delete(digest)
        [reply] = await _ask(stack.url, [_greedy(PROMPTS[0])])
        assert reply["error"]["code"] == "unknown_vocabulary", reply
        assert digest[:12] in reply["error"]["message"]
        await store.put(digest, bundle[:-7] + b"garbage")
        [reply] = await _ask(stack.url, [_greedy(PROMPTS[0])])
        assert reply["error"]["code"] == "bad_vocabulary", reply
        _, other = pack(load_model(str(draft_dir), "fp32", progress=False).tokenizer, target.vocab_size)
        await store.put(digest, other)  # another vocabulary's (valid) bundle under this digest
        [reply] = await _ask(stack.url, [_greedy(PROMPTS[0])])
        assert reply["error"]["code"] == "bad_vocabulary", reply
        await store.put(digest, bundle)
    finally:
        await nc.close()
    [reply] = await _ask(stack.url, [_greedy(PROMPTS[0])])
    assert "error" not in reply, reply


async def test_one_vocabulary_keeps_todays_path_without_a_fetch(target) -> None:
    """Equal digests: no mapping, no tokenizer fetched (no JetStream at all), the draft's own tokenizer."""
    from draftwire.services.draft.target_vocab import TargetVocabs
    from draftwire.shared.core.protocol import TargetInfo

    vocabs = TargetVocabs(js=None, model=target)
    await vocabs.load_own()
    info = TargetInfo(target.name, target.vocab_size, target.eos_token_ids, target.context_length, None,
                      model_vocabulary(target).digest)
    pairing = await vocabs.pairing(info, needs_draft=True)
    assert pairing.cross is None and pairing.target is None
    assert pairing.encode_prompt(target, "hi") == target.encode("hi")


class _InProcess:
    """The same pair drafting in one process (LocalEngine: the committed engine path)."""

    def __init__(self, target, draft_dir, mode: str) -> None:
        engine = LocalEngine(target, load_model(str(draft_dir), "fp32", progress=False))
        params = SamplingParams(temperature=0, max_new_tokens=GREEDY_TOKENS)
        spec = SpecParams(mode=mode, gamma=4, k=8)
        # as the draft service runs it: the first round drafts nothing (the two prefills overlap)
        self.accepted = {p: asyncio.run(engine.agenerate(p, params, spec, open_early=True)).stats.summary()["accepted"]
                         for p in PROMPTS}


@pytest.mark.parametrize("mode", ["tkslt", "dssd"])
async def test_greedy_output_is_the_targets_own(stack, target, draft_dir, mode: str) -> None:
    replies = await _ask(stack.url, [_greedy(p, mode) for p in PROMPTS])
    engine, here = LocalEngine(target), await asyncio.to_thread(_InProcess, target, draft_dir, mode)
    for prompt, reply in zip(PROMPTS, replies, strict=True):
        assert "error" not in reply, reply
        want = (await engine.agenerate(prompt, SamplingParams(temperature=0, max_new_tokens=GREEDY_TOKENS),
                                       SpecParams(mode="ar"))).token_ids
        assert reply["token_ids"] == want, prompt
        assert reply["text"] == target.decode(want)
        stats = reply["stats"]
        assert stats["target_vocab"] == model_vocabulary(target).digest != stats["draft_vocab"]
        # the same proposals as the in-process engine drafting through the same mapping: a mis-mapped id or a
        # draft context out of step would cost acceptance
        assert stats["accepted"] == here.accepted[prompt], (prompt, stats)
    assert sum(r["stats"]["accepted"] for r in replies) > 0


async def _sampled_pvalue(url: str, target, mode: str) -> float:
    bodies = [{"prompt": PROMPT, "max_new_tokens": LENGTH, "seed": seed, "mode": mode, "gamma": GAMMA,
               "k": 8, **PARAMS} for seed in range(REQUESTS)]
    replies = await _ask(url, bodies)
    assert not [r for r in replies if "error" in r]
    assert all(r["stats"]["target_vocab"] != r["stats"]["draft_vocab"] for r in replies)  # the cross path ran
    assert sum(r["stats"]["rejections"] for r in replies) > REQUESTS / 10, "the draft hardly ever disagreed"
    exact = exact_prefixes(target, target.encode(PROMPT), SamplingParams(**PARAMS), LENGTH)
    return chi_square_pvalue([r["token_ids"] for r in replies], exact)


@pytest.mark.parametrize("mode", ["tkslt", "dssd"])
async def test_sampled_replies_are_distributed_as_the_target(stack, target, mode: str) -> None:
    assert await _sampled_pvalue(stack.url, target, mode) > PASS_P


@pytest.mark.slow  # a second stack: ~25 s on two cores
async def test_negative_control_a_planted_verifier_bug_is_rejected(tmp_path_factory, draft_dir, target) -> None:
    """The same check on a stack whose verifier scores draft token i with target row i + 1."""
    site = tmp_path_factory.mktemp("planted")
    (site / "sitecustomize.py").write_text(VERIFIER_SHIFTED_BY_ONE)
    planted = await _start(tmp_path_factory, draft_dir, env={"PYTHONPATH": str(site)})
    try:
        assert await _sampled_pvalue(planted.url, target, "dssd") < REJECT_P
    finally:
        await planted.stop()
