"""Lossless through the real services: sampled replies on `draftwire.prompts` have the target's distribution.

The stack runs as processes, started like `draftwire up`, on a real nats-server. The target is `tiny-random`;
the catalog has no second tiny model, so the draft is a Hugging Face dir written for this test: a tiny Llama
10% of the way from the target to a differently seeded one, with a byte tokenizer that gives the same ids
(tests/toy_models.py). The client uses nothing but nats-py and the documented contract: a JSON request,
`token_ids` in the reply. Concurrent sampled requests with gamma = 3 in `tkslt` and `dssd` mode; the joint of
their first four tokens against the target's, enumerated from the target model (the first one comes from the
zero-token opening round, the next three are drafted and verified). A second stack whose
verifier scores draft token i with target row i + 1 (planted at interpreter start) must fail the same test.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import pytest_asyncio
from nats.aio.client import Client

from draftwire.shared.core.params import SamplingParams
from draftwire.shared.models.runtime import load_model
from tests.exact_distribution import chi_square_pvalue, exact_prefixes
from tests.in_process import start_tiny_stack
from tests.toy_models import blend, save_hf_dir, tiny_llama

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "def f(x):"
PARAMS = {"temperature": 0.2, "top_p": 0.7}  # a first-four-token joint with few, well-filled cells
LENGTH = 4  # the first token comes from the opening round (no draft): three more are speculated
GAMMA = 3
REQUESTS = 300
PASS_P = 1e-3
REJECT_P = 1e-6

# Loaded by every service process of the planted stack (sitecustomize runs at interpreter start).
VERIFIER_SHIFTED_BY_ONE = """
import os, sys
sys.path.insert(0, os.getcwd())  # what `python -m` adds later: patch the very modules the service imports
import numpy as np
from draftwire.shared.core import verifier_sessions as vs
def _shifted(verify):
    return lambda probs, *args, **kw: verify(np.vstack([probs[1:], probs[-1:]]), *args, **kw)
vs.verify_block, vs.split_verify = _shifted(vs.verify_block), _shifted(vs.split_verify)
"""


@pytest.fixture(scope="module")
def target():
    return load_model("tiny-random", "fp32", progress=False)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, target):
    path = tmp_path_factory.mktemp("draft") / "tiny-draft"
    save_hf_dir(blend(target, tiny_llama(seed=1), 0.1), path)
    assert load_model(str(path), "fp32", progress=False).encode(PROMPT) == target.encode(PROMPT)
    return path


async def _start(tmp_path_factory, draft_dir, env: dict | None = None):
    return await start_tiny_stack(str(tmp_path_factory.mktemp("js")), str(draft_dir), GAMMA, env)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, draft_dir):
    st = await _start(tmp_path_factory, draft_dir)
    yield st
    await st.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def planted_stack(tmp_path_factory, draft_dir):
    site = tmp_path_factory.mktemp("planted")
    (site / "sitecustomize.py").write_text(VERIFIER_SHIFTED_BY_ONE)
    st = await _start(tmp_path_factory, draft_dir, env={"PYTHONPATH": str(site)})
    yield st
    await st.stop()


async def _replies(url: str, mode: str) -> list[dict]:
    """REQUESTS concurrent requests, seeds 0..REQUESTS-1, through nothing but the public contract."""
    nc = Client()
    await nc.connect(url)
    try:

        async def one(seed: int) -> dict:
            body = {"prompt": PROMPT, "max_new_tokens": LENGTH, "seed": seed, "mode": mode, "gamma": GAMMA,
                    "k": 8, **PARAMS}
            msg = await nc.request("draftwire.prompts", json.dumps(body).encode(), timeout=120)
            return json.loads(msg.data)

        replies = await asyncio.gather(*(one(seed) for seed in range(REQUESTS)))
    finally:
        await nc.close()
    errors = [r for r in replies if "error" in r]
    assert not errors, errors[:3]
    return replies


def _pvalue(target, replies: list[dict]) -> float:
    exact = exact_prefixes(target, target.encode(PROMPT), SamplingParams(**PARAMS), LENGTH)
    return chi_square_pvalue([r["token_ids"] for r in replies], exact)


@pytest.mark.parametrize("mode", ["tkslt", "dssd"])
async def test_service_replies_are_distributed_as_the_target(stack, target, mode: str) -> None:
    t0 = time.perf_counter()
    replies = await _replies(stack.url, mode)
    p = _pvalue(target, replies)
    print(f"{mode}: {REQUESTS} requests in {time.perf_counter() - t0:.1f}s, p = {p:.3g}")
    stats = [r["stats"] for r in replies]
    assert all(s["mode"] == mode and s["gamma"] == GAMMA for s in stats), stats[0]
    assert sum(s["rejections"] for s in stats) > REQUESTS / 4, "the draft hardly ever disagreed"
    assert p > PASS_P


async def test_planted_verifier_bug_is_rejected(planted_stack, target) -> None:
    p = _pvalue(target, await _replies(planted_stack.url, "dssd"))
    print(f"planted: p = {p:.3g}")
    assert p < REJECT_P
