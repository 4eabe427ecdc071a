"""The whole system on a real nats-server with real SmolLM2 weights: the four services as processes.

The stack is started with the same code as `draftwire up`. Clients here use only nats-py and the documented
contract. Covers: greedy output equal to the in-process engine and to transformers' generate, failover to the
second verifier when the one serving a request is killed mid-round, error replies for malformed input on every subject, and one trace
across the services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import time

import msgpack
import nats.errors
import numpy as np
import pytest
import pytest_asyncio
from nats.aio.client import Client

from draftwire.services.cli.stack import start_stack
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.protocol import ErrorReply, ProposalBlock, VerifyRequest, decode_any
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.io.bus import SUBJECTS
from draftwire.shared.models.runtime import load_model
from tests.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "def fibonacci(n):"


def stack_args() -> argparse.Namespace:
    return argparse.Namespace(
        nats=None, nats_port=0, telemetry_port=0, draft_model="smollm2-135m", draft_dtype="int8",
        target_model="smollm2-135m", target_dtype="fp32", mode="tkslt", gamma=4, k=8, verifiers=2,
        schedulers=2,
    )


def _otel_env(otlp) -> dict:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def otlp():
    rx = OtlpReceiver()
    await rx.start()
    yield rx
    await rx.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, otlp):
    st = await start_stack(stack_args(), quiet=True, store_dir=str(tmp_path_factory.mktemp("js")),
                           env=_otel_env(otlp))
    yield st
    await st.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(stack):
    nc = Client()
    await nc.connect(stack.url)
    yield nc
    await nc.close()


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens from the in-process engine and from transformers' generate, computed once."""
    from draftwire.services.cli.selfcheck import hf_greedy

    target = load_model("smollm2-135m", "fp32", progress=False)
    draft = load_model("smollm2-135m", "int8", progress=False)
    ids = target.encode(PROMPT)
    engine = LocalEngine(target, draft).generate(ids, SamplingParams(max_new_tokens=64, min_new_tokens=64),
                                                 SpecParams())
    return {"hf": hf_greedy(target, ids, 64), "engine": engine.token_ids, "vocab": target.vocab_size}


async def test_plain_text_prompt_gets_json_result_equal_to_engine_and_hf(client, reference):
    msg = await client.request("draftwire.prompts", PROMPT.encode(), timeout=120)
    result = json.loads(msg.data)
    assert "error" not in result, result
    assert set(result) >= {"id", "text", "token_ids", "finish_reason", "stats"}
    n = len(result["token_ids"])
    assert n >= 64 or result["finish_reason"] == "stop"
    m = min(n, 64)
    assert result["token_ids"][:m] == reference["engine"][:m] == reference["hf"][:m]
    stats = result["stats"]
    for key in ("rounds", "drafted", "accepted", "acceptance_rate", "mean_accepted_per_round", "uplink_bytes",
                "downlink_bytes", "wall_s", "tokens_per_s", "mode", "gamma", "k", "draft_instance",
                "verifier_instances"):
        assert key in stats, key
    assert stats["mode"] == "tkslt" and stats["uplink_bytes"] > 0 and stats["verifier_instances"]


async def test_msgpack_request_gets_msgpack_reply_and_stream(client, reference):
    chunks: list[dict] = []
    sub = await client.subscribe(SUBJECTS.stream("mp1"), cb=functools.partial(_append, chunks))
    body = {"id": "mp1", "prompt": PROMPT, "max_new_tokens": 32, "min_new_tokens": 32, "stream": True}
    msg = await client.request("draftwire.prompts", msgpack.packb(body), timeout=120)
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    result = msgpack.unpackb(msg.data)
    assert result["token_ids"] == reference["engine"][:32]
    assert chunks and chunks[-1]["done"] is True
    assert "".join(c["text"] for c in chunks[:-1]) == result["text"]
    offsets = [c["offset"] for c in chunks[:-1]]  # tokens before each chunk: a client can drop repeats
    assert offsets == [sum(len(c["token_ids"]) for c in chunks[:i]) for i in range(len(offsets))]


