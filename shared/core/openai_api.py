"""OpenAI's HTTP API shapes, translated to and from the NATS contract: pure functions, no I/O.

The gateway (`services/gateway`) is a client of the scheduler like any other: it turns `/v1/chat/completions`
and `/v1/completions` bodies into `draftwire.prompts` requests, and results and stream chunks back into
OpenAI's response, chunk and error shapes. What the NATS contract cannot do (n > 1, logprobs, tools,
penalties) is refused with OpenAI's `invalid_request_error`, never silently ignored. The request's
speculative statistics ride along as the extension field `draftwire` (as vLLM adds its own).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 512  # OpenAI's is "until the context ends"; chat models stop at their end of turn first
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (the NATS contract's is greedy)
EXTENSION = "draftwire"  # extra_body={"draftwire": {"mode": ..., "gamma": ...}} picks the speculation
_SPEC_FIELDS = {"mode", "gamma", "k", "policy", "confidence", "pipeline"}
_IGNORED = {"model", "user", "store", "metadata", "service_tier", "stream_options"}  # accepted, no effect here
_ZERO_ONLY = ("frequency_penalty", "presence_penalty")
_FINISH = {"stop": "stop", "length": "length"}


@dataclass
class ApiError(Exception):
    """An error as OpenAI reports it: HTTP status and {"error": {message, type, param, code}}."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


_STATUS = {  # draftwire error code -> (HTTP status, OpenAI error type)
    "bad_request": (400, "invalid_request_error"), "bad_param": (400, "invalid_request_error"),
    "bad_encoding": (400, "invalid_request_error"), "oversize": (400, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"), "duplicate_id": (409, "invalid_request_error"),
    "overloaded": (503, "server_error"), "busy": (503, "server_error"), "unavailable": (503, "server_error"),
    "no_draft": (503, "server_error"), "no_verifier": (503, "server_error"),
    # a draft that cannot speculate for this target: the deployment's fault, not the request's; the code says why
    "unknown_vocabulary": (503, "server_error"), "bad_vocabulary": (502, "server_error"),
    "vocab_mismatch": (502, "server_error"),
    "deadline_exceeded": (504, "timeout"), "cancelled": (499, "cancelled"),
}


def from_draftwire_error(error: dict) -> ApiError:
    """A draftwire `{"code", "message"}` as the OpenAI error a client can branch on (its code kept)."""
    code = str(error.get("code", "internal"))
    status, kind = _STATUS.get(code, (500, "server_error"))
    return ApiError(status, str(error.get("message", code)), kind, code=code)


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _bad(f"{name} must be a number in [{lo}, {hi}], got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, lo: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _bad(f"{name} must be an integer >= {lo}, got {value!r}", name)
    return value


def _text_content(content: object, i: int) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _common(body: dict, request_id: str, timeout_s: float, known: set[str]) -> dict:
    """The sampling fields both endpoints share, as a draftwire request body."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - known - _IGNORED - set(_ZERO_ONLY) - {EXTENSION})
    if unknown:
        raise _bad(f"unsupported parameter(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter")
    for name in _ZERO_ONLY:
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(f"{name} is not supported (only 0)", name, "unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise _bad("n must be 1: one choice per request", "n", "unsupported_parameter")
    if body.get("logprobs") not in (None, False) or body.get("echo") not in (None, False):
        raise _bad("logprobs and echo are not supported", "logprobs", "unsupported_parameter")
    out: dict = {"id": request_id, "timeout_s": timeout_s, "stream": bool(body.get("stream", False))}
    if not isinstance(body.get("stream", False), bool):
        raise _bad("stream must be true or false", "stream")
    max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
    out["max_new_tokens"] = max_tokens or DEFAULT_MAX_TOKENS
    if (min_tokens := _integer(body, "min_tokens", 0)) is not None:  # vLLM's extension
        out["min_new_tokens"] = min_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    out["temperature"] = DEFAULT_TEMPERATURE if temperature is None else temperature
    if (top_p := _number(body, "top_p", 0.0, 1.0)) is not None:
        out["top_p"] = top_p if top_p > 0 else 1e-9
    if (seed := body.get("seed")) is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise _bad("seed must be an integer in [0, 2^63)", "seed")
        out["seed"] = seed
    if (stop := body.get("stop")) is not None:
        out["stop"] = stop  # the NATS contract checks it (a string or up to 4)
    spec = body.get(EXTENSION) or {}
    if not isinstance(spec, dict) or set(spec) - _SPEC_FIELDS:
        raise _bad(f"{EXTENSION} must be an object with keys from {sorted(_SPEC_FIELDS)}", EXTENSION)
    out.update(spec)
    return out


def chat_request(body: dict, request_id: str, timeout_s: float) -> dict:
    """A `/v1/chat/completions` body as a draftwire request (OpenAI's `messages` as they are)."""
    out = _common(body, request_id, timeout_s, {"messages", "max_tokens", "max_completion_tokens", "temperature",
                                                "top_p", "seed", "stop", "stream", "n", "logprobs", "min_tokens",
                                                "response_format"})
    if body.get("response_format") not in (None, {"type": "text"}):
        raise _bad("response_format: only {\"type\": \"text\"} is supported", "response_format")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    out["messages"] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise _bad(f"messages[{i}] must be an object with a role", f"messages[{i}]")
        out["messages"].append({"role": m["role"], "content": _text_content(m.get("content"), i)})
    return out


def completion_request(body: dict, request_id: str, timeout_s: float) -> dict:
    """A `/v1/completions` body as a draftwire request (one string prompt)."""
    out = _common(body, request_id, timeout_s, {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                                                "stream", "n", "logprobs", "echo", "min_tokens"})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt must be one non-empty string", "prompt")
    out["prompt"] = prompt
    return out


def usage(result: dict) -> dict:
    stats = result.get("stats") or {}
    prompt = int(stats.get("prompt_tokens", 0))
    completion = len(result.get("token_ids") or [])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(result: dict) -> str:
    return _FINISH.get(str(result.get("finish_reason")), "stop")


def chat_response(result: dict, response_id: str, model: str, created: int) -> dict:
    return {
        "id": response_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.get("text", "")},
                     "logprobs": None, "finish_reason": finish_reason(result)}],
        "usage": usage(result), EXTENSION: result.get("stats") or {},
    }


def completion_response(result: dict, response_id: str, model: str, created: int) -> dict:
    return {
        "id": response_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": result.get("text", ""), "logprobs": None,
                     "finish_reason": finish_reason(result)}],
        "usage": usage(result), EXTENSION: result.get("stats") or {},
    }


def chat_chunk(response_id: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_chunk(response_id: str, model: str, created: int, text: str, finish: str | None = None) -> dict:
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(response_id: str, model: str, created: int, result: dict, chat: bool) -> dict:
    """The last chunk when the client asked `stream_options: {"include_usage": true}`: no choices."""
    return {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage(result),
            EXTENSION: result.get("stats") or {}}


def wants_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


__all__ = ["ApiError", "chat_chunk", "chat_request", "chat_response", "completion_chunk", "completion_request",
           "completion_response", "from_draftwire_error", "usage", "usage_chunk", "wants_usage"]
