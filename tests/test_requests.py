"""The public request contract: formats, defaults, every way a request can be wrong, and the job codec."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.params import SamplingParams, SpecParams
from shared.core.prompt_request import (
    MAX_PROMPT_BYTES,
    GenerateJob,
    PromptRequest,
    RequestError,
    encode_reply,
    error_body,
    guess_format,
    parse_prompt,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _json(**fields) -> bytes:
    return json.dumps(fields).encode()


def _err(data: bytes, headers=None) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_prompt(data, headers)
    return info.value


# --- formats ----------------------------------------------------------------------------------------------


def test_plain_text_is_the_prompt_with_all_defaults():
    req, fmt = parse_prompt("héllo {world}\n".encode(), None, new_id=lambda: "gen1")
    assert fmt == "text"
    assert req == PromptRequest(prompt="héllo {world}\n", id="gen1")
    assert (req.max_new_tokens, req.min_new_tokens, req.temperature, req.top_p) == (128, 0, 0.0, 1.0)
    assert (req.seed, req.mode, req.gamma, req.k, req.stream) == (None, "auto", None, None, False)


def test_generated_ids_are_unique_tokens():
    a, _ = parse_prompt(b"x")
    b, _ = parse_prompt(b"x")
    assert a.id != b.id and "." not in a.id and a.id.isalnum()


@pytest.mark.parametrize("body", [b"{not json", b"{", b'{"a": 1', b"[1, 2]", b'"quoted"', b"  {} trailing"])
def test_text_that_is_not_a_json_object_stays_text(body):
    req, fmt = parse_prompt(body)
    assert fmt == "text" and req.prompt == body.decode()


def test_json_object_with_every_field():
    body = _json(
        prompt="def f():",
        id="req-1",
        max_new_tokens=64,
        min_new_tokens=8,
        temperature=0.7,
        top_p=0.9,
        seed=42,
        mode="full",
        gamma=6,
        k=16,
        stream=True,
    )
    req, fmt = parse_prompt(b"\n  " + body)
    assert fmt == "json"
    assert req == PromptRequest("def f():", "req-1", 64, 8, 0.7, 0.9, 42, "full", 6, 16, True)


def test_msgpack_map_is_recognised():
    req, fmt = parse_prompt(msgpack.packb({"prompt": "hi", "temperature": 1, "id": "m1"}))
    assert fmt == "msgpack" and req.prompt == "hi" and req.id == "m1"
    assert req.temperature == 1.0 and isinstance(req.temperature, float)


def test_null_means_not_given_for_optional_fields_only():
    req, _ = parse_prompt(_json(prompt="x", id=None, seed=None, mode=None, gamma=None, k=None))
    assert (req.seed, req.mode, req.gamma, req.k) == (None, "auto", None, None) and req.id
    assert _err(_json(prompt="x", temperature=None)).code == "bad_param"
    assert _err(_json(prompt=None)).code == "bad_param"


# --- Content-Type -----------------------------------------------------------------------------------------


def test_content_type_wins_over_sniffing():
    body = _json(prompt="x")
    req, fmt = parse_prompt(body, {"Content-Type": "text/plain"})
    assert fmt == "text" and req.prompt == body.decode()
    req, fmt = parse_prompt(body, {"content-type": "Application/JSON; charset=utf-8"})
    assert fmt == "json" and req.prompt == "x"
    req, fmt = parse_prompt(msgpack.packb({"prompt": "y"}), {"CONTENT-TYPE": "application/x-msgpack"})
    assert fmt == "msgpack" and req.prompt == "y"
    req, fmt = parse_prompt(msgpack.packb({"prompt": "y"}), {"Content-Type": "application/msgpack"})
    assert fmt == "msgpack"


def test_content_type_mismatch_and_unsupported_types_are_errors():
    err = _err(_json(prompt="x"), {"Content-Type": "application/msgpack"})
    assert err.code == "bad_encoding" and err.format == "msgpack"
    err = _err(msgpack.packb({"prompt": "x"}), {"Content-Type": "application/json"})
    assert err.code == "bad_encoding" and err.format == "json"
    err = _err(b"x", {"Content-Type": "application/xml"})
    assert err.code == "bad_encoding" and "application/xml" in str(err) and "application/json" in str(err)
    assert _err(b"[1]", {"Content-Type": "application/json"}).code == "bad_request"
    assert _err(msgpack.packb([1]), {"Content-Type": "application/msgpack"}).code == "bad_request"


def test_other_headers_do_not_matter():
    req, fmt = parse_prompt(b"hi", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    assert fmt == "text" and req.prompt == "hi"


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", "64"),
        ("max_new_tokens", 64.0),
        ("max_new_tokens", True),
        ("min_new_tokens", False),
        ("temperature", "0.5"),
        ("temperature", True),
        ("top_p", [1]),
        ("seed", 1.5),
        ("seed", "7"),
        ("seed", True),
        ("mode", 3),
        ("gamma", 4.0),
        ("gamma", False),
        ("k", "8"),
        ("stream", 1),
        ("stream", "true"),
        ("id", 5),
        ("prompt", 5),
        ("prompt", ["a"]),
        ("prompt", ""),
    ],
)
def test_wrong_types_are_bad_param(field, value):
    body = {"prompt": "x", field: value}
    for data in (json.dumps(body).encode(), msgpack.packb(body)):
        err = _err(data)
        assert err.code == "bad_param", (data, err)
        assert field in str(err)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
        ("max_new_tokens", 1 << 21),
        ("min_new_tokens", -1),
        ("seed", -1),
        ("seed", 2**63),
        ("gamma", 0),
        ("gamma", 65),
        ("k", 0),
        ("mode", "fast"),
        ("mode", "AUTO"),
        ("temperature", 10**400),
    ],
)
def test_out_of_range_values_are_bad_param(field, value):
    err = _err(_json(prompt="x", **{field: value}))
    assert err.code == "bad_param" and field in str(err)


def test_non_finite_numbers_and_min_over_max_are_bad_param():
    assert _err(b'{"prompt": "x", "temperature": NaN}').code == "bad_param"
    assert _err(b'{"prompt": "x", "top_p": Infinity}').code == "bad_param"
    assert _err(msgpack.packb({"prompt": "x", "temperature": math.inf})).code == "bad_param"
    err = _err(_json(prompt="x", min_new_tokens=10, max_new_tokens=5))
    assert err.code == "bad_param" and "min_new_tokens" in str(err)


@pytest.mark.parametrize("rid", ["a.b", "a b", "a*", ">", "", "tab\there", "x" * 300])
def test_ids_must_be_subject_tokens(rid):
    err = _err(_json(prompt="x", id=rid))
    assert err.code == "bad_param" and "id" in str(err) and err.request_id is None


def test_unknown_fields_are_named():
    err = _err(_json(prompt="x", tempreature=0.5, max_tokens=3))
    assert err.code == "bad_request"
    assert "'max_tokens'" in str(err) and "'tempreature'" in str(err) and "temperature" in str(err)
    assert _err(msgpack.packb({"prompt": "x", 1: 2}, strict_types=False)).code == "bad_request"


def test_missing_prompt_is_bad_request():
    assert _err(_json(id="x")).code == "bad_request"
    assert _err(b"{}").code == "bad_request"
    assert _err(msgpack.packb({})).code == "bad_request"


@pytest.mark.parametrize(
    "data, headers",
    [
        (b"\xff\xfe garbage", None),
        (b"", None),
        (b"\xc1", None),
        (msgpack.packb([1, 2, 3]), None),
        (b'{"prompt": "\xff"}', None),
        (b"\xff", {"Content-Type": "text/plain"}),
    ],
)
def test_undecodable_bodies(data, headers):
    err = _err(data, headers)
    assert err.code in ("bad_encoding", "bad_param"), err
    assert err.format in ("text", "json", "msgpack")


def test_empty_body_and_lone_surrogates():
    assert _err(b"").code == "bad_param"
    assert _err(b'{"prompt": "\\ud800"}').code == "bad_encoding"
    assert _err(b'{"prompt": "x", "id": "\\udfff"}').code == "bad_encoding"


def test_oversize_prompts():
    big = "a" * (MAX_PROMPT_BYTES + 1)
    for data in (big.encode(), _json(prompt=big), msgpack.packb({"prompt": big}), b"x" * 2_000_000):
        assert _err(data).code == "oversize"
    assert _err(big.encode(), {"Content-Type": "text/plain"}).code == "oversize"
    assert _err(_json(prompt="é" * (MAX_PROMPT_BYTES // 2 + 1))).code == "oversize"  # bytes, not characters
    req, _ = parse_prompt(_json(prompt="a" * MAX_PROMPT_BYTES))
    assert len(req.prompt) == MAX_PROMPT_BYTES


def test_errors_carry_id_and_format_when_known():
    err = _err(_json(id="abc", prompt="x", top_p=7))
    assert (err.code, err.request_id, err.format) == ("bad_param", "abc", "json")
    err = _err(msgpack.packb({"id": "m", "prompt": "x", "bogus": 1}))
    assert (err.code, err.request_id, err.format) == ("bad_request", None, "msgpack")
    err = _err(msgpack.packb({"id": "m", "prompt": ""}))
    assert (err.request_id, err.format) == ("m", "msgpack")
    assert _err(b"\xff").format == "text"


def test_deeply_nested_json_is_handled():
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _err(deep, {"Content-Type": "application/json"}).code == "bad_encoding"
    _, fmt = parse_prompt(deep)  # does not parse as a JSON object, so by the sniffing rules it is text
    assert fmt == "text"


def test_guess_format():
    assert guess_format(msgpack.packb({"a": 1})) == "msgpack"
    assert guess_format(b' {"a"') == "json"
    assert guess_format(b"hello") == "text"
    assert guess_format(b"hello", {"content-type": "application/msgpack"}) == "msgpack"


@FAST
@given(st.binary(max_size=512))
def test_parse_prompt_raises_only_request_error(data):
    try:
        req, fmt = parse_prompt(data)
    except RequestError as exc:
        assert exc.code and str(exc) and exc.format in ("text", "json", "msgpack")
    else:
        assert fmt in ("text", "json", "msgpack") and req.prompt


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_FIELDS = st.sampled_from(
    [
        "prompt",
        "id",
        "max_new_tokens",
        "min_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "mode",
        "gamma",
        "k",
        "stream",
        "other",
    ]
)


@FAST
@given(st.dictionaries(_FIELDS, _JSONISH, max_size=6), st.booleans())
def test_structured_garbage_raises_only_request_error(body, as_msgpack):
    data = msgpack.packb(body) if as_msgpack else json.dumps(body).encode()
    try:
        parse_prompt(data)
    except RequestError:
        pass


# --- GenerateJob ------------------------------------------------------------------------------------------


def _job(**kw) -> GenerateJob:
    base = {
        "id": "j1",
        "prompt": "hello",
        "params": SamplingParams(temperature=0.5, seed=3, max_new_tokens=9),
        "spec": SpecParams(mode="full", gamma=5, k=3),
        "stream": True,
        "format": "msgpack",
    }
    return GenerateJob(**{**base, **kw})


def test_job_round_trip():
    job = _job()
    assert GenerateJob.decode(job.encode()) == job
    raw = msgpack.unpackb(job.encode())
    assert set(raw) == {"id", "prompt", "params", "spec", "stream", "format"}
    assert raw["params"]["seed"] == 3 and raw["spec"]["mode"] == "full"
    assert GenerateJob.decode(_job(format="text", stream=False).encode()).format == "text"


def _raw(**kw) -> bytes:
    raw = msgpack.unpackb(_job().encode())
    raw.update(kw)
    return msgpack.packb({k: v for k, v in raw.items() if v is not ...})


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "bad_encoding"),
        (b"\xc1\xff garbage", "bad_encoding"),
        (msgpack.packb([1, 2]), "bad_request"),
        (msgpack.packb({"v": 1, "t": "vr", "s": 5}), "bad_request"),
        (_raw(id=...), "bad_request"),
        (_raw(extra=1), "bad_request"),
        (_raw(id="a.b"), "bad_request"),
        (_raw(id=7), "bad_request"),
        (_raw(prompt=""), "bad_request"),
        (_raw(prompt=b"bytes"), "bad_request"),
        (_raw(stream=1), "bad_request"),
        (_raw(format="xml"), "bad_request"),
        (_raw(params=[]), "bad_request"),
        (_raw(params={"temperature": -1}), "bad_param"),
        (_raw(params={"bogus": 1}), "bad_request"),
        (_raw(spec={"mode": "nope"}), "bad_param"),
        (_raw(spec={"gamma": "4"}), "bad_param"),
        (b"\x00" * 400_000, "oversize"),
    ],
)
def test_job_decode_rejects_malformed(data, code):
    with pytest.raises(RequestError) as info:
        GenerateJob.decode(data)
    assert info.value.code == code, info.value


@FAST
@given(st.binary(max_size=512))
def test_job_decode_raises_only_request_error_on_bytes(data):
    try:
        GenerateJob.decode(data)
    except RequestError as exc:
        assert exc.code


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["id", "prompt", "params", "spec", "stream", "format", "x"]),
        _JSONISH
        | st.dictionaries(st.sampled_from(["temperature", "seed", "mode", "gamma", "quant"]), _JSONISH),
        max_size=7,
    )
)
def test_job_decode_raises_only_request_error_on_maps(obj):
    try:
        GenerateJob.decode(msgpack.packb(obj))
    except RequestError:
        pass


# --- replies ----------------------------------------------------------------------------------------------


def test_error_body_and_reply_encodings():
    assert error_body("timeout", "slow") == {"error": {"code": "timeout", "message": "slow"}}
    assert error_body("timeout", "slow", "r1")["id"] == "r1"
    body = {
        "id": "r",
        "text": "héllo",
        "token_ids": [1, 2],
        "stats": {"acceptance_rate": math.nan, "b": b"x"},
    }
    for fmt in ("json", "text"):
        out = json.loads(encode_reply(body, fmt))
        assert out["text"] == "héllo" and out["stats"] == {"acceptance_rate": None, "b": "x"}
    assert msgpack.unpackb(encode_reply(body, "msgpack"))["token_ids"] == [1, 2]
    assert json.loads(encode_reply({"text": "\ud800"}, "json"))["text"] == "?"