async def _append(chunks, msg):
    chunks.append(msgpack.unpackb(msg.data))


async def test_verifier_killed_mid_generation_request_still_completes(stack, client, reference):
    """Two verifiers; the one serving the request is SIGKILLed with a round in flight: the other takes over."""
    victim: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_round(msg) -> None:
        event = msgpack.unpackb(msg.data)
        if event["request_id"] == "failover" and event["round"] >= 2 and not victim.done():
            victim.set_result(event["verifier_instance"])

    sub = await client.subscribe(SUBJECTS.events_round, cb=on_round)
    body = {"id": "failover", "prompt": PROMPT, "max_new_tokens": 64, "min_new_tokens": 64}
    pending = asyncio.ensure_future(client.request("draftwire.prompts", json.dumps(body).encode(), timeout=180))
    try:
        instance = await asyncio.wait_for(victim, 60)
        key = next(k for k, p in stack.procs.items() if k.startswith("verifier") and instance.endswith(f"-{p.pid}"))
        stack.procs[key].send_signal(signal.SIGSTOP)  # so that the next round is in flight when it dies
        await asyncio.sleep(0.3)
        await stack.kill(key)
        result = json.loads((await pending).data)
        assert "error" not in result, result
        assert result["token_ids"] == reference["engine"]
        assert result["stats"]["verifier_instances"][0] == instance and len(result["stats"]["verifier_instances"]) == 2
        assert result["stats"]["failovers"] >= 1
    finally:
        await sub.unsubscribe()


async def _ask_counting(client, body: dict, replies: list) -> dict:
    """Request on an inbox of our own, so a second (duplicate) reply would be seen too."""
    inbox = client.new_inbox()
    first = asyncio.get_running_loop().create_future()

    async def on_reply(msg) -> None:
        replies.append(msg.data)
        if not first.done():
            first.set_result(json.loads(msg.data))

    await client.subscribe(inbox, cb=on_reply)
    await client.publish(SUBJECTS.prompts, json.dumps(body).encode(), reply=inbox)
    return await asyncio.wait_for(first, 120)


async def test_two_requests_with_one_id_at_once_get_one_result_and_one_duplicate_id(client, reference):
    body = {"id": "same-id", "prompt": PROMPT, "max_new_tokens": 32, "min_new_tokens": 32}
    replies: list = []
    results = await asyncio.gather(_ask_counting(client, body, replies), _ask_counting(client, body, replies))
    codes = sorted(r.get("error", {}).get("code", "ok") for r in results)
    assert codes == ["duplicate_id", "ok"], results
    served = next(r for r in results if "error" not in r)
    assert served["token_ids"] == reference["engine"][:32]  # never mixed with the other request's session
    again = await _ask_counting(client, body, replies)  # the id is free again once the first is done
    assert again["token_ids"] == reference["engine"][:32]
    await asyncio.sleep(1.0)
    assert len(replies) == 3


async def test_a_job_redelivered_while_it_runs_is_attached_to_and_answered_once(stack, client, reference):
    """The scheduler holding a job freezes past the jobs stream's ack_wait, so JetStream redelivers the job to
    the other scheduler while the draft is still generating it: it must follow that run (not start a second)
    and the requester gets one reply, identical to the request served alone."""
    round_zero = []
    holder: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_round(msg) -> None:
        event = msgpack.unpackb(msg.data)
        if event["request_id"] == "redeliver":
            if event["round"] == 0:
                round_zero.append(event)
            if not holder.done():
                holder.set_result(True)

    sub = await client.subscribe(SUBJECTS.events_round, cb=on_round)
    body = {"id": "redeliver", "prompt": PROMPT, "max_new_tokens": 64, "min_new_tokens": 64}
    replies: list = []
    pending = asyncio.ensure_future(_ask_counting(client, body, replies))
    frozen = None
    try:
        await asyncio.wait_for(holder, 60)
        for key, proc in stack.procs.items():
            if key.startswith("scheduler"):
                msg = await client.request(f"draftwire.scheduler.sessions.{_instance(stack, key)}", b"", timeout=5)
                if any(row["id"] == "redeliver" for row in json.loads(msg.data)["sessions"]):
                    frozen = proc
        assert frozen is not None
        frozen.send_signal(signal.SIGSTOP)
        await asyncio.sleep(6.0)  # > the jobs consumer's ack_wait (4 s): the job is redelivered meanwhile
        frozen.send_signal(signal.SIGCONT)
        frozen = None
        result = await pending
        await asyncio.sleep(2.0)  # the thawed scheduler must not answer again
        assert "error" not in result, result
        assert result["token_ids"] == reference["engine"]
        assert len(replies) == 1
        assert len(round_zero) == 1  # one run of the generation, not two
    finally:
        if frozen is not None:
            frozen.send_signal(signal.SIGCONT)
        await sub.unsubscribe()


