"""The wire codec: bit-exact round trips, and untrusted bytes fail only ever with ProtocolError.

The decoder has no catch-all: ProtocolError comes only from its explicit checks, so these fuzz tests fail on
any other exception (an unforeseen input that reaches numpy or a dict lookup unchecked)."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from draftwire.shared.core import session_digest
from draftwire.shared.core.params import SamplingParams
from draftwire.shared.core.proposal import ProposalBlock
from draftwire.shared.core.protocol import (
    MAX_ERROR_MESSAGE,
    MAX_GAMMA,
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    CloseSession,
    ErrorReply,
    ProtocolError,
    Verdict,
    VerifyRequest,
    decode_any,
    payload_bytes,
    payload_bytes_per_position,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VOCABS = st.one_of(st.integers(1, 300), st.integers(65530, 65542), st.integers(65543, 160000))


def _values(rng: np.random.Generator, n: int, quant: str) -> np.ndarray:
    """Arbitrary valid wire values: any non-negative finite f16 bit pattern (subnormals, 0) or any u8."""
    if quant == "f16":
        raw = rng.integers(0, 0x7C00, size=n, dtype=np.uint16).view(np.float16)
    else:
        raw = rng.integers(0, 256, size=n, dtype=np.uint8)
    raw = raw.copy()
    if n and not raw.astype(np.float64).sum() > 0:
        raw[rng.integers(n)] = 1
    return raw


def _block(rng: np.random.Generator, vocab: int, gamma: int, k: int, quant: str) -> ProposalBlock:
    dense = k >= vocab
    rows = []
    for _ in range(gamma):
        n = vocab if dense else int(rng.integers(1, k + 1))
        ids = None if dense else rng.choice(vocab, size=n, replace=False).astype(np.int64)
        rows.append((ids, _values(rng, n, quant)))
    block = ProposalBlock.from_rows(rows, vocab, quant)
    if dense and gamma == 0:
        block = dataclasses.replace(block, indices=None)
    return block


PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.floats(0, 5), st.integers(0, 3)),
    top_p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**63 - 1),
    min_new_tokens=st.integers(0, 10),
    max_new_tokens=st.integers(10, 1 << 20),
)


@st.composite
def verify_requests(draw) -> VerifyRequest:
    vocab = draw(VOCABS)
    gamma = draw(st.integers(0, 8))
    quant = draw(st.sampled_from(["f16", "u8"]))
    dense_ok = vocab <= 70000
    k = draw(st.one_of(st.integers(1, min(vocab, 64)), st.just(vocab) if dense_ok else st.nothing()))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(0, vocab, size=gamma, dtype=np.int64)
    draft_probs = rng.random(gamma) if draw(st.booleans()) else None
    proposals = None if draft_probs is not None and draw(st.booleans()) else _block(rng, vocab, gamma, k, quant)
    if gamma == 0 and draw(st.booleans()):
        proposals = None
    history = params = prompt_len = None
    deadline = 0.0
    if draw(st.booleans()):
        base = draw(st.integers(1, 40))
        history = rng.integers(0, vocab, size=base, dtype=np.int64)
        last = int(history[-1])
        params = draw(PARAMS)
        prompt_len = draw(st.integers(1, base))
        digest = session_digest.of(history)
        deadline = draw(st.floats(0, 1e12))
    else:
        base = draw(st.integers(1, 2**62))
        last = int(rng.integers(0, vocab))
        digest = draw(st.integers(0, 2**64 - 1))
    return VerifyRequest(
        session=draw(st.text(min_size=1, max_size=24)),
        round=draw(st.integers(0, 2**40)),
        base=base,
        last_token=last,
        tokens=tokens,
        proposals=proposals,
        vocab_size=vocab,
        history=history,
        params=params,
        prompt_len=prompt_len,
        draft_probs=draft_probs,
        sent_at=draw(st.floats(allow_nan=False, allow_infinity=False)),
        digest=digest,
        deadline=deadline,
    )


def _assert_arrays_identical(got: np.ndarray | None, want: np.ndarray | None) -> None:
    if want is None:
        assert got is None
        return
    assert got.dtype.kind == want.dtype.kind and got.shape == want.shape
    assert got.tobytes() == want.astype(got.dtype).tobytes()


def _assert_blocks_identical(got: ProposalBlock | None, want: ProposalBlock | None) -> None:
    if want is None:
        assert got is None
        return
    assert (got.vocab_size, got.quant, got.gamma, got.dense) == (want.vocab_size, want.quant, want.gamma, want.dense)
    assert got.counts.dtype == np.int64 and np.array_equal(got.counts, want.counts)
    if want.indices is not None:
        assert got.indices.dtype == np.int64
    _assert_arrays_identical(got.indices, want.indices)
    assert got.values.dtype == want.values.dtype and got.values.tobytes() == want.values.tobytes()
    for i in range(want.gamma):
        (gi, gq), (wi, wq) = got.row(i), want.row(i)
        assert np.array_equal(gi, wi) and gq.tobytes() == wq.tobytes()


# ---- round trips ---------------------------------------------------------------------------------------


@FAST
@given(verify_requests())
def test_verify_request_round_trip(msg: VerifyRequest) -> None:
    data = msg.encode()
    got = VerifyRequest.decode(data)
    assert decode_any(data) == got == msg
    for name in ("session", "round", "base", "last_token", "vocab_size", "params", "prompt_len", "sent_at", "digest",
                 "deadline"):
        assert getattr(got, name) == getattr(msg, name), name
    assert got.tokens.dtype == np.int64
    _assert_arrays_identical(got.tokens, msg.tokens)
    _assert_arrays_identical(got.history, msg.history)
    if msg.history is not None:
        assert got.history.dtype == np.int64
    _assert_arrays_identical(got.draft_probs, msg.draft_probs)
    _assert_blocks_identical(got.proposals, msg.proposals)
    assert got.encode() == data


@FAST
@given(
    vocab=VOCABS,
    quant=st.sampled_from(["f16", "u8"]),
    seed=st.integers(0, 2**32 - 1),
    with_residual=st.booleans(),
    sent_at=st.floats(allow_nan=False, allow_infinity=False),
    verify_s=st.floats(0, 1e6),
    data=st.data(),
)
def test_verdict_round_trip(vocab, quant, seed, with_residual, sent_at, verify_s, data) -> None:
    rng = np.random.default_rng(seed)
    residual = None
    token = data.draw(st.integers(0, vocab - 1))
    if with_residual:
        k = data.draw(st.integers(1, min(vocab, 64)) if vocab > 70000 else st.integers(1, vocab))
        residual = _block(rng, vocab, 1, k, quant)
        token = data.draw(st.sampled_from([-1, token]))
    msg = Verdict("sess", data.draw(st.integers(0, 2**40)), data.draw(st.integers(1, 2**40)),
                  data.draw(st.integers(0, MAX_GAMMA)), token, verify_s, residual, sent_at)
    got = Verdict.decode(msg.encode())
    assert got == msg and decode_any(msg.encode()) == msg
    for name in ("session", "round", "base", "n_accepted", "token", "verify_s", "sent_at"):
        assert getattr(got, name) == getattr(msg, name), name
    _assert_blocks_identical(got.residual, residual)


@FAST
@given(st.text(min_size=1), st.text(), st.none() | st.text(), st.none() | st.text())
def test_error_reply_round_trip(code, message, session, request_id) -> None:
    msg = ErrorReply(code, message, session, request_id)
    data = msg.encode()
    assert ErrorReply.decode(data) == msg == decode_any(data)


@FAST
@given(st.text(min_size=1))
def test_close_session_round_trip(session) -> None:
    data = CloseSession(session).encode()
    assert CloseSession.decode(data) == CloseSession(session) == decode_any(data)


def test_numpy_scalars_and_int32_arrays_are_accepted_on_encode() -> None:
    good = _request()
    msg = dataclasses.replace(good, round=np.int64(3), tokens=good.tokens.astype(np.int32), sent_at=np.float32(1.5))
    got = VerifyRequest.decode(msg.encode())
    assert got.round == 3 and type(got.round) is int and got.tokens.dtype == np.int64 and got.sent_at == 1.5


def test_param_key_table_covers_sampling_params() -> None:
    from draftwire.shared.core.protocol import _PARAM_KEYS

    assert set(_PARAM_KEYS) == {f.name for f in dataclasses.fields(SamplingParams)}


# ---- garbage in, ProtocolError out ---------------------------------------------------------------------


def _decode_or_protocol_error(data) -> None:
    """The contract: a message or ProtocolError, never any other exception (which propagates: a failure)."""
    try:
        decode_any(data)
    except ProtocolError as e:
        assert isinstance(e.code, str) and e.code
        assert len(e.message) <= MAX_ERROR_MESSAGE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_any(data)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=12,
)
ALL_KEYS = ["s", "r", "b", "l", "n", "x", "p", "h", "sp", "pl", "dp", "ts", "hd", "dl", "a", "k", "vs", "rs", "c",
            "m", "id", "q", "cw", "i", "d"]


@settings(max_examples=300, deadline=None)
@given(MSGPACK_VALUES)
def test_arbitrary_msgpack_objects(obj) -> None:
    with pytest.raises(ProtocolError):
        decode_any(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["vr", "vd", "er", "cs"]),
    st.dictionaries(st.sampled_from(ALL_KEYS), MSGPACK_VALUES, max_size=12),
)
def test_arbitrary_fields_behind_a_valid_envelope(tag, fields) -> None:
    _decode_or_protocol_error(msgpack.packb({"v": SCHEMA_VERSION, "t": tag, **fields}, use_bin_type=True))


def _request(**changes) -> VerifyRequest:
    rng = np.random.default_rng(1)
    vocab = changes.pop("vocab_size", 1000)
    block = _block(rng, vocab, 3, 8, changes.pop("quant", "f16"))
    history = np.array([9, 8, 7, 6, 7])
    msg = VerifyRequest(
        session="s1", round=2, base=5, last_token=7, tokens=np.array([1, 2, 3]), proposals=block,
        vocab_size=vocab, history=history, params=SamplingParams(temperature=0.7),
        prompt_len=3, draft_probs=None, sent_at=123.5, digest=session_digest.of(history), deadline=1.7e9,
    )
    if changes.get("history", history) is None:  # not an opening request: no deadline, any digest
        changes.setdefault("deadline", 0.0)
    elif "history" in changes:
        changes.setdefault("digest", session_digest.of(changes["history"]))
    return dataclasses.replace(msg, **changes)


def _verdict() -> Verdict:
    rng = np.random.default_rng(2)
    return Verdict("s1", 2, 5, 1, -1, 0.01, _block(rng, 500, 1, 16, "u8"), 9.0)


VALID = [_request().encode(), _verdict().encode(), ErrorReply("no_session", "gone", "s1", "r1").encode(),
         CloseSession("s1").encode()]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_mutated_bytes(data: bytes, draw) -> None:
    kind = draw.draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    pos = draw.draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        mutated = data[:pos]
    elif kind == "flip":
        mutated = data[:pos] + bytes([data[pos] ^ draw.draw(st.integers(1, 255))]) + data[pos + 1:]
    elif kind == "insert":
        mutated = data[:pos] + draw.draw(st.binary(min_size=1, max_size=4)) + data[pos:]
    else:
        mutated = data[:pos] + data[pos + 1:]
    _decode_or_protocol_error(mutated)


def _walk(obj, path=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield path + (key,)
            yield from _walk(value, path + (key,))


def _edit(wire: dict, path: tuple, value=None, delete: bool = False) -> dict:
    wire = msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)  # deep copy
    node = wire
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return wire


def _near(value) -> st.SearchStrategy:
    """Values of the same wire type as `value`, where a decoder's unchecked assumptions live."""
    if isinstance(value, bool) or value is None:
        return MSGPACK_VALUES
    if isinstance(value, int):
        edges = [-1, 0, 1, 2, 3, 4, value - 1, value + 1, 2**16, 2**32, 2**63 - 1, 2**64 - 1]
        return st.sampled_from([x for x in edges if -(2**63) <= x < 2**64]) | st.integers(-(2**63), 2**64 - 1)
    if isinstance(value, float):
        return st.floats()
    if isinstance(value, str):
        return st.sampled_from(["", "f16", "u8", "f32", "vr", "vd", "er", "cs", "x"]) | st.text(max_size=4)
    if isinstance(value, bytes):
        return st.binary(max_size=len(value) + 8) | st.builds(
            lambda n, b: (value * 2)[:n] + b, st.integers(0, 2 * len(value)), st.binary(max_size=2))
    return MSGPACK_VALUES


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_mutated_fields(data: bytes, draw) -> None:
    """One to three edits (delete, any value, or a value of the same type) anywhere in a valid message."""
    wire = msgpack.unpackb(data, raw=False)
    for _ in range(draw.draw(st.integers(1, 3))):
        paths = list(_walk(wire))
        if not paths:
            break
        path = draw.draw(st.sampled_from(paths))
        old = wire
        for key in path:
            old = old[key] if isinstance(old, dict) else None
        action = draw.draw(st.sampled_from(["delete", "any", "near", "near"]))
        if action == "delete":
            wire = _edit(wire, path, delete=True)
        else:
            values = MSGPACK_VALUES | st.sampled_from([True, False, -1, 2**64 - 1, 1.5]) if action == "any" else _near(old)
            wire = _edit(wire, path, draw.draw(values))
    _decode_or_protocol_error(msgpack.packb(wire, use_bin_type=True))


