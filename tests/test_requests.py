"""The public request contract: formats, defaults, every way a request can be wrong, and the job codec."""

from __future__ import annotations

import contextlib
import json
import math

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.prompt_request import (
    MAX_JOB_BYTES,
    MAX_PROMPT_BYTES,
    REQUEST_FIELDS,
    GenerateJob,
    JobRecord,
    PromptRequest,
    RequestError,
    build_job,
    encode_reply,
    error_body,
    guess_format,
    parse_prompt,
    request_timeout,
    resolve_sampling,
    resolve_spec,
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


@pytest.mark.parametrize("body", [b"[1, 2]", b'"quoted"', b"plain { braces } later"])
def test_text_that_is_not_a_json_object_stays_text(body):
    req, fmt = parse_prompt(body)
    assert fmt == "text" and req.prompt == body.decode()


@pytest.mark.parametrize("body", [b"{not json", b"{", b'{"a": 1', b"  {} trailing"])
def test_a_body_that_starts_like_json_but_does_not_parse_is_an_error_unless_sent_as_text(body):
    with pytest.raises(RequestError) as err:
        parse_prompt(body)
    assert err.value.code == "bad_encoding" and "text/plain" in str(err.value)
    req, fmt = parse_prompt(body, {"Content-Type": "text/plain"})
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
    assert _err(deep).code == "bad_encoding"  # sniffed: it starts like JSON, so it must parse


def test_guess_format():
    assert guess_format(msgpack.packb({"a": 1})) == "msgpack"
    assert guess_format(b' {"a"') == "json"
    assert guess_format(b"hello") == "text"
    assert guess_format(b"hello", {"content-type": "application/msgpack"}) == "msgpack"


def _only_request_error(call, *args):
    """Garbage in must come out as RequestError; any other exception type fails the test as it is."""
    try:
        return call(*args)
    except RequestError as exc:
        assert exc.code and str(exc), exc
        return None


@FAST
@given(st.binary(max_size=512))
def test_parse_prompt_raises_only_request_error(data):
    parsed = _only_request_error(parse_prompt, data)
    if parsed is not None:
        req, fmt = parsed
        assert fmt in ("text", "json", "msgpack") and req.prompt


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
# Values near each field's valid range as well as junk, so the fuzz reaches the range checks and build_job.
_EDGE_VALUES = [
    "", "x", "auto", "ar", "full", "dssd", "fixed", "adaptive", "confidence", "AUTO", "a.b", "a" * 300,
    -1, 0, 1, 2, 4, 64, 65, 1 << 20, (1 << 20) + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63),
    10**400, 0.0, 0.5, 1.0, 1.5, -0.5, 1e9, 1e300, math.inf, -math.inf, math.nan, True, False, None, [], {},
]


def _encodings(obj) -> list[bytes]:
    """JSON and msgpack, each where it can carry the values (JSON: no bytes; msgpack: ints up to 64 bits)."""
    out = []
    with contextlib.suppress(TypeError):
        out.append(json.dumps(obj).encode())
    with contextlib.suppress(OverflowError):
        out.append(msgpack.packb(obj))
    return out
_PLAUSIBLE = st.sampled_from(_EDGE_VALUES)
_FIELDS = st.sampled_from([*REQUEST_FIELDS, "other"])


@FAST
@given(st.dictionaries(_FIELDS, _PLAUSIBLE | _JSONISH, max_size=4), st.booleans(), st.booleans())
def test_structured_garbage_raises_only_request_error_and_accepted_requests_build_valid_jobs(
    fields, on_a_valid_request, as_msgpack
):
    # on top of a valid request, one or two odd fields reach the range checks instead of failing early
    body = {"prompt": "hi", **fields} if on_a_valid_request else fields
    encodings = _encodings(body)
    data = encodings[-1] if as_msgpack else encodings[0]
    parsed = _only_request_error(parse_prompt, data)
    if parsed is None:
        return
    req, fmt = parsed
    # an accepted request must run: the scheduler builds its job without another check
    job = build_job(req, fmt, SpecParams(), now=1000.0, max_timeout=600.0)
    assert GenerateJob.decode(job.encode()) == job and 1000.0 < job.deadline <= 1600.0


@pytest.mark.parametrize("field", [*REQUEST_FIELDS, "other"])
def test_every_edge_value_in_every_field_of_a_valid_request(field):
    # exhaustive where the random fuzz is thin: one field of a good request set to each edge value
    for value in _EDGE_VALUES:
        for data in _encodings({"prompt": "hi", field: value}):
            parsed = _only_request_error(parse_prompt, data)
            if parsed is not None:
                job = build_job(*parsed, SpecParams(), now=0.0, max_timeout=600.0)
                assert GenerateJob.decode(job.encode()) == job, (field, value)