def _instance(stack, key: str) -> str:
    from draftwire.shared.io.service_shell import default_instance

    return default_instance(key.split("-")[0], stack.procs[key].pid)


async def test_cancelled_max_length_request_stops_within_a_round_and_the_next_is_served_at_normal_speed(
    client, reference
):
    """The acceptance check: the largest allowed max_new_tokens, cancelled after 2 s: rounds stop within one
    round of the cancel, and a normal request right after is as fast as the same request before."""
    body = {"id": "normal-before", "prompt": PROMPT, "max_new_tokens": 32, "min_new_tokens": 32}
    t0 = time.monotonic()
    await _ask_counting(client, body, [])
    alone_s = time.monotonic() - t0
    rounds: list[float] = []

    async def on_round(msg) -> None:
        if msgpack.unpackb(msg.data)["request_id"] == "longest":
            rounds.append(time.monotonic())

    sub = await client.subscribe(SUBJECTS.events_round, cb=on_round)
    target_context = 8192  # SmolLM2-135M
    prompt_len = len(load_model("smollm2-135m", "fp32", progress=False).encode(PROMPT))
    longest = {"id": "longest", "prompt": PROMPT, "max_new_tokens": target_context - prompt_len}
    pending = asyncio.ensure_future(_ask_counting(client, longest, []))
    await asyncio.sleep(2.0)
    cancelled_at = time.monotonic()
    await client.publish(SUBJECTS.cancel("longest"), b"")
    result = await asyncio.wait_for(pending, 30)
    reply_s = time.monotonic() - cancelled_at
    await asyncio.sleep(1.0)  # any round still running would report meanwhile
    await sub.unsubscribe()
    assert result["error"]["code"] == "cancelled", result
    assert rounds, "the long request never ran a round"
    assert sum(t > cancelled_at for t in rounds) <= 1  # at most the round in flight when the cancel came
    t1 = time.monotonic()
    after = await _ask_counting(client, {**body, "id": "normal-after"}, [])
    after_s = time.monotonic() - t1
    assert after["token_ids"] == reference["engine"][:32]
    print(f"\ncancel: {len(rounds)} rounds before, {sum(t > cancelled_at for t in rounds)} after the cancel; "
          f"reply {reply_s:.2f} s after it; next request {after_s:.2f} s vs {alone_s:.2f} s alone")
    assert after_s < 1.5 * alone_s + 1.0


async def test_timeout_s_ends_a_long_request_with_deadline_exceeded_and_the_partial_text(client):
    body = {"id": "short-timeout", "prompt": PROMPT, "max_new_tokens": 4000, "min_new_tokens": 4000, "timeout_s": 2}
    t0 = time.monotonic()
    result = json.loads((await client.request("draftwire.prompts", json.dumps(body).encode(), timeout=30)).data)
    elapsed = time.monotonic() - t0
    assert result["error"]["code"] == "deadline_exceeded", result
    assert 0 < len(result["token_ids"]) < 4000 and result["text"]
    assert elapsed < 3.5, elapsed