ANY_VALUE = st.one_of(
    MSGPACK_VALUES, st.integers(-(2**70), 2**70), st.text(st.characters(categories=["Cs"]) | st.characters(max_codepoint=0x7F), max_size=4),
    st.lists(st.integers(-5, 2**66), max_size=4), st.lists(st.lists(st.integers(0, 3), max_size=2), max_size=3),
    st.builds(np.asarray, st.lists(st.floats(), max_size=4)),
    st.sampled_from([np.int64(3), np.uint64(2**64 - 1), np.float32("nan"), np.float16(1), np.array(5),
                     np.zeros((2, 2)), "\ud800", SamplingParams(), object(), _request().proposals, np.array(["a"]),
                     np.array([1, "a"], dtype=object)]),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([_request(), _request(history=None, params=None, prompt_len=None), _verdict(),
                        ErrorReply("c", "m", "s", "r"), CloseSession("s1")]), st.data())
def test_encode_refuses_what_decode_would(msg, draw) -> None:
    """Any field set to anything: encode raises ProtocolError, or its bytes decode back to the same bytes."""
    names = [f.name for f in dataclasses.fields(msg)]
    changes = {draw.draw(st.sampled_from(names)): draw.draw(ANY_VALUE) for _ in range(draw.draw(st.integers(1, 2)))}
    try:
        data = dataclasses.replace(msg, **changes).encode()
    except ProtocolError:
        return
    assert decode_any(data).encode() == data


