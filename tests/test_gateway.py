"""The OpenAI API shapes (shared/core/openai_api.py): requests refused the way OpenAI refuses them, and
results, chunks and errors in OpenAI's shapes. The gateway through OpenAI's own client: test_services_e2e."""

from __future__ import annotations

import pytest

from draftwire.shared.core import openai_api as api

CHAT = [{"role": "user", "content": "hi"}]


def test_a_chat_request_becomes_a_draftwire_request():
    out = api.chat_request({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                   {"type": "text", "text": "b"}]}],
                            "max_completion_tokens": 9, "temperature": 0.5, "seed": 3, "stop": "\n",
                            "stream": True, "draftwire": {"mode": "dssd", "gamma": 3}}, "r1", 60.0)
    assert out == {"id": "r1", "timeout_s": 60.0, "stream": True, "max_new_tokens": 9, "temperature": 0.5,
                   "seed": 3, "stop": "\n", "mode": "dssd", "gamma": 3,
                   "messages": [{"role": "user", "content": "ab"}]}
    defaults = api.chat_request({"messages": CHAT}, "r2", 60.0)
    assert defaults["temperature"] == 1.0 and defaults["max_new_tokens"] == api.DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": CHAT, "n": 2}, "n"),
    ({"messages": CHAT, "logprobs": True}, "logprobs"),
    ({"messages": CHAT, "tools": []}, "tools"),
    ({"messages": CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": CHAT, "temperature": 3}, "temperature"),
    ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ({"messages": CHAT, "seed": -1}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": CHAT, "draftwire": {"sneaky": 1}}, "draftwire"),
])
def test_what_the_contract_cannot_do_is_refused_as_openai_does(body, param):
    with pytest.raises(api.ApiError) as err:
        api.chat_request(body, "r", 60.0)
    assert err.value.status == 400 and err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_completions_take_one_prompt():
    assert api.completion_request({"prompt": ["x"]}, "r", 1.0)["prompt"] == "x"
    with pytest.raises(api.ApiError):
        api.completion_request({"prompt": ["x", "y"]}, "r", 1.0)


def test_results_and_errors_in_openai_s_shapes():
    result = {"text": "hey", "token_ids": [1, 2, 3], "finish_reason": "length", "stats": {"prompt_tokens": 7}}
    chat = api.chat_response(result, "chatcmpl-1", "m", 5)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
    assert chat["choices"][0]["finish_reason"] == "length"
    assert chat["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert api.completion_response(result, "cmpl-1", "m", 5)["choices"][0]["text"] == "hey"
    assert api.from_draftwire_error({"code": "context_length_exceeded", "message": "too long"}).status == 400
    assert api.from_draftwire_error({"code": "overloaded", "message": "full"}).status == 503
    assert api.from_draftwire_error({"code": "weird", "message": "?"}).status == 500
    vocab = api.from_draftwire_error({"code": "unknown_vocabulary", "message": "no such vocabulary"})
    assert (vocab.status, vocab.type, vocab.code) == (503, "server_error", "unknown_vocabulary")
    assert api.from_draftwire_error({"code": "bad_vocabulary", "message": "hash"}).status == 502


async def test_no_scheduler_is_a_503_in_openai_s_shape_streamed_or_not():
    """The gateway alone (a NATS stand-in with no scheduler behind it): clear errors, never a bare 500."""
    import json

    import nats.errors
    from aiohttp.test_utils import TestClient, TestServer

    from draftwire.services.gateway.service import Gateway, make_app
    from draftwire.shared.core.protocol import TargetInfo

    class NoScheduler:
        async def request(self, subject, payload, timeout):
            if subject.endswith("verifier.info"):
                return type("Msg", (), {"data": TargetInfo("m", 10, (0,), 100).encode()})()
            raise nats.errors.NoRespondersError

        async def subscribe(self, subject, cb):
            return type("Sub", (), {"unsubscribe": staticmethod(lambda: _none())})()

        async def publish(self, subject, payload):
            pass

        async def flush(self, timeout=None):
            pass

    async with TestClient(TestServer(make_app(Gateway(NoScheduler(), "", None, 5.0)))) as client:
        plain = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT})
        assert plain.status == 503 and (await plain.json())["error"]["code"] == "no_scheduler"
        streamed = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True})
        events = [line for line in (await streamed.text()).split("\n\n") if line]
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "no_scheduler"
        assert events[-1] == "data: [DONE]"
        bad = await client.post("/v1/chat/completions", data=b"{not json")
        assert bad.status == 400 and (await bad.json())["error"]["type"] == "invalid_request_error"


async def _none():
    return None