async def test_cancel_of_a_running_request_replies_cancelled_with_the_partial_text(client):
    first_chunk = asyncio.Event()
    sub = await client.subscribe(SUBJECTS.stream("to-cancel"), cb=functools.partial(_set, first_chunk))
    body = {"id": "to-cancel", "prompt": PROMPT, "max_new_tokens": 4000, "min_new_tokens": 4000, "stream": True}
    pending = asyncio.ensure_future(client.request("draftwire.prompts", json.dumps(body).encode(), timeout=60))
    try:
        await asyncio.wait_for(first_chunk.wait(), 60)
        t0 = time.monotonic()
        await client.publish(SUBJECTS.cancel("to-cancel"), b"")
        result = json.loads((await pending).data)
        assert result["error"]["code"] == "cancelled", result
        assert 0 < len(result["token_ids"]) < 4000
        assert time.monotonic() - t0 < 2.0
    finally:
        await sub.unsubscribe()


async def _set(event, _msg):
    event.set()


async def test_prompt_beyond_the_context_is_refused_in_under_a_second(client):
    body = {"prompt": " ".join(["hello"] * 9000), "max_new_tokens": 16}
    t0 = time.monotonic()
    result = json.loads((await client.request("draftwire.prompts", json.dumps(body).encode(), timeout=30)).data)
    assert result["error"]["code"] == "context_length_exceeded", result
    assert time.monotonic() - t0 < 1.0


def _verify_request(reference, session="nosuch") -> bytes:
    block = ProposalBlock.from_rows([(np.array([5, 6]), np.array([0.5, 0.5], np.float16))], reference["vocab"], "f16")
    return VerifyRequest(session=session, round=0, base=3, last_token=9, tokens=np.array([5]), proposals=block,
                         vocab_size=reference["vocab"]).encode()


@pytest.mark.parametrize("subject", ["draftwire.verify", "draftwire.draft.start", "draftwire.prompts"])
async def test_garbage_on_every_request_subject_gets_error_reply(client, subject):
    for payload in (b"\xc1\xff garbage", msgpack.packb({"v": 1, "t": "vr", "s": 5}), msgpack.packb([1, 2, 3])):
        msg = await client.request(subject, payload, timeout=30)
        assert _is_error(msg.data), (subject, payload, msg.data[:200])


async def test_huge_payloads_get_error_replies(client):
    huge = os.urandom(2 * 1024 * 1024)
    for subject in ("draftwire.verify", "draftwire.draft.start", "draftwire.prompts"):
        msg = await client.request(subject, huge, timeout=30)
        assert _is_error(msg.data), subject


async def test_unknown_session_and_instance_subject(stack, client, reference):
    msg = await client.request("draftwire.verify", _verify_request(reference), timeout=30)
    err = decode_any(msg.data)
    assert isinstance(err, ErrorReply) and err.code == "unknown_session"
    instance = msg.headers["Draftwire-Instance"]
    msg = await client.request(f"draftwire.verify.{instance}", b"\x00\x01", timeout=30)
    assert isinstance(decode_any(msg.data), ErrorReply)


async def test_telemetry_events_subject_rejects_garbage(client):
    msg = await client.request(SUBJECTS.events_round, b"not msgpack", timeout=10)
    assert _is_error(msg.data)


async def test_services_keep_serving_after_bad_input(client, reference):
    body = {"prompt": PROMPT, "max_new_tokens": 16, "min_new_tokens": 16}
    msg = await client.request("draftwire.prompts", json.dumps(body).encode(), timeout=120)
    assert json.loads(msg.data)["token_ids"] == reference["engine"][:16]
    bad = await client.request("draftwire.prompts", json.dumps({"prompt": "x", "top_p": 7}).encode(), timeout=30)
    assert json.loads(bad.data)["error"]["code"]


async def test_services_answer_nats_discovery(client):
    names = set()
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    await client.publish("$SRV.PING", b"", reply=inbox)
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            names.add(json.loads((await sub.next_msg(timeout=1)).data)["name"])
    assert {"draftwire-scheduler", "draftwire-draft", "draftwire-verifier", "draftwire-telemetry"} <= names