def test_values_a_peer_would_refuse_are_refused_on_encode() -> None:
    for bad in (ErrorReply("c", "echo \ud800"), CloseSession("\udc80"), _request(session="\ud800"),
                ErrorReply("c", "é" * 600_000),  # 1.2 MB of UTF-8 in 600k characters
                _request(tokens=[[1], [2, 3]]), _request(draft_probs=[[0.5], [0.1, 0.2]])):  # ragged
        with pytest.raises(ProtocolError):
            bad.encode()


def test_error_messages_do_not_echo_a_megabyte() -> None:
    for junk in ({"v": 1, "t": "x" * 1_000_000}, {"v": b"\x00" * 900_000, "t": "vr"}):
        with pytest.raises(ProtocolError) as e:
            decode_any(msgpack.packb(junk))
        assert len(e.value.message) <= MAX_ERROR_MESSAGE
        ErrorReply(e.value.code, e.value.message).encode()


def test_deleting_any_required_field_fails() -> None:
    optional = {("rs",), ("n",), ("s",), ("id",), ("i",)}  # Verdict's residual pair, ErrorReply's optionals
    for data in VALID:
        wire = msgpack.unpackb(data, raw=False)
        for path in _walk(wire):
            if path in {("p",), ("h",), ("sp",), ("pl",)} or (data != VALID[0] and path in optional):
                continue
            with pytest.raises(ProtocolError):
                decode_any(msgpack.packb(_edit(wire, path, delete=True), use_bin_type=True))


