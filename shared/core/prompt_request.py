"""The user-facing request contract on `draftwire.prompts`, and the job the scheduler hands a draft instance.

Pure functions and frozen dataclasses, no I/O: the scheduler parses and validates a prompt once, at the edge,
so every malformed request is answered with a `RequestError` whose `code` a client can branch on and whose
message names the offending field; a request `parse_prompt` accepts always builds a valid job. The draft
service decodes `GenerateJob`s with the same module. Only explicit checks raise: `parse_prompt`,
`GenerateJob.decode` and `JobRecord.decode` raise nothing but `RequestError` whatever bytes arrive, and the
fuzz tests fail on any other exception rather than a catch-all hiding it.
"""

from __future__ import annotations

import json
import math
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

import msgpack
import numpy as np

from draftwire.shared.core.params import (
    DEFAULT_MAX_NEW_TOKENS,
    MODES,
    ParamError,
    SamplingParams,
    SpecParams,
)
from draftwire.shared.core.subject_names import validate_token

MAX_PROMPT_BYTES = 256 * 1024
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4  # as OpenAI's `stop`
MAX_STOP_BYTES = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_BYTES = MAX_PROMPT_BYTES + 16 * 1024  # room for the other fields of a JSON/msgpack request
FORMATS = ("text", "json", "msgpack")
REQUEST_MODES = ("auto", *MODES)
REPLY_CONTENT_TYPES = {
    "text": "application/json",
    "json": "application/json",
    "msgpack": "application/msgpack",
}
_MEDIA_FORMATS = {
    "text/plain": "text",
    "application/json": "json",
    "application/msgpack": "msgpack",
    "application/x-msgpack": "msgpack",
}
_MSGPACK_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_JSON_WS = b" \t\r\n"