async def test_one_request_one_trace_across_services(client, otlp):
    body = {"id": "traced", "prompt": PROMPT, "max_new_tokens": 8, "min_new_tokens": 8}
    await client.request("draftwire.prompts", json.dumps(body).encode(), timeout=120)

    def complete(spans):
        roots = [s for s in spans if s.name == "scheduler.request"
                 and s.attributes.get("draftwire.request_id") == "traced"]
        if not roots:
            return False
        # Services export in independent batches, so wait until every parent has arrived too.
        trace = [s for s in spans if s.trace_id == roots[0].trace_id]
        ids = {s.span_id for s in trace}
        return (len({s.service_name for s in trace}) >= 3
                and {"verify", "draft.generate"} <= {s.name for s in trace}
                and all(s.parent_span_id in ids for s in trace if s is not roots[0]))

    await otlp.wait_for(complete, timeout=30)
    root = next(s for s in otlp.spans if s.name == "scheduler.request"
                and s.attributes.get("draftwire.request_id") == "traced")
    trace = [s for s in otlp.spans if s.trace_id == root.trace_id]
    by_id = {s.span_id: s for s in trace}
    assert {s.service_name for s in trace} >= {"draftwire-scheduler", "draftwire-draft", "draftwire-verifier"}
    for s in trace:
        if s is not root:
            assert s.parent_span_id in by_id, f"{s.name} ({s.service_name}) has a dangling parent"
    verify = next(s for s in trace if s.name == "verify")
    assert by_id[verify.parent_span_id].name == "verify_rpc"
    assert by_id[verify.parent_span_id].service_name == "draftwire-draft"
    gen = next(s for s in trace if s.name == "draft.generate")
    assert by_id[gen.parent_span_id].service_name == "draftwire-scheduler"


def _is_error(data: bytes) -> bool:
    for decode in (json.loads, msgpack.unpackb):
        with contextlib.suppress(ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException):
            obj = decode(data)
            if isinstance(obj, dict) and "error" in obj:
                return True
    try:
        return isinstance(decode_any(data), ErrorReply)
    except ValueError:
        return False



CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


async def test_a_chat_is_rendered_with_the_target_s_template_and_equals_transformers_generate(client):
    """`messages` through the services, greedy: the tokens transformers' generate makes from the chat
    template's add_generation_prompt rendering, stopping at the same end-of-turn."""
    import torch

    target = load_model("smollm2-135m", "fp32", progress=False)
    ids = target.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = torch.tensor([ids["input_ids"]])
    with torch.inference_mode():
        out = target.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=40, eos_token_id=list(target.eos_token_ids),
                                    pad_token_id=target.eos_token_ids[0])
    expected = [t for t in out[0, prompt.shape[1]:].tolist()]
    body = {"id": "chat1", "messages": CHAT, "max_new_tokens": 40}
    result = json.loads((await client.request("draftwire.prompts", json.dumps(body).encode(), timeout=120)).data)
    assert "error" not in result, result
    assert result["token_ids"] == expected and result["text"].strip()
    assert result["finish_reason"] == ("stop" if expected[-1] in target.eos_token_ids else "length")


async def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(client, reference):
    full = target_text = None
    body = {"id": "nostop", "prompt": PROMPT, "max_new_tokens": 32, "min_new_tokens": 32}
    full = json.loads((await client.request("draftwire.prompts", json.dumps(body).encode(), timeout=120)).data)
    target_text = full["text"]
    stop = target_text[12:16]
    chunks: list[dict] = []
    sub = await client.subscribe(SUBJECTS.stream("withstop"), cb=functools.partial(_append_json, chunks))
    body = {"id": "withstop", "prompt": PROMPT, "max_new_tokens": 32, "min_new_tokens": 32, "stop": [stop, "zzz"],
            "stream": True}
    result = json.loads((await client.request("draftwire.prompts", json.dumps(body).encode(), timeout=120)).data)
    for _ in range(50):
        if chunks and chunks[-1]["done"]:
            break
        await asyncio.sleep(0.02)
    await sub.unsubscribe()
    at = target_text.find(stop)
    assert result["finish_reason"] == "stop" and result["text"] == target_text[:at]
    assert full["token_ids"][: len(result["token_ids"])] == result["token_ids"]
    streamed = "".join(c["text"] for c in chunks[:-1])
    assert streamed == result["text"] and stop not in streamed