def test_bool_where_int_expected() -> None:
    wire = msgpack.unpackb(_request().encode(), raw=False)
    with pytest.raises(ProtocolError) as e:
        decode_any(msgpack.packb(_edit(wire, ("r",), True), use_bin_type=True))
    assert e.value.code == "bad_field"
    with pytest.raises(ProtocolError):
        _request(round=True).encode()


def test_not_bytes_and_trailing_data() -> None:
    for bad in (None, "text", 12, [1]):
        with pytest.raises(ProtocolError):
            decode_any(bad)
    with pytest.raises(ProtocolError) as e:
        decode_any(VALID[0] + b"\x00")
    assert e.value.code == "bad_msgpack"
    assert decode_any(bytearray(VALID[0])) == decode_any(memoryview(VALID[0]))


def test_unknown_extra_keys_are_ignored() -> None:
    wire = msgpack.unpackb(_request().encode(), raw=False)
    wire["zz"] = {"future": [1, 2]}
    wire["p"]["new"] = b"\x00"
    assert decode_any(msgpack.packb(wire, use_bin_type=True)) == _request()


# ---- targeted negatives --------------------------------------------------------------------------------


def _reject(wire: dict, code: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_any(msgpack.packb(wire, use_bin_type=True))
    assert e.value.code == code, str(e.value)


def _wire(msg=None) -> dict:
    return msgpack.unpackb((msg or _request()).encode(), raw=False)


def test_wrong_version() -> None:
    _reject(_edit(_wire(), ("v",), 2), "bad_version")
    _reject(_edit(_wire(), ("v",), delete=True), "bad_version")


def test_wrong_type_tag() -> None:
    _reject(_edit(_wire(), ("t",), "zz"), "bad_type")
    with pytest.raises(ProtocolError) as e:
        VerifyRequest.decode(VALID[1])
    assert e.value.code == "bad_type"


def test_count_length_mismatch() -> None:
    wire = _wire()
    counts = np.frombuffer(wire["p"]["c"], np.uint8).copy()
    counts[0] += 1
    _reject(_edit(wire, ("p", "c"), counts.tobytes()), "bad_shape")
    _reject(_edit(wire, ("p", "d"), wire["p"]["d"][:-1]), "bad_shape")  # not a multiple of 2 bytes
    _reject(_edit(wire, ("x",), wire["x"][:-2]), "bad_shape")  # 2 tokens, 3 proposal rows


def test_index_out_of_vocab() -> None:
    wire = _wire()
    idx = np.frombuffer(wire["p"]["i"], "<u2").copy()
    idx[0] = 1000
    _reject(_edit(wire, ("p", "i"), idx.tobytes()), "bad_index")
    _reject(_edit(wire, ("x",), np.array([1, 2, 1000], "<u2").tobytes()), "bad_index")
    block = _request().proposals
    with pytest.raises(ProtocolError) as e:
        _request(proposals=dataclasses.replace(block, indices=block.indices - 1000)).encode()
    assert e.value.code == "bad_index"
    with pytest.raises(ProtocolError) as e:
        _request(tokens=np.array([1, -2, 3])).encode()
    assert e.value.code == "bad_index"


def test_duplicate_index_in_a_row() -> None:
    wire = _wire()
    idx = np.frombuffer(wire["p"]["i"], "<u2").copy()
    idx[1] = idx[0]
    _reject(_edit(wire, ("p", "i"), idx.tobytes()), "bad_index")


def _with_value(raw_value: int) -> dict:
    wire = _wire()
    vals = np.frombuffer(wire["p"]["d"], "<u2").copy()
    vals[0] = raw_value
    return _edit(wire, ("p", "d"), vals.tobytes())


def test_nan_probability() -> None:
    _reject(_with_value(0x7E00), "bad_prob")
    _reject(_with_value(0x7C00), "bad_prob")  # +inf


def test_negative_probability() -> None:
    _reject(_with_value(int(np.array([-0.5], np.float16).view(np.uint16)[0])), "bad_prob")


def test_all_zero_row() -> None:
    wire = _wire()
    counts = np.frombuffer(wire["p"]["c"], np.uint8)
    vals = np.frombuffer(wire["p"]["d"], "<f2").copy()
    vals[: counts[0]] = 0
    _reject(_edit(wire, ("p", "d"), vals.tobytes()), "bad_prob")


def test_oversize_payload() -> None:
    with pytest.raises(ProtocolError) as e:
        decode_any(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    assert e.value.code == "oversize"
    rng = np.random.default_rng(0)
    big = _block(rng, 151936, 60, 151936, "f16")  # 60 dense rows: 18 MB
    msg = _request(vocab_size=151936, tokens=np.zeros(60, np.int64), proposals=big, history=None, params=None,
                   prompt_len=None)
    with pytest.raises(ProtocolError) as e:
        msg.encode()
    assert e.value.code == "oversize"


def test_gamma_above_64() -> None:
    tokens = np.zeros(MAX_GAMMA + 1, "<u2").tobytes()
    _reject(_edit(_edit(_wire(), ("p",), delete=True), ("x",), tokens), "oversize")
    rng = np.random.default_rng(0)
    msg = _request(tokens=np.zeros(MAX_GAMMA + 1, np.int64), proposals=_block(rng, 1000, MAX_GAMMA + 1, 2, "f16"))
    with pytest.raises(ProtocolError) as e:
        msg.encode()
    assert e.value.code == "oversize"


def test_opening_digest_must_be_the_historys() -> None:
    _reject(_edit(_wire(), ("hd",), session_digest.of([9, 8, 7, 6, 8])), "bad_digest")
    _reject(_edit(_wire(), ("h",), np.array([9, 8, 1, 6, 7], "<u2").tobytes()), "bad_digest")
    with pytest.raises(ProtocolError) as e:
        _request(digest=session_digest.of([9, 8, 7, 6, 8])).encode()
    assert e.value.code == "bad_digest"
    assert VerifyRequest.decode(_request().encode()).digest == session_digest.of([9, 8, 7, 6, 7])


def test_digest_and_deadline_ranges() -> None:
    cont = {"history": None, "params": None, "prompt_len": None}
    assert VerifyRequest.decode(_request(digest=2**64 - 1, **cont).encode()).digest == 2**64 - 1
    for bad in ({"digest": 2**64, **cont}, {"digest": -1, **cont}, {"deadline": -1.0}, {"deadline": float("inf")},
                {"deadline": 5.0, **cont}):
        with pytest.raises(ProtocolError):
            _request(**bad).encode()
    _reject(_edit(_wire(_request(**cont)), ("hd",), 2**64 - 1 + 0.5), "bad_field")
    _reject(_edit(_wire(), ("dl",), delete=True), "bad_field")  # an opening request always says
    _reject(_edit(_wire(), ("dl",), float("nan")), "bad_field")
    assert "dl" not in _wire(_request(**cont))  # continuing requests do not spend uplink bytes on it


def test_history_length_differs_from_base() -> None:
    _reject(_edit(_wire(), ("b",), 6), "bad_shape")
    with pytest.raises(ProtocolError) as e:
        _request(base=4).encode()
    assert e.value.code == "bad_shape"


def test_other_request_invariants() -> None:
    cases = {
        "history[-1] != last_token": {"last_token": 8},
        "prompt_len > base": {"prompt_len": 6},
        "history without params": {"params": None},
        "gamma > 0 without proposals": {"proposals": None},
        "wrong value dtype": {"proposals": dataclasses.replace(_request().proposals, quant="u8")},
        "draft_probs > 1": {"draft_probs": np.array([0.5, 1.5, 0.1])},
        "draft_probs length": {"draft_probs": np.array([0.5])},
        "NaN sent_at": {"sent_at": float("nan")},
        "empty session": {"session": ""},
        "base 0": {"base": 0, "history": None, "params": None, "prompt_len": None},
    }
    for name, change in cases.items():
        with pytest.raises(ProtocolError):
            _request(**change).encode()
            pytest.fail(name)


def test_verdict_invariants() -> None:
    good = _verdict()
    for change in ({"token": -1, "residual": None}, {"token": 500}, {"n_accepted": -1}, {"verify_s": -1.0},
                   {"residual": _request().proposals}):
        with pytest.raises(ProtocolError):
            dataclasses.replace(good, **change).encode()


# ---- payload sizes -------------------------------------------------------------------------------------


def test_payload_sizes(capsys) -> None:
    table = {}
    for vocab in (49152, 151936):
        for quant in ("f16", "u8"):
            for k in (1, 8, 32, 256, vocab):
                table[vocab, quant, k] = payload_bytes_per_position(k, vocab, quant)
    with capsys.disabled():
        print("\nmarginal uplink bytes per draft position (gamma=4):")
        for (vocab, quant, k), b in table.items():
            print(f"  vocab={vocab:6d} quant={quant} K={'full' if k == vocab else k:>6}: {b:10.2f}")
    for vocab in (49152, 151936):
        ids = 2 if vocab <= 65536 else 4
        for quant, val in (("f16", 2), ("u8", 1)):
            for k in (1, 8, 32, 256):
                # token id + count byte + k * (id + value), plus at most a few bytes of bin-header growth
                assert 0 <= table[vocab, quant, k] - (ids + 1 + k * (ids + val)) <= 2
            assert abs(table[vocab, quant, vocab] - vocab * val) / (vocab * val) < 0.01
        assert table[vocab, "u8", 8] < table[vocab, "f16", 8] < table[vocab, "f16", 32]
    assert 30 <= table[49152, "f16", 8] <= 48
    assert abs(table[151936, "f16", 151936] - 151936 * 2) / (151936 * 2) < 0.01
    assert payload_bytes(_request()) == len(_request().encode())