class RequestError(ValueError):
    """A request that cannot be served as sent; `code` is machine-readable, the message says what to fix.

    Codes: bad_request (structure: not an object, unknown or missing fields), bad_encoding (undecodable
    bytes or unsupported Content-Type), oversize, bad_param (a field has the wrong type or range).
    `request_id` and `format` are filled in when they were known before the error, so the error can be
    answered in the request's own format and published on its results subject.
    """

    def __init__(self, code: str, message: str, *, request_id: str | None = None, fmt: str | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.format = fmt


@dataclass(frozen=True)
class PromptRequest:
    """One validated prompt; None for gamma/k/seed means "scheduler's choice".

    Exactly one of `prompt` (raw completion text) and `messages` (a chat, OpenAI's role/content shape,
    rendered by the draft with the target's chat template) is given. `stop` strings end the generation where
    they appear in the decoded text (not included in the result, as OpenAI does); `stop_token_ids` end it
    after one of those tokens, like an end-of-sequence token.
    """

    prompt: str
    id: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    mode: str = "auto"
    gamma: int | None = None
    k: int | None = None
    stream: bool = False
    policy: str | None = None  # fixed | adaptive | confidence
    confidence: float | None = None
    pipeline: bool | None = None
    timeout_s: float | None = None  # seconds the request may take; clamped to the scheduler's cap
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


REQUEST_FIELDS = tuple(f.name for f in fields(PromptRequest))
# JSON null means "not given" for these only
_NULLABLE = frozenset({"id", "seed", "mode", "gamma", "k", "policy", "confidence", "pipeline", "timeout_s",
                       "messages", "stop", "stop_token_ids"})


def new_request_id() -> str:
    return uuid.uuid4().hex


# --- parsing ----------------------------------------------------------------------------------------------


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Header lookup that ignores case: NATS preserves whatever case the publisher used."""
    if not headers:
        return None
    low = name.lower()
    for k, v in headers.items():
        if k.lower() == low:
            return v
    return None


def format_from_headers(headers: Mapping[str, str] | None) -> str | None:
    """The format a Content-Type header names, None without one; RequestError for an unsupported type."""
    value = _header(headers, "Content-Type")
    if value is None:
        return None
    media = value.split(";", 1)[0].strip().lower()
    if media not in _MEDIA_FORMATS:
        supported = ", ".join(_MEDIA_FORMATS)
        raise RequestError("bad_encoding", f"unsupported Content-Type {value!r}; use one of {supported}")
    return _MEDIA_FORMATS[media]


def guess_format(data: bytes, headers: Mapping[str, str] | None = None) -> str:
    """A cheap best guess of the reply format, without decoding (for errors such as `oversize`)."""
    try:
        if fmt := format_from_headers(headers):
            return fmt
    except RequestError:
        pass
    if data[:1] and data[0] in _MSGPACK_MAP_MARKERS:
        return "msgpack"
    return "json" if data.lstrip(_JSON_WS).startswith(b"{") else "text"


def _try_msgpack_map(data: bytes) -> dict | None:
    if not data or data[0] not in _MSGPACK_MAP_MARKERS:
        return None
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - msgpack raises a zoo (ExtraData, FormatError, UnicodeDecodeError)
        return None
    return obj if isinstance(obj, dict) else None


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            "bad_encoding",
            f"{what} is not valid UTF-8 (byte {exc.start}); send UTF-8 text, a JSON object or a msgpack map",
        ) from None


def _decode_body(data: bytes, fmt: str | None) -> tuple[object, str]:
    """(decoded payload, format): a str for text, anything for json/msgpack (checked by the caller)."""
    if fmt == "msgpack":
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False), fmt
        except Exception as exc:  # noqa: BLE001 - any msgpack failure is the sender's
            raise RequestError("bad_encoding", f"body is not valid msgpack: {exc}", fmt=fmt) from None
    if fmt == "json":
        try:
            return json.loads(_utf8(data, "JSON body")), fmt
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, RequestError):
                exc.format = fmt
                raise
            raise RequestError("bad_encoding", f"body is not valid JSON: {exc}", fmt=fmt) from None
    if fmt == "text":
        return _utf8(data, "text prompt"), fmt
    if (obj := _try_msgpack_map(data)) is not None:
        return obj, "msgpack"
    if data.lstrip(_JSON_WS).startswith(b"{"):
        try:  # decode first: json.loads(bytes) would also read UTF-16 and UTF-32
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            # a broken JSON request must not run as a prompt that happens to be JSON-looking text
            raise RequestError("bad_encoding", f"the body starts like a JSON object but is not valid JSON ({exc}); "
                               "send Content-Type: text/plain to mean it as a prompt", fmt="json") from None
        if isinstance(obj, dict):
            return obj, "json"
    return _utf8(data, "text prompt"), "text"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_type(name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise RequestError("bad_param", f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def _fields_from_object(obj: object, fmt: str) -> dict:
    """Type-check a decoded JSON object / msgpack map into PromptRequest keyword arguments."""
    kind = "JSON object" if fmt == "json" else "msgpack map"
    if not isinstance(obj, dict):
        raise RequestError("bad_request", f"a {fmt} request must be a {kind}, got {type(obj).__name__}")
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise RequestError("bad_request", f"field names must be strings, got {bad_keys[:3]!r}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(
            "bad_request",
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(REQUEST_FIELDS)}",
        )
    out = {k: v for k, v in obj.items() if not (v is None and k in _NULLABLE)}
    if ("prompt" in out) == ("messages" in out):
        raise RequestError("bad_request", "give exactly one of 'prompt' (a completion) and 'messages' (a chat)")
    if "messages" in out:
        out["messages"] = _messages(out["messages"])
        out["prompt"] = ""
    if "stop" in out:
        out["stop"] = _stop_strings(out["stop"])
    if "stop_token_ids" in out:
        ids = out["stop_token_ids"]
        _check_type("stop_token_ids", ids, isinstance(ids, list) and len(ids) <= MAX_STOP_TOKEN_IDS
                    and all(_is_int(t) and 0 <= t < 2**31 for t in ids),
                    f"a list of at most {MAX_STOP_TOKEN_IDS} token ids")
        out["stop_token_ids"] = tuple(ids)
    for name in ("max_new_tokens", "min_new_tokens", "seed", "gamma", "k"):
        if name in out:
            _check_type(name, out[name], _is_int(out[name]), "an integer")
    for name in ("temperature", "top_p", "confidence", "timeout_s"):
        if name in out:
            v = out[name]
            _check_type(name, v, isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
            try:
                out[name] = float(v)
            except OverflowError:
                raise RequestError("bad_param", f"{name} is out of range: {v}") from None
    for name in ("prompt", "id", "mode", "policy"):
        if name in out:
            _check_type(name, out[name], isinstance(out[name], str), "a string")
    for name in ("stream", "pipeline"):
        if name in out:
            _check_type(name, out[name], isinstance(out[name], bool), "true or false")
    return out


def _messages(value: object) -> tuple[tuple[str, str], ...]:
    """OpenAI's chat shape: a non-empty list of {"role": ..., "content": "..."} (string content only)."""
    if not isinstance(value, list) or not value:
        raise RequestError("bad_param", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not set(m) <= {"role", "content", "name"} or "role" not in m:
            raise RequestError("bad_param", f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m["role"], m.get("content")
        if role not in CHAT_ROLES:
            raise RequestError("bad_param", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RequestError("bad_param", f"messages[{i}].content must be a string")
        _check_encodable(f"messages[{i}].content", content)
        out.append((role, content))
    if (size := sum(len(c.encode("utf-8")) for _, c in out)) > MAX_PROMPT_BYTES:
        raise RequestError("oversize", f"messages are {size} bytes; the limit is {MAX_PROMPT_BYTES} bytes")
    return tuple(out)


def _stop_strings(value: object) -> tuple[str, ...]:
    """A string or a list of up to MAX_STOP_STRINGS non-empty strings (OpenAI's `stop`)."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(
            isinstance(x, str) and 0 < len(x.encode("utf-8", "surrogatepass")) <= MAX_STOP_BYTES for x in stops):
        raise RequestError("bad_param", f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty "
                                        f"strings of at most {MAX_STOP_BYTES} bytes")
    for x in stops:
        _check_encodable("stop", x)
    return tuple(stops)


def _check_encodable(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("bad_encoding", f"{name} contains unpaired UTF-16 surrogates") from None


def _validated(kw: dict, new_id: Callable[[], str]) -> PromptRequest:
    rid = kw.get("id")
    if rid is not None:
        _check_encodable("id", rid)
        try:
            validate_token(rid, "id")
        except ValueError as exc:
            raise RequestError("bad_param", str(exc)) from None
    prompt = kw["prompt"]
    if not prompt and not kw.get("messages"):
        raise RequestError("bad_param", "prompt must be a non-empty string")
    _check_encodable("prompt", prompt)
    if (size := len(prompt.encode("utf-8"))) > MAX_PROMPT_BYTES:
        raise RequestError("oversize", f"prompt is {size} bytes; the limit is {MAX_PROMPT_BYTES} bytes")
    mode = kw.get("mode", "auto")
    if mode not in REQUEST_MODES:
        raise RequestError("bad_param", f"mode must be one of {', '.join(REQUEST_MODES)}; got {mode!r}")
    timeout = kw.get("timeout_s")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise RequestError("bad_param", f"timeout_s must be a finite number of seconds > 0, got {timeout!r}")
    req = PromptRequest(**{**kw, "id": rid or new_id()})
    try:  # ranges are SamplingParams'/SpecParams' business: one set of rules and messages everywhere
        resolve_sampling(req, lambda: 0)
        resolve_spec(req, SpecParams())  # what build_job builds: an accepted request always runs
    except ParamError as exc:
        raise RequestError("bad_param", str(exc)) from None
    return req


def parse_prompt(
    data: bytes, headers: Mapping[str, str] | None = None, *, new_id: Callable[[], str] = new_request_id
) -> tuple[PromptRequest, str]:
    """Parse one `draftwire.prompts` payload into (request, format), format being "text"|"json"|"msgpack".

    A Content-Type header decides the format; without one it is sniffed: a valid msgpack map, else a JSON
    object (the body starts with `{`: it must then parse, or it is a `bad_encoding` error), else UTF-8 text
    that is the prompt itself.
    Raises RequestError (with `.format`, and `.request_id` once the id was read) on anything else.
    """
    data = bytes(data)
    try:
        return _parse(data, headers, new_id)
    except RequestError as exc:
        exc.format = exc.format or guess_format(data, headers)
        raise


def _parse(
    data: bytes, headers: Mapping[str, str] | None, new_id: Callable[[], str]
) -> tuple[PromptRequest, str]:
    fmt = format_from_headers(headers)
    limit = MAX_PROMPT_BYTES if fmt == "text" else MAX_REQUEST_BYTES
    if len(data) > limit:
        message = f"request is {len(data)} bytes; the limit is {limit} bytes"
        raise RequestError("oversize", message, fmt=guess_format(data, headers))
    obj, fmt = _decode_body(data, fmt)
    rid = None
    try:
        if fmt == "text":
            if len(data) > MAX_PROMPT_BYTES:
                message = f"prompt is {len(data)} bytes; the limit is {MAX_PROMPT_BYTES} bytes"
                raise RequestError("oversize", message)
            kw = {"prompt": obj}
        else:
            kw = _fields_from_object(obj, fmt)
            if isinstance(kw.get("id"), str) and _valid_token(kw["id"]):
                rid = kw["id"]
        return _validated(kw, new_id), fmt
    except RequestError as exc:
        exc.format = fmt
        exc.request_id = exc.request_id or rid
        raise


def _valid_token(value: str) -> bool:
    try:
        validate_token(value)
        value.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return True


# --- the scheduler -> draft job ---------------------------------------------------------------------------

_JOB_KEYS = frozenset({"id", "prompt", "params", "spec", "stream", "format", "session", "deadline", "resume"})
_JOB_OPTIONAL_KEYS = frozenset({"verifier", "tenant", "messages", "stop", "stop_token_ids"})
MAX_RESUME_TOKENS = 1 << 18  # a resumed job's generated tokens travel as 4 bytes each
MAX_JOB_BYTES = MAX_REQUEST_BYTES + 4 * MAX_RESUME_TOKENS


@dataclass(frozen=True)
class GenerateJob:
    """What a draft instance needs to run one generation, with every scheduler default already resolved."""

    id: str
    prompt: str
    params: SamplingParams
    spec: SpecParams
    stream: bool = False
    format: str = "json"
    session: str = ""  # the generation's own id (never the user's `id`): keys the verifier's KV cache
    deadline: float = 0.0  # unix seconds after which the work stops with `deadline_exceeded`; 0 = none
    # Tokens an earlier run of this session already committed (its draft died): the next run continues after
    # them instead of starting over. Seeded per position, the continuation is the one the lost run would have
    # made (greedy always; sampled whenever the draft length does not depend on timing).
    resume: tuple[int, ...] = ()
    # The verifier instance the scheduler placed the session on (the least loaded it saw); the draft uses it
    # while it is alive. Encoded only when set, and only sent to drafts that serve their own start subject.
    verifier: str | None = None
    # Who sent it: the client identity whose own subjects (`prompts.<tenant>`) it came in on; its results and
    # stream go to that tenant's subjects only. "" = the shared subjects of an unsecured deployment.
    tenant: str = ""
    messages: tuple[tuple[str, str], ...] | None = None  # a chat: the draft renders it (then `prompt` is "")
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def encode(self) -> bytes:
        body = {
            "id": self.id,
            "prompt": self.prompt,
            "params": asdict(self.params),
            "spec": asdict(self.spec),
            "stream": self.stream,
            "format": self.format,
            "session": self.session,
            "deadline": self.deadline,
            "resume": np.asarray(self.resume, dtype="<u4").tobytes(),
        }
        if self.verifier is not None:
            body["verifier"] = self.verifier
        if self.tenant:
            body["tenant"] = self.tenant
        if self.messages is not None:
            body["messages"] = [list(m) for m in self.messages]
        if self.stop:
            body["stop"] = list(self.stop)
        if self.stop_token_ids:
            body["stop_token_ids"] = list(self.stop_token_ids)
        return msgpack.packb(body)

    @classmethod
    def decode(cls, data: bytes) -> GenerateJob:
        """Strict decode; RequestError (never another exception type) on anything malformed."""
        return _decode_job(data)


def _decode_job(data: bytes) -> GenerateJob:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RequestError("bad_request", f"a job must be bytes, got {type(data).__name__}")
    if len(data) > MAX_JOB_BYTES:
        raise RequestError("oversize", f"job is {len(data)} bytes; the limit is {MAX_JOB_BYTES}")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - any msgpack failure is the sender's
        raise RequestError("bad_encoding", f"job is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise RequestError("bad_request", f"a job must be a msgpack map, got {type(obj).__name__}")
    if set(obj) - _JOB_OPTIONAL_KEYS != _JOB_KEYS:
        missing, extra = _JOB_KEYS - set(obj), set(obj) - _JOB_KEYS - _JOB_OPTIONAL_KEYS
        message = f"job fields: missing {sorted(missing)}, unknown {sorted(map(str, extra))}"
        raise RequestError("bad_request", message)
    rid, prompt, stream, fmt = obj["id"], obj["prompt"], obj["stream"], obj["format"]
    if not isinstance(rid, str) or not _valid_token(rid):
        raise RequestError("bad_request", f"job id must be a valid NATS token, got {rid!r}")
    messages = obj.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, list) and len(m) == 2 and m[0] in CHAT_ROLES and isinstance(m[1], str) for m in messages):
            raise RequestError("bad_request", "job messages must be [role, content] pairs", request_id=rid)
        messages = tuple((m[0], m[1]) for m in messages)
    if not isinstance(prompt, str) or not (prompt or messages):
        raise RequestError("bad_request", "job prompt must be a non-empty string", request_id=rid)
    stop, stop_ids = obj.get("stop", []), obj.get("stop_token_ids", [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(x, str) and x for x in stop):
        raise RequestError("bad_request", "job stop must be a list of non-empty strings", request_id=rid)
    if not isinstance(stop_ids, list) or len(stop_ids) > MAX_STOP_TOKEN_IDS or not all(
            _is_int(t) and 0 <= t < 2**31 for t in stop_ids):
        raise RequestError("bad_request", "job stop_token_ids must be token ids", request_id=rid)
    if not isinstance(stream, bool) or fmt not in FORMATS:
        raise RequestError("bad_request", f"job stream/format invalid: {stream!r}, {fmt!r}", request_id=rid)
    session, deadline = obj["session"], obj["deadline"]
    if not isinstance(session, str) or not _valid_token(session):
        message = f"job session must be a valid NATS token, got {session!r}"
        raise RequestError("bad_request", message, request_id=rid)
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline) \
            or deadline < 0:
        message = f"job deadline must be unix seconds >= 0, got {deadline!r}"
        raise RequestError("bad_request", message, request_id=rid)
    params, spec = _params(SamplingParams, obj["params"], rid), _params(SpecParams, obj["spec"], rid)
    resume = obj["resume"]
    if not isinstance(resume, bytes) or len(resume) % 4:
        raise RequestError("bad_request", "job resume must be little-endian uint32 token ids", request_id=rid)
    if len(resume) // 4 > params.max_new_tokens:
        message = f"job resumes {len(resume) // 4} tokens, more than max_new_tokens {params.max_new_tokens}"
        raise RequestError("bad_request", message, request_id=rid)
    resume_ids = tuple(int(t) for t in np.frombuffer(resume, dtype="<u4"))
    verifier = obj.get("verifier")
    if verifier is not None and (not isinstance(verifier, str) or not _valid_token(verifier)):
        message = f"job verifier must be a valid NATS token, got {verifier!r}"
        raise RequestError("bad_request", message, request_id=rid)
    tenant = obj.get("tenant", "")
    if not isinstance(tenant, str) or (tenant and not _valid_token(tenant)):
        raise RequestError("bad_request", f"job tenant must be a valid NATS token, got {tenant!r}", request_id=rid)
    return GenerateJob(rid, prompt, params, spec, stream, fmt, session, float(deadline), resume_ids, verifier,
                       tenant, messages, tuple(stop), tuple(stop_ids))


def _params(cls, value: object, rid: str):
    names = {f.name for f in fields(cls)}
    if not isinstance(value, dict) or not set(value) <= names:
        raise RequestError(
            "bad_request", f"job {cls.__name__} must be a map with keys from {sorted(names)}", request_id=rid
        )
    try:
        return cls(**value)
    except ParamError as exc:
        raise RequestError("bad_param", str(exc), request_id=rid) from None


# --- request -> job (the scheduler's policy) ----------------------------------------------------------------


def fresh_seed() -> int:
    return secrets.randbelow(2**63)


SESSION_ID_HEX = 16  # 64 random bits: no collision among live sessions, and it crosses the radio link every round


def new_session_id() -> str:
    return secrets.token_hex(SESSION_ID_HEX // 2)


def resolve_spec(req: PromptRequest, defaults: SpecParams) -> SpecParams:
    """Mode `auto` and unset gamma/k/policy/pipeline take the scheduler's defaults; request values win."""
    return SpecParams(
        mode=defaults.mode if req.mode == "auto" else req.mode,
        gamma=defaults.gamma if req.gamma is None else req.gamma,
        k=defaults.k if req.k is None else req.k,
        quant=defaults.quant,
        policy=defaults.policy if req.policy is None else req.policy,
        confidence=defaults.confidence if req.confidence is None else req.confidence,
        pipeline=defaults.pipeline if req.pipeline is None else req.pipeline,
    )


def resolve_sampling(req: PromptRequest, draw_seed: Callable[[], int] = fresh_seed) -> SamplingParams:
    """No seed means a fresh random one; the draft reports it in the stats, so any sample can be replayed."""
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        seed=draw_seed() if req.seed is None else req.seed,
        min_new_tokens=req.min_new_tokens,
        max_new_tokens=req.max_new_tokens,
    )


def request_timeout(req: PromptRequest, cap: float) -> float:
    """The request's `timeout_s`, or the cap when it has none or asks for more (clamped, not refused)."""
    return cap if req.timeout_s is None else min(req.timeout_s, cap)


def build_job(
    req: PromptRequest,
    fmt: str,
    defaults: SpecParams,
    *,
    now: float,
    max_timeout: float,
    draw_seed: Callable[[], int] = fresh_seed,
    new_session: Callable[[], str] = new_session_id,
    tenant: str = "",
) -> GenerateJob:
    """The job for an accepted request: a fresh session id and an absolute deadline (unix seconds); `tenant`
    is the client identity the request came from (its subject says, not its body)."""
    return GenerateJob(
        id=req.id,
        prompt=req.prompt,
        params=resolve_sampling(req, draw_seed),
        spec=resolve_spec(req, defaults),
        stream=req.stream,
        format=fmt,
        session=new_session(),
        deadline=now + request_timeout(req, max_timeout),
        tenant=tenant,
        messages=req.messages,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
    )


_RECORD_KEYS = frozenset({"job", "reply", "accepted_at"})


@dataclass(frozen=True)
class JobRecord:
    """An accepted job as the jobs stream keeps it: all a replacement scheduler needs to answer it.

    The job carries the session id, the deadline and the reply format; `reply` is the requester's reply
    subject (None for fire-and-forget), `accepted_at` the unix time the job was stored.
    """

    job: GenerateJob
    reply: str | None
    accepted_at: float

    def encode(self) -> bytes:
        return msgpack.packb({"job": self.job.encode(), "reply": self.reply, "accepted_at": self.accepted_at})

    @classmethod
    def decode(cls, data: bytes) -> JobRecord:
        """Strict decode; RequestError (never another exception type) on anything malformed."""
        try:
            obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
        except Exception as exc:  # noqa: BLE001 - msgpack raises a zoo (ExtraData, FormatError, ...)
            message = f"job record is not valid msgpack: {type(exc).__name__}"
            raise RequestError("bad_encoding", message) from None
        if not isinstance(obj, dict) or set(obj) != _RECORD_KEYS:
            raise RequestError("bad_request", "a job record must be a msgpack map of job, reply, accepted_at")
        job, reply, at = obj["job"], obj["reply"], obj["accepted_at"]
        if not isinstance(job, bytes):
            raise RequestError("bad_request", f"job record: job must be bytes, got {type(job).__name__}")
        if reply is not None and not (isinstance(reply, str) and reply):
            raise RequestError("bad_request", f"job record: reply must be a subject or nil, got {reply!r}")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            raise RequestError("bad_request", f"job record: accepted_at must be unix seconds, got {at!r}")
        return cls(GenerateJob.decode(job), reply, float(at))


# --- replies ----------------------------------------------------------------------------------------------


def error_body(code: str, message: str, request_id: str | None = None) -> dict:
    """The one error shape every reply subject carries."""
    body: dict = {"error": {"code": code, "message": message}}
    if request_id is not None:
        body["id"] = request_id
    return body


def _jsonable(obj: object) -> object:
    """Make a draft result strict JSON: non-finite floats become null, bytes become text."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).decode("utf-8", "replace")
    return obj


def encode_reply(body: dict, fmt: str) -> bytes:
    """A result or error in the request's own format: msgpack for msgpack requests, JSON otherwise."""
    if fmt == "msgpack":
        return msgpack.packb(body, unicode_errors="replace")
    text = json.dumps(_jsonable(body), ensure_ascii=False, allow_nan=False, default=str)
    return text.encode("utf-8", "replace")