def test_an_empty_policy_is_refused_not_passed_on():
    # found by the fuzz above: "" slipped past `policy or DEFAULT_POLICY` and failed later in build_job
    assert _err(_json(prompt="x", policy="")).code == "bad_param"


def test_json_must_be_utf8_even_when_sniffed():
    # json.loads(bytes) also reads UTF-16: such a body is not taken as JSON; it starts like JSON, so it is an
    # error (as text/plain it is a NUL-laden prompt)
    utf16 = '{"prompt": "hi"}'.encode("utf-16-le")
    assert _err(utf16).code == "bad_encoding"
    req, fmt = parse_prompt(utf16, {"Content-Type": "text/plain"})
    assert fmt == "text" and req.prompt == utf16.decode("utf-8")
    assert _err(utf16, {"Content-Type": "application/json"}).code == "bad_encoding"


# --- timeout_s --------------------------------------------------------------------------------------------


def test_timeout_s_is_a_positive_number_clamped_to_the_cap():
    req, _ = parse_prompt(_json(prompt="x", timeout_s=2))
    assert req.timeout_s == 2.0 and isinstance(req.timeout_s, float)
    assert parse_prompt(_json(prompt="x", timeout_s=None))[0].timeout_s is None
    for bad in (0, -1, "5", True, [1]):
        err = _err(_json(prompt="x", timeout_s=bad))
        assert err.code == "bad_param" and "timeout_s" in str(err), bad
    assert _err(b'{"prompt": "x", "timeout_s": Infinity}').code == "bad_param"
    assert _err(b'{"prompt": "x", "timeout_s": NaN}').code == "bad_param"
    assert request_timeout(PromptRequest("p", "i"), 600.0) == 600.0
    assert request_timeout(PromptRequest("p", "i", timeout_s=5.0), 600.0) == 5.0
    assert request_timeout(PromptRequest("p", "i", timeout_s=1e9), 600.0) == 600.0


# --- request -> job ---------------------------------------------------------------------------------------


def test_build_job_resolves_defaults_and_sets_session_and_deadline():
    defaults = SpecParams(mode="full", gamma=6, k=3)
    assert resolve_spec(PromptRequest("p", "i"), defaults) == defaults
    explicit = PromptRequest("p", "i", mode="ar", gamma=2, k=40, seed=9, temperature=0.3)
    assert resolve_spec(explicit, defaults) == SpecParams(mode="ar", gamma=2, k=40)
    assert resolve_sampling(explicit).seed == 9 and resolve_sampling(explicit).temperature == 0.3
    assert len({resolve_sampling(PromptRequest("p", "i")).seed for _ in range(5)}) == 5, "no seed: fresh"
    job = build_job(PromptRequest("p", "i", stream=True, timeout_s=7.0), "msgpack", defaults, now=100.0,
                    max_timeout=60.0, draw_seed=lambda: 123, new_session=lambda: "s" * 32)
    assert (job.id, job.prompt, job.params.seed, job.spec, job.stream, job.format) == (
        "i", "p", 123, defaults, True, "msgpack"
    )
    assert (job.session, job.deadline) == ("s" * 32, 107.0)
    a, b = (build_job(PromptRequest("p", "i"), "text", defaults, now=0.0, max_timeout=60.0) for _ in range(2))
    assert a.session != b.session and len(a.session) == 16 and a.deadline == 60.0


def test_job_record_round_trip_and_strict_decode():
    record = JobRecord(_job(), "_INBOX.abc.1", 1_700_000_000.25)
    assert JobRecord.decode(record.encode()) == record
    assert JobRecord.decode(JobRecord(_job(), None, 5).encode()).reply is None
    for bad in (b"\xc1", msgpack.packb([1]), msgpack.packb({"job": b"x", "reply": None}),
                msgpack.packb({"job": "text", "reply": None, "accepted_at": 1.0}),
                msgpack.packb({"job": _job().encode(), "reply": 5, "accepted_at": 1.0}),
                msgpack.packb({"job": _job().encode(), "reply": None, "accepted_at": math.nan}),
                msgpack.packb({"job": b"garbage", "reply": None, "accepted_at": 1.0})):
        with pytest.raises(RequestError):
            JobRecord.decode(bad)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["job", "reply", "accepted_at", "x"]), _JSONISH | st.binary(max_size=40), max_size=4
    )
)
def test_job_record_decode_raises_only_request_error(obj):
    _only_request_error(JobRecord.decode, msgpack.packb(obj))


@FAST
@given(st.sampled_from(["job", "reply", "accepted_at"]), _JSONISH | _PLAUSIBLE | st.binary(max_size=8))
def test_job_record_with_one_field_replaced_raises_only_request_error(key, value):
    raw = msgpack.unpackb(JobRecord(_job(), "_INBOX.x", 1.0).encode())
    raw[key] = value
    for data in _encodings(raw)[-1:]:
        _only_request_error(JobRecord.decode, data)