async def _append_json(chunks, msg):
    chunks.append(json.loads(msg.data))


# --- the OpenAI-compatible gateway, with OpenAI's own client -------------------------------------------------


async def _nats_chat(client, rid: str, **fields) -> dict:
    body = {"id": rid, "messages": CHAT, **fields}
    return json.loads((await client.request("draftwire.prompts", json.dumps(body).encode(), timeout=120)).data)


async def test_openai_client_chat_equals_the_nats_contract_streamed_or_not(stack, client):
    import openai

    oa = openai.AsyncOpenAI(base_url=stack.gateway_url, api_key="-")
    model = (await oa.models.list()).data[0].id
    assert model == "smollm2-135m"
    same = {"temperature": 0.8, "seed": 11}
    reply = await oa.chat.completions.create(model=model, messages=CHAT, max_tokens=24, **same)
    nats_reply = await _nats_chat(client, "oa-ref", max_new_tokens=24, **same)
    assert reply.choices[0].message.content == nats_reply["text"] and reply.choices[0].message.role == "assistant"
    target = load_model("smollm2-135m", "fp32", progress=False)
    assert reply.usage.prompt_tokens == len(target.render_chat([(m["role"], m["content"]) for m in CHAT]))
    assert reply.usage.completion_tokens == len(nats_reply["token_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == nats_reply["finish_reason"]
    assert reply.model_extra["draftwire"]["acceptance_rate"] >= 0  # the speculative statistics ride along

    stream = await oa.chat.completions.create(model=model, messages=CHAT, max_tokens=24, stream=True,
                                              stream_options={"include_usage": True}, **same)
    parts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == nats_reply["text"] and finish == nats_reply["finish_reason"]
    assert usage.completion_tokens == len(nats_reply["token_ids"])

    completion = await oa.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert completion.choices[0].text == json.loads((await client.request(
        "draftwire.prompts", json.dumps({"prompt": PROMPT, "max_new_tokens": 16}).encode(), timeout=120)).data)["text"]


async def test_openai_client_gets_openai_s_error_shape(stack):
    import openai

    oa = openai.AsyncOpenAI(base_url=stack.gateway_url, api_key="-")
    with pytest.raises(openai.BadRequestError) as bad:
        await oa.chat.completions.create(model="smollm2-135m", messages=CHAT, n=2)
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        await oa.chat.completions.create(model="smollm2-135m", messages=[{"role": "wizard", "content": "x"}])
    assert bad.value.body["code"] == "bad_param"
    with pytest.raises(openai.NotFoundError):
        await oa.chat.completions.create(model="gpt-9", messages=CHAT)


async def test_a_client_that_disconnects_mid_stream_cancels_its_generation(stack, client):
    import aiohttp

    ended: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_request(msg) -> None:
        event = msgpack.unpackb(msg.data)
        if not ended.done():
            ended.set_result((time.monotonic(), event))

    sub = await client.subscribe(SUBJECTS.events_request, cb=on_request)
    body = {"model": "smollm2-135m", "messages": CHAT, "max_tokens": 2000, "min_tokens": 2000, "stream": True,
            "temperature": 0}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{stack.gateway_url}/chat/completions", json=body)
        lines = 0
        async for _ in response.content:
            lines += 1
            if lines >= 6:  # a few chunks in: generating
                break
        gone = time.monotonic()
        response.close()
    at, event = await asyncio.wait_for(ended, 30)
    await sub.unsubscribe()
    assert event["error"] == "cancelled" and event["new_tokens"] < 2000
    assert at - gone < 5.0, f"the generation ran {at - gone:.1f}s after its client left"
