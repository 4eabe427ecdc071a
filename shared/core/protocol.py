"""The wire codec between device and edge: msgpack maps, numpy arrays as raw little-endian bytes. Pure, no I/O.

Why this shape: the uplink is a constrained radio link, so keys are one or two characters and arrays travel as
msgpack `bin` (no per-element framing); token ids take 2 bytes when the vocabulary allows it. The edge must
rebuild the draft's q bit for bit, so quantized probabilities cross exactly as `ProposalBlock.values` holds
them. Every decoder treats its input as untrusted: anything malformed raises `ProtocolError` (a `ValueError`
with a short `code`) and never anything else, so a service can answer with an `ErrorReply` instead of dying.
That error comes only from explicit checks (and from msgpack's own errors for malformed bytes): any other
exception out of a decoder is a bug in this module, and the fuzz tests fail on it rather than hide it.
Encoding runs the same checks (after coercing numpy scalars / array-likes), so `encode()` of an invalid
message raises `ProtocolError` too and a peer never receives bytes it would reject. Unknown keys are ignored
on decode (forward compatibility); optional fields that are None are left out of the map.

Key table (every message is one map):

    envelope      v  schema version (int, == SCHEMA_VERSION)     t  type tag: "vr" | "vd" | "er" | "cs"
    VerifyRequest s  session (str, non-empty)     r  round (int >= 0)        b  base (int >= 1)
                  l  last_token (int)             n  vocab_size (int)        x  tokens (bin, ids)
                  p  proposals (block map)        h  history (bin, ids)      sp params (map, below)
                  pl prompt_len (int)             dp draft_probs (bin <f8)   ts sent_at (float)
                  hd digest (uint64, always)      dl deadline (float, unix s; 0 = none; iff h)
                  tv target vocabulary digest (str, sha256 hex; only with h, only from a draft whose
                     tokenizer is not the target's: the edge refuses a session mapped to another target)
                  dv draft vocabulary digest (str, sha256 hex; only with tv: the session states both)
    Verdict       s  session    r  round    b  base    a  n_accepted (int)    k  token (int)
                  vs verify_s (float)   rs residual (block map)   n  residual's vocab_size (iff rs)   ts sent_at
    ErrorReply    c  code (str)    m  message (str)    s  session (str)    id request_id (str)
    CloseSession  s  session (str, non-empty)
    block map     q  quant ("f16" | "u8" | "f32")   cw counts item size (1, 2 or 4)   c  counts (bin <u{cw})
                  i  indices (bin, ids; absent = dense rows)   d  values (bin <f2 f16, u1 u8, <f4 f32)
    params map    te temperature   tp top_p   sd seed   mn min_new_tokens   mx max_new_tokens

"ids" are `<u2` when vocab_size <= 65536, else `<u4`. Decoded integer arrays are int64, values float16/uint8.
Invariants beyond types: gamma <= MAX_GAMMA (both tokens and proposal rows); history, params, prompt_len and
deadline travel together (a session (re)open) with len(history) == base, history[-1] == last_token,
digest == session_digest.of(history) and 1 <= prompt_len <= base; a deadline without history is refused (it
must be 0 then: the edge keeps the opening one); proposals may be None only when gamma == 0 or draft_probs is
sent (DSSD). `digest` is always the digest of the first `base` committed tokens (see session_digest).

`TargetInfo`, the verifier's answer on `draftwire.verifier.info`, is a plain msgpack map outside this envelope
(asked once per device, not per round): model, vocab_size, eos_token_ids, context_length, plus the answering
instance's own fields, which a device ignores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack
import numpy as np

from draftwire.shared.core import session_digest
from draftwire.shared.core.params import QUANTS, ParamError, SamplingParams
from draftwire.shared.core.proposal import ProposalBlock, quantize

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_GAMMA = 64
MAX_HISTORY = 1 << 20
MAX_VOCAB = 1 << 32
MAX_BATCH = 1 << 16  # sessions in one verifier forward, as a verdict may report it
_INT_MAX = 2**63 - 1
_U64_MAX = 2**64 - 1
_MAX_STR = 1 << 20
MAX_ERROR_MESSAGE = 1000  # characters: errors quote untrusted values, and must not echo a megabyte back
_NATIVE_VALUES = {"f16": np.dtype(np.float16), "u8": np.dtype(np.uint8), "f32": np.dtype(np.float32)}
_WIRE_VALUES = {"f16": "<f2", "u8": "u1", "f32": "<f4"}
_PARAM_KEYS = {"temperature": "te", "top_p": "tp", "seed": "sd", "min_new_tokens": "mn", "max_new_tokens": "mx"}


class ProtocolError(ValueError):
    """A message is malformed or invalid. `code` is short and stable (goes into ErrorReply.code):

    bad_msgpack, bad_version, bad_type, bad_field, bad_shape, bad_index, bad_prob, bad_digest, oversize.
    """

    def __init__(self, code: str, message: str = "") -> None:
        message = brief(message)
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def brief(message: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """`message` cut to `limit` characters: an error message fit for an ErrorReply whatever it quotes."""
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _id_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 65536 else "<u4"


# ---- encode-side coercion: lenient about numpy scalars / array-likes, strict about values ----------------


def _as_int(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ProtocolError("bad_field", f"{name} must be an integer, got {x!r}")
    return int(x)


def _as_float(x: Any, name: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ProtocolError("bad_field", f"{name} must be a number, got {x!r}")
    return float(x)


def _as_str(x: Any, name: str) -> str:
    if not isinstance(x, str):
        raise ProtocolError("bad_field", f"{name} must be a str, got {type(x).__name__}")
    return x


def _as_array(x: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nesting, objects numpy cannot hold
        raise ProtocolError("bad_shape", f"{name} is not an array ({e})") from e


def _as_int_array(x: Any, name: str) -> np.ndarray:
    a = _as_array(x, name)
    if a.ndim != 1:
        raise ProtocolError("bad_shape", f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind not in "iu":
        raise ProtocolError("bad_field", f"{name} must be an integer array, got {a.dtype}")
    if a.dtype.kind == "u" and int(a.max()) > _INT_MAX:
        raise ProtocolError("bad_index", f"{name} holds a value beyond int64")
    return a.astype(np.int64)


def _norm_block(block: Any, name: str) -> ProposalBlock:
    if not isinstance(block, ProposalBlock):
        raise ProtocolError("bad_field", f"{name} must be a ProposalBlock, got {type(block).__name__}")
    quant = block.quant
    if quant not in QUANTS:
        raise ProtocolError("bad_field", f"{name}.quant must be one of {QUANTS}, got {quant!r}")
    values = _as_array(block.values, f"{name}.values")
    if values.dtype != _NATIVE_VALUES[quant] or values.ndim != 1:
        raise ProtocolError(
            "bad_field", f"{name}.values must be 1-D {_NATIVE_VALUES[quant]} for quant {quant!r}, got {values.dtype}"
        )
    indices = None if block.indices is None else _as_int_array(block.indices, f"{name}.indices")
    out = ProposalBlock(
        _as_int(block.vocab_size, f"{name}.vocab_size"), quant, _as_int_array(block.counts, f"{name}.counts"),
        indices, values,
    )
    _check_block(out, name)
    return out


# ---- decode-side parsing: strict about wire types --------------------------------------------------------


def _field(d: dict, key: str, optional: bool) -> Any:
    x = d.get(key)
    if x is None and not optional:
        raise ProtocolError("bad_field", f"missing field {key!r}")
    return x


def _int(d: dict, key: str, lo: int = -_INT_MAX - 1, hi: int = _INT_MAX, optional: bool = False) -> int | None:
    x = _field(d, key, optional)
    if x is None:
        return None
    if type(x) is not int:  # excludes bool
        raise ProtocolError("bad_field", f"field {key!r} must be an integer, got {type(x).__name__}")
    if not lo <= x <= hi:
        raise ProtocolError("bad_field", f"field {key!r} must be in [{lo}, {hi}], got {x}")
    return x


def _float(d: dict, key: str) -> float:
    x = _field(d, key, False)
    if type(x) not in (int, float):
        raise ProtocolError("bad_field", f"field {key!r} must be a number, got {type(x).__name__}")
    return float(x)


def _str(d: dict, key: str, optional: bool = False) -> str | None:
    x = _field(d, key, optional)
    if x is not None and not isinstance(x, str):
        raise ProtocolError("bad_field", f"field {key!r} must be a str, got {type(x).__name__}")
    return x


def _array(d: dict, key: str, dtype: str, optional: bool = False) -> np.ndarray | None:
    x = _field(d, key, optional)
    if x is None:
        return None
    if not isinstance(x, bytes):
        raise ProtocolError("bad_field", f"field {key!r} must be bin, got {type(x).__name__}")
    item = np.dtype(dtype).itemsize
    if len(x) % item:
        raise ProtocolError("bad_shape", f"field {key!r}: {len(x)} bytes is not a multiple of {item}")
    return np.frombuffer(x, dtype=dtype)


def _map(d: dict, key: str, optional: bool = True) -> dict | None:
    x = _field(d, key, optional)
    if x is not None and not isinstance(x, dict):
        raise ProtocolError("bad_field", f"field {key!r} must be a map, got {type(x).__name__}")
    return x


# ---- shared semantic checks ----------------------------------------------------------------------------


def _check_vocab(vocab_size: int) -> None:
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ProtocolError("bad_field", f"vocab_size must be in [1, {MAX_VOCAB}], got {vocab_size}")


def _check_ids(ids: np.ndarray, vocab_size: int, name: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ProtocolError("bad_index", f"{name} must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")


def _check_str(x: str, name: str) -> None:
    """What msgpack can carry and a peer will take: UTF-8 encodable (no lone surrogates), <= _MAX_STR bytes."""
    try:
        size = len(x.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ProtocolError("bad_field", f"{name} is not valid unicode ({e.reason})") from e
    if size > _MAX_STR:
        raise ProtocolError("oversize", f"{name} of {size} bytes exceeds {_MAX_STR}")


def _check_finite(x: float, name: str, lo: float = -math.inf) -> None:
    if not math.isfinite(x) or x < lo:
        raise ProtocolError("bad_field", f"{name} must be finite and >= {lo}, got {x!r}")


def _check_round_header(session: str, round_: int, base: int) -> None:
    """Fields every round message carries: which session, which round, at which committed length."""
    if not session:
        raise ProtocolError("bad_field", "session must be non-empty")
    _check_str(session, "session")
    if not 0 <= round_ <= _INT_MAX:
        raise ProtocolError("bad_field", f"round must be >= 0, got {round_}")
    if not 1 <= base <= _INT_MAX:
        raise ProtocolError("bad_field", f"base must be >= 1, got {base}")


def _check_block(b: ProposalBlock, name: str) -> None:
    """Structure and probability checks of a (normalised or freshly decoded) block."""
    _check_vocab(b.vocab_size)
    counts, indices, values, g = b.counts, b.indices, b.values, b.gamma
    if g > MAX_GAMMA:
        raise ProtocolError("oversize", f"{name} has {g} rows, more than {MAX_GAMMA}")
    if g and int(counts.min()) < 1:
        raise ProtocolError("bad_prob", f"{name} row {int(np.argmin(counts))} is empty (sums to 0)")
    if g and int(counts.max()) > b.vocab_size:
        raise ProtocolError("bad_shape", f"{name} has a row of {int(counts.max())} > vocab_size entries")
    total = int(counts.sum())
    if len(values) != total:
        raise ProtocolError("bad_shape", f"{name}: counts sum to {total} but {len(values)} values")
    if indices is None:
        if g and bool((counts != b.vocab_size).any()):
            raise ProtocolError("bad_shape", f"{name}: dense rows must hold vocab_size={b.vocab_size} entries")
    else:
        if len(indices) != total:
            raise ProtocolError("bad_shape", f"{name}: counts sum to {total} but {len(indices)} indices")
        _check_ids(indices, b.vocab_size, f"{name} indices")
        if total > 1:
            keys = np.sort(np.repeat(np.arange(g, dtype=np.int64), counts) * b.vocab_size + indices)
            if bool((keys[1:] == keys[:-1]).any()):
                raise ProtocolError("bad_index", f"{name} repeats an index within a row")
    if values.dtype.kind == "f" and total:
        if not bool(np.isfinite(values).all()):
            raise ProtocolError("bad_prob", f"{name} holds a NaN or infinite probability")
        if bool(np.signbit(values).any()):
            raise ProtocolError("bad_prob", f"{name} holds a negative probability")
    if g:
        offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
        sums = np.add.reduceat(values.astype(np.float64), offsets)
        if bool((sums <= 0).any()):
            raise ProtocolError("bad_prob", f"{name} row {int(np.argmin(sums))} sums to 0")


def _block_wire(b: ProposalBlock) -> dict:
    cmax = int(b.counts.max()) if b.gamma else 0
    cw = 1 if cmax <= 0xFF else 2 if cmax <= 0xFFFF else 4
    m = {
        "q": b.quant,
        "cw": cw,
        "c": b.counts.astype(f"<u{cw}").tobytes(),
        "d": b.values.astype(_WIRE_VALUES[b.quant]).tobytes(),
    }
    if b.indices is not None:
        m["i"] = b.indices.astype(_id_dtype(b.vocab_size)).tobytes()
    return m


def _block_from_wire(m: dict, vocab_size: int, name: str) -> ProposalBlock:
    quant = _str(m, "q")
    if quant not in QUANTS:
        raise ProtocolError("bad_field", f"{name}.quant must be one of {QUANTS}, got {quant!r}")
    cw = _int(m, "cw", 1, 4)
    if cw not in (1, 2, 4):
        raise ProtocolError("bad_field", f"{name} counts item size must be 1, 2 or 4, got {cw}")
    counts = _array(m, "c", f"<u{cw}").astype(np.int64)
    if len(counts) > MAX_GAMMA:
        raise ProtocolError("oversize", f"{name} has {len(counts)} rows, more than {MAX_GAMMA}")
    values = _array(m, "d", _WIRE_VALUES[quant]).astype(_NATIVE_VALUES[quant])
    indices = _array(m, "i", _id_dtype(vocab_size), optional=True)
    block = ProposalBlock(vocab_size, quant, counts, None if indices is None else indices.astype(np.int64), values)
    _check_block(block, name)
    return block


def _params_wire(p: SamplingParams) -> dict:
    out = {}
    for f in fields(SamplingParams):
        v = getattr(p, f.name)
        out[_PARAM_KEYS[f.name]] = float(v) if isinstance(v, float) else int(v)
    return out


def _params_from_wire(m: dict) -> SamplingParams:
    kwargs = {name: _field(m, key, False) for name, key in _PARAM_KEYS.items()}
    try:
        return SamplingParams(**kwargs)
    except ParamError as e:
        raise ProtocolError("bad_field", f"params: {e}") from e


# ---- envelope --------------------------------------------------------------------------------------------


def _unpack(data: Any) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_msgpack", f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversize", f"message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, max_bin_len=MAX_MESSAGE_BYTES,
            max_str_len=_MAX_STR, max_array_len=4096, max_map_len=4096, max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as e:  # malformed, truncated, trailing or too deep
        raise ProtocolError("bad_msgpack", f"not a msgpack message ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ProtocolError("bad_msgpack", f"a message is a map, got {type(obj).__name__}")
    v = obj.get("v")
    if type(v) is not int or v != SCHEMA_VERSION:
        raise ProtocolError("bad_version", f"schema version {v!r}, expected {SCHEMA_VERSION}")
    if not isinstance(obj.get("t"), str) or obj["t"] not in _TYPES:
        raise ProtocolError("bad_type", f"unknown message type {obj.get('t')!r}")
    return obj


def _pack(tag: str, wire: dict) -> bytes:
    data = msgpack.packb({"v": SCHEMA_VERSION, "t": tag, **wire}, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversize", f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape:
            return False
        if a.dtype.kind in "iu" and b.dtype.kind in "iu":
            return bool(np.array_equal(a, b))
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, ProposalBlock) or isinstance(b, ProposalBlock):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    return a == b


class _Message:
    """Shared encode/decode plumbing; value equality (arrays compared bit for bit) for tests and callers."""

    TAG: ClassVar[str]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    def encode(self) -> bytes:
        """Validate (raising ProtocolError, like decode would) and serialise."""
        msg = self._normalized()
        msg._check()
        return _pack(self.TAG, msg._wire())

    @classmethod
    def decode(cls, data: bytes):
        """Parse untrusted bytes into this message type; ProtocolError (code "bad_type" for another type)."""
        obj = _unpack(data)
        if obj["t"] != cls.TAG:
            raise ProtocolError("bad_type", f"expected a {cls.__name__} ({cls.TAG!r}), got {obj['t']!r}")
        return cls._from_wire(obj)


# ---- messages --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VerifyRequest(_Message):
    """One speculation round, device -> edge: the gamma drafted tokens and the q they were sampled from.

    `history`/`params`/`prompt_len`/`deadline` are sent only when (re)opening a session on a verifier, so a
    stateless or restarted edge can rebuild its KV cache; otherwise the edge continues from its own committed
    state, and `digest` (of the first `base` committed tokens) proves that state is this generation's.
    """

    TAG: ClassVar[str] = "vr"

    session: str
    round: int
    base: int
    last_token: int
    tokens: np.ndarray
    proposals: ProposalBlock | None
    vocab_size: int
    history: np.ndarray | None = None
    params: SamplingParams | None = None
    prompt_len: int | None = None
    draft_probs: np.ndarray | None = None
    sent_at: float = 0.0
    digest: int = session_digest.EMPTY
    deadline: float = 0.0  # unix seconds; 0 = none. Only on opening requests: the edge keeps it per session
    vocab: str = ""  # the target vocabulary's digest the proposals were mapped to ("": the draft's own)
    draft_vocab: str = ""  # with `vocab`: the draft's own vocabulary digest (the session states both)

    @property
    def gamma(self) -> int:
        return len(self.tokens)

    def _normalized(self) -> VerifyRequest:
        dp = None
        if self.draft_probs is not None:
            dp = _as_array(self.draft_probs, "draft_probs")
            if dp.ndim != 1 or (dp.size and dp.dtype.kind not in "fiu"):
                raise ProtocolError("bad_field", f"draft_probs must be a 1-D float array, got {dp.dtype}")
            dp = dp.astype(np.float64)
        if self.params is not None and not isinstance(self.params, SamplingParams):
            raise ProtocolError("bad_field", f"params must be SamplingParams, got {type(self.params).__name__}")
        return VerifyRequest(
            session=_as_str(self.session, "session"),
            round=_as_int(self.round, "round"),
            base=_as_int(self.base, "base"),
            last_token=_as_int(self.last_token, "last_token"),
            tokens=_as_int_array(self.tokens, "tokens"),
            proposals=None if self.proposals is None else _norm_block(self.proposals, "proposals"),
            vocab_size=_as_int(self.vocab_size, "vocab_size"),
            history=None if self.history is None else _as_int_array(self.history, "history"),
            params=self.params,
            prompt_len=None if self.prompt_len is None else _as_int(self.prompt_len, "prompt_len"),
            draft_probs=dp,
            sent_at=_as_float(self.sent_at, "sent_at"),
            digest=_as_int(self.digest, "digest"),
            deadline=_as_float(self.deadline, "deadline"),
            vocab="" if isinstance(self.vocab, str) and not self.vocab else _as_str(self.vocab, "vocab"),
            draft_vocab="" if isinstance(self.draft_vocab, str) and not self.draft_vocab
            else _as_str(self.draft_vocab, "draft_vocab"),
        )

    def _check(self) -> None:
        _check_round_header(self.session, self.round, self.base)
        _check_vocab(self.vocab_size)
        if self.vocab and (self.history is None or len(self.vocab) != 64):
            raise ProtocolError("bad_field", "vocab is a sha256 hex digest, sent only with history")
        if self.draft_vocab and (not self.vocab or len(self.draft_vocab) != 64):
            raise ProtocolError("bad_field", "draft_vocab is a sha256 hex digest, sent only with vocab")
        if not 0 <= self.digest <= _U64_MAX:
            raise ProtocolError("bad_field", f"digest must be an unsigned 64-bit integer, got {self.digest}")
        _check_finite(self.deadline, "deadline", 0.0)
        if not 0 <= self.last_token < self.vocab_size:
            raise ProtocolError("bad_index", f"last_token {self.last_token} outside [0, {self.vocab_size})")
        g = self.gamma
        if g > MAX_GAMMA:
            raise ProtocolError("oversize", f"gamma {g} exceeds {MAX_GAMMA}")
        _check_ids(self.tokens, self.vocab_size, "tokens")
        if self.proposals is None:
            if g and self.draft_probs is None:
                raise ProtocolError("bad_field", "proposals are required when gamma > 0 (unless draft_probs)")
        else:
            if self.proposals.vocab_size != self.vocab_size:
                raise ProtocolError("bad_field", "proposals.vocab_size differs from vocab_size")
            if self.proposals.gamma != g:
                raise ProtocolError("bad_shape", f"{self.proposals.gamma} proposal rows for {g} tokens")
        opening = (self.history is not None, self.params is not None, self.prompt_len is not None)
        if any(opening) and not all(opening):
            raise ProtocolError("bad_field", "history, params and prompt_len must be sent together")
        if self.history is not None:
            if len(self.history) > MAX_HISTORY:
                raise ProtocolError("oversize", f"history of {len(self.history)} tokens exceeds {MAX_HISTORY}")
            if len(self.history) != self.base:
                raise ProtocolError("bad_shape", f"history has {len(self.history)} tokens, base is {self.base}")
            _check_ids(self.history, self.vocab_size, "history")
            if int(self.history[-1]) != self.last_token:
                raise ProtocolError("bad_field", "history[-1] differs from last_token")
            if not 1 <= self.prompt_len <= self.base:
                raise ProtocolError("bad_field", f"prompt_len must be in [1, base], got {self.prompt_len}")
            if session_digest.of(self.history) != self.digest:
                raise ProtocolError("bad_digest", "digest is not the digest of history")
        elif self.deadline:
            raise ProtocolError("bad_field", "deadline is sent only with history (when opening a session)")
        if self.draft_probs is not None:
            dp = self.draft_probs
            if len(dp) != g:
                raise ProtocolError("bad_shape", f"{len(dp)} draft_probs for {g} tokens")
            if not bool((np.isfinite(dp) & (dp >= 0) & (dp <= 1)).all()):
                raise ProtocolError("bad_prob", "draft_probs must be finite and in [0, 1]")
        _check_finite(self.sent_at, "sent_at")

    def _wire(self) -> dict:
        ids = _id_dtype(self.vocab_size)
        w = {
            "s": self.session, "r": self.round, "b": self.base, "l": self.last_token, "n": self.vocab_size,
            "x": self.tokens.astype(ids).tobytes(), "ts": self.sent_at, "hd": self.digest,
        }
        if self.proposals is not None:
            w["p"] = _block_wire(self.proposals)
        if self.history is not None:
            w["h"] = self.history.astype(ids).tobytes()
            w["sp"] = _params_wire(self.params)
            w["pl"] = self.prompt_len
            w["dl"] = self.deadline
            if self.vocab:
                w["tv"] = self.vocab
            if self.draft_vocab:
                w["dv"] = self.draft_vocab
        if self.draft_probs is not None:
            w["dp"] = self.draft_probs.astype("<f8").tobytes()
        return w

    @classmethod
    def _from_wire(cls, d: dict) -> VerifyRequest:
        vocab = _int(d, "n", 1, MAX_VOCAB)
        ids = _id_dtype(vocab)
        tokens = _array(d, "x", ids)
        if len(tokens) > MAX_GAMMA:
            raise ProtocolError("oversize", f"gamma {len(tokens)} exceeds {MAX_GAMMA}")
        p = _map(d, "p")
        history = _array(d, "h", ids, optional=True)
        if history is not None and len(history) > MAX_HISTORY:
            raise ProtocolError("oversize", f"history of {len(history)} tokens exceeds {MAX_HISTORY}")
        sp = _map(d, "sp")
        dp = _array(d, "dp", "<f8", optional=True)
        deadline = 0.0 if history is None else _float(d, "dl")
        msg = cls(
            session=_str(d, "s"),
            round=_int(d, "r", 0),
            base=_int(d, "b", 1),
            last_token=_int(d, "l"),
            tokens=tokens.astype(np.int64),
            proposals=None if p is None else _block_from_wire(p, vocab, "proposals"),
            vocab_size=vocab,
            history=None if history is None else history.astype(np.int64),
            params=None if sp is None else _params_from_wire(sp),
            prompt_len=_int(d, "pl", optional=True),
            draft_probs=None if dp is None else dp.astype(np.float64),
            sent_at=_float(d, "ts"),
            digest=_int(d, "hd", 0, _U64_MAX),
            deadline=deadline,
            vocab=(_str(d, "tv", optional=True) or "") if history is not None else "",
            draft_vocab=(_str(d, "dv", optional=True) or "") if history is not None else "",
        )
        msg._check()
        return msg


@dataclass(frozen=True, eq=False)
class Verdict(_Message):
    """The edge's answer to one round: how many drafts it accepted and the correction or bonus token.

    `residual` (DSSD mode) carries the target's distribution downlink instead of a sampled token; then
    `token` may be -1 (the device samples it). `considered`: under a token budget the edge verified only this
    many of the drafted tokens (TETRIS; lossless, see draft_selection); None means all of them. `batch` and
    `token_s` report the edge's load: sessions in the forward that served this round, and its marginal seconds
    per verified token (see batch_cost), for the device's draft-length policy.
    """

    TAG: ClassVar[str] = "vd"

    session: str
    round: int
    base: int
    n_accepted: int
    token: int
    verify_s: float
    residual: ProposalBlock | None = None
    sent_at: float = 0.0
    considered: int | None = None
    batch: int = 1
    token_s: float = 0.0

    def _normalized(self) -> Verdict:
        return Verdict(
            session=_as_str(self.session, "session"),
            round=_as_int(self.round, "round"),
            base=_as_int(self.base, "base"),
            n_accepted=_as_int(self.n_accepted, "n_accepted"),
            token=_as_int(self.token, "token"),
            verify_s=_as_float(self.verify_s, "verify_s"),
            residual=None if self.residual is None else _norm_block(self.residual, "residual"),
            sent_at=_as_float(self.sent_at, "sent_at"),
            considered=None if self.considered is None else _as_int(self.considered, "considered"),
            batch=_as_int(self.batch, "batch"),
            token_s=_as_float(self.token_s, "token_s"),
        )

    def _check(self) -> None:
        _check_round_header(self.session, self.round, self.base)
        if not 0 <= self.n_accepted <= MAX_GAMMA:
            raise ProtocolError("bad_field", f"n_accepted must be in [0, {MAX_GAMMA}], got {self.n_accepted}")
        if self.considered is not None and not self.n_accepted <= self.considered <= MAX_GAMMA:
            raise ProtocolError("bad_field", f"considered must be in [n_accepted, {MAX_GAMMA}], got {self.considered}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ProtocolError("bad_field", f"batch must be in [1, {MAX_BATCH}], got {self.batch}")
        _check_finite(self.token_s, "token_s", 0.0)
        if self.residual is None:
            if not 0 <= self.token < MAX_VOCAB:
                raise ProtocolError("bad_index", f"token must be in [0, {MAX_VOCAB}), got {self.token}")
        else:
            if self.residual.gamma != 1:
                raise ProtocolError("bad_shape", f"residual must have 1 row, got {self.residual.gamma}")
            if not -1 <= self.token < self.residual.vocab_size:
                raise ProtocolError("bad_index", f"token must be -1 or in [0, vocab_size), got {self.token}")
        _check_finite(self.verify_s, "verify_s", 0.0)
        _check_finite(self.sent_at, "sent_at")

    def _wire(self) -> dict:
        w = {
            "s": self.session, "r": self.round, "b": self.base, "a": self.n_accepted, "k": self.token,
            "vs": self.verify_s, "ts": self.sent_at,
        }
        if self.considered is not None:
            w["c"] = self.considered
        if self.batch != 1 or self.token_s:
            w["bn"], w["tm"] = self.batch, self.token_s
        if self.residual is not None:
            w["n"] = self.residual.vocab_size
            w["rs"] = _block_wire(self.residual)
        return w

    @classmethod
    def _from_wire(cls, d: dict) -> Verdict:
        rs = _map(d, "rs")
        residual = None if rs is None else _block_from_wire(rs, _int(d, "n", 1, MAX_VOCAB), "residual")
        msg = cls(
            session=_str(d, "s"),
            round=_int(d, "r", 0),
            base=_int(d, "b", 1),
            n_accepted=_int(d, "a"),
            token=_int(d, "k"),
            verify_s=_float(d, "vs"),
            residual=residual,
            sent_at=_float(d, "ts"),
            considered=_int(d, "c", 0, MAX_GAMMA, optional=True),
            batch=_int(d, "bn", 1, MAX_BATCH) if "bn" in d else 1,
            token_s=_float(d, "tm") if "tm" in d else 0.0,
        )
        msg._check()
        return msg


@dataclass(frozen=True, eq=False)
class ErrorReply(_Message):
    """Sent instead of a Verdict when a request cannot be served; `code` is machine-readable (ProtocolError's
    codes, or a service's own such as "no_session"). `retry_s` > 0 (with `busy`) hints when to try again."""

    TAG: ClassVar[str] = "er"

    code: str
    message: str
    session: str | None = None
    request_id: str | None = None
    retry_s: float = 0.0

    def _normalized(self) -> ErrorReply:
        return ErrorReply(
            code=_as_str(self.code, "code"),
            message=_as_str(self.message, "message"),
            session=None if self.session is None else _as_str(self.session, "session"),
            request_id=None if self.request_id is None else _as_str(self.request_id, "request_id"),
            retry_s=_as_float(self.retry_s, "retry_s"),
        )

    def _check(self) -> None:
        if not self.code:
            raise ProtocolError("bad_field", "code must be non-empty")
        _check_finite(self.retry_s, "retry_s", 0.0)
        for name in ("code", "message", "session", "request_id"):
            if getattr(self, name) is not None:
                _check_str(getattr(self, name), name)

    def _wire(self) -> dict:
        w = {"c": self.code, "m": self.message}
        if self.session is not None:
            w["s"] = self.session
        if self.request_id is not None:
            w["id"] = self.request_id
        if self.retry_s:
            w["ra"] = self.retry_s
        return w

    @classmethod
    def _from_wire(cls, d: dict) -> ErrorReply:
        msg = cls(_str(d, "c"), _str(d, "m"), _str(d, "s", optional=True), _str(d, "id", optional=True),
                  _float(d, "ra") if "ra" in d else 0.0)
        msg._check()
        return msg


@dataclass(frozen=True, eq=False)
class CloseSession(_Message):
    """Device -> every verifier: the generation ended (done, failed or cancelled); free its KV cache now
    instead of waiting for LRU eviction. Idempotent: closing a session nobody holds does nothing."""

    TAG: ClassVar[str] = "cs"

    session: str

    def _normalized(self) -> CloseSession:
        return CloseSession(_as_str(self.session, "session"))

    def _check(self) -> None:
        if not self.session:
            raise ProtocolError("bad_field", "session must be non-empty")
        _check_str(self.session, "session")

    def _wire(self) -> dict:
        return {"s": self.session}

    @classmethod
    def _from_wire(cls, d: dict) -> CloseSession:
        msg = cls(_str(d, "s"))
        msg._check()
        return msg


_TYPES: dict[str, type[_Message]] = {c.TAG: c for c in (VerifyRequest, Verdict, ErrorReply, CloseSession)}

Message = VerifyRequest | Verdict | ErrorReply | CloseSession


def decode_any(data: bytes) -> Message:
    """Decode whichever message `data` holds (by its type tag); ProtocolError for anything malformed."""
    obj = _unpack(data)
    return _TYPES[obj["t"]]._from_wire(obj)


def payload_bytes(msg: Message) -> int:
    """Encoded size of a message, envelope included."""
    return len(msg.encode())


def payload_bytes_per_position(k: int, vocab_size: int, quant: str = "f16", gamma: int = 4) -> float:
    """Marginal uplink bytes of one draft position (token id + its proposal row) at sparsity K.

    Builds a realistic VerifyRequest (random ids, min(k, vocab) entries per row; K >= vocab is the dense mode)
    and subtracts the size of the same request with gamma = 0, so the fixed envelope cancels out.
    """
    if gamma < 1:
        raise ValueError("gamma must be >= 1")
    rng = np.random.default_rng(0)
    kk = min(k, vocab_size)
    dense = kk >= vocab_size
    rows = []
    for _ in range(gamma):
        ids = None if dense else rng.choice(vocab_size, size=kk, replace=False).astype(np.int64)
        raw = quantize(rng.random(kk) + 0.01, quant)
        rows.append((ids, raw))
    tokens = rng.integers(0, vocab_size, size=gamma, dtype=np.int64)

    def request(g: int) -> VerifyRequest:
        block = ProposalBlock.from_rows(rows[:g], vocab_size, quant)
        if g == 0 and dense:
            block = ProposalBlock(vocab_size, quant, block.counts, None, block.values)
        return VerifyRequest("s-0123456789", 7, 1000, 42 % vocab_size, tokens[:g], block, vocab_size)

    return (payload_bytes(request(gamma)) - payload_bytes(request(0))) / gamma


@dataclass(frozen=True)
class TargetInfo:
    """The target model as its verifiers describe it on `draftwire.verifier.info`: what a device needs to
    bound a generation (context length) and stop it (the target's EOS ids). Plain msgpack map, not versioned."""

    model: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    context_length: int
    chat_template: str | None = None  # the target tokenizer's: a chat is rendered with it on the device
    vocab: str = ""  # the target vocabulary's digest: a draft with another fetches the tokenizer by it

    def encode(self, **extra) -> bytes:
        """The info reply; `extra` adds the answering instance's own fields (name, live counts)."""
        return msgpack.packb({"model": self.model, "vocab_size": self.vocab_size,
                              "eos_token_ids": list(self.eos_token_ids), "context_length": self.context_length,
                              **({"chat_template": self.chat_template} if self.chat_template else {}),
                              **({"vocab": self.vocab} if self.vocab else {}), **extra})

    @classmethod
    def decode(cls, data: bytes) -> TargetInfo:
        """ValueError on anything but a well-formed info reply."""
        try:
            obj = msgpack.unpackb(data, raw=False)
            template, vocab = obj.get("chat_template"), obj.get("vocab") or ""
            info = cls(str(obj["model"]), int(obj["vocab_size"]), tuple(int(t) for t in obj["eos_token_ids"]),
                       int(obj["context_length"]), template if isinstance(template, str) and template else None,
                       vocab if isinstance(vocab, str) and len(vocab) == 64 else "")
        except Exception as exc:  # noqa: BLE001 - msgpack and field errors alike mean "not an info reply"
            raise ValueError(f"bad verifier info reply: {type(exc).__name__}: {exc}") from None
        if info.vocab_size < 1 or info.context_length < 1:
            raise ValueError(f"bad verifier info reply: {info}")
        return info