# --- GenerateJob ------------------------------------------------------------------------------------------


def _job(**kw) -> GenerateJob:
    base = {
        "id": "j1",
        "prompt": "hello",
        "params": SamplingParams(temperature=0.5, seed=3, max_new_tokens=9),
        "spec": SpecParams(mode="full", gamma=5, k=3),
        "stream": True,
        "format": "msgpack",
        "session": "0123456789abcdef0123456789abcdef",
        "deadline": 1_700_000_000.5,
    }
    return GenerateJob(**{**base, **kw})


def test_job_round_trip():
    job = _job()
    assert GenerateJob.decode(job.encode()) == job
    raw = msgpack.unpackb(job.encode())
    assert set(raw) == {"id", "prompt", "params", "spec", "stream", "format", "session", "deadline", "resume"}
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
        (b"\x00" * (MAX_JOB_BYTES + 1), "oversize"),
    ],
)
def test_job_decode_rejects_malformed(data, code):
    with pytest.raises(RequestError) as info:
        GenerateJob.decode(data)
    assert info.value.code == code, info.value


@FAST
@given(st.binary(max_size=512))
def test_job_decode_raises_only_request_error_on_bytes(data):
    _only_request_error(GenerateJob.decode, data)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["id", "prompt", "params", "spec", "stream", "format", "session", "deadline", "resume",
                         "x"]),
        _JSONISH
        | _PLAUSIBLE
        | st.dictionaries(
            st.sampled_from(["temperature", "top_p", "seed", "max_new_tokens", "mode", "gamma", "k", "quant",
                             "policy", "confidence", "pipeline"]),
            _JSONISH | _PLAUSIBLE,
        ),
        max_size=9,
    )
)
def test_job_decode_raises_only_request_error_on_maps(obj):
    _only_request_error(GenerateJob.decode, _encodings(obj)[-1])


@FAST
@given(st.sampled_from(["id", "prompt", "params", "spec", "stream", "format", "session", "deadline", "resume"]),
       _JSONISH | _PLAUSIBLE | st.binary(max_size=8))
def test_job_decode_with_one_field_replaced_raises_only_request_error(key, value):
    raw = msgpack.unpackb(_job().encode())
    raw[key] = value
    encodings = _encodings(raw)
    assume(encodings)  # a job is msgpack: an int beyond 64 bits cannot even be sent
    _only_request_error(GenerateJob.decode, encodings[-1])


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


# --- chat and stop sequences --------------------------------------------------------------------------------


def test_a_chat_request_with_stop_strings_and_stop_token_ids():
    req, _ = parse_prompt(_json(messages=[{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "hi"}], stop="\n\n", stop_token_ids=[7]))
    assert (req.prompt, req.messages, req.stop, req.stop_token_ids) == (
        "", (("system", "be brief"), ("user", "hi")), ("\n\n",), (7,))
    assert parse_prompt(_json(prompt="x", stop=["a", "b"]))[0].stop == ("a", "b")


@pytest.mark.parametrize(("fields", "code", "words"), [
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "bad_request", "exactly one"),
    ({"messages": []}, "bad_param", "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "y"}]}, "bad_param", "role must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "bad_param", "content must be a string"),
    ({"messages": [{"role": "user", "content": "y", "extra": 1}]}, "bad_param", "'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_PROMPT_BYTES + 1)}]}, "oversize", "limit"),
    ({"prompt": "x", "stop": ["a"] * 5}, "bad_param", "at most 4"),
    ({"prompt": "x", "stop": ""}, "bad_param", "non-empty"),
    ({"prompt": "x", "stop": [1]}, "bad_param", "stop must be"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "bad_param", "token ids"),
    ({"prompt": "x", "stop_token_ids": "7"}, "bad_param", "token ids"),
])
def test_bad_chat_and_stop_fields_are_clear_errors(fields, code, words):
    err = _err(_json(**fields))
    assert err.code == code and words in str(err), str(err)


def test_a_chat_job_round_trips_and_a_malformed_one_is_refused():
    from draftwire.shared.core.params import SpecParams as Spec

    req, fmt = parse_prompt(_json(messages=[{"role": "user", "content": "hi"}], stop=["x"], stop_token_ids=[3]))
    job = build_job(req, fmt, Spec(), now=0.0, max_timeout=10.0)
    assert GenerateJob.decode(job.encode()) == job
    body = msgpack.unpackb(job.encode())
    for bad in ({"messages": [["wizard", "x"]]}, {"stop": [""]}, {"stop_token_ids": [-2]}):
        with pytest.raises(RequestError):
            GenerateJob.decode(msgpack.packb({**body, **bad}))
