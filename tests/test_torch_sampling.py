"""The torch sampling path (shared/core/torch_sampling.py) against the numpy oracle, and device placement.

Every random round runs the device's real drafting math (numpy warp, top-K + quantization, sampling from
the dequantized row), then verifies it twice, with numpy and with torch, from generators with the same seed:
the Outcomes (and DSSD's SplitOutcome and downlink row) must be identical. Probabilities agree to ~1e-15, not
bit for bit (torch's exp and reduction orders differ from numpy's), which can flip an Outcome only for a
uniform within that distance of a boundary: never in these rounds.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from draftwire.shared.core import rejection_sampling as rs
from draftwire.shared.core import torch_sampling as ts
from draftwire.shared.core import warpers
from draftwire.shared.core.proposal import ProposalBlock, dequantize, sample_index, sparse_row, support_row
from draftwire.shared.models.errors import ModelError

EOS = (0, 3)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _draft(case: np.random.Generator, logits: np.ndarray, eos, generated, min_new, temperature, top_p, k, quant):
    """The device's drafting, as DraftSession does it: warp, top-K + quantize, sample the dequantized row."""
    tokens, rows = [], []
    for i in range(len(logits)):
        row = warpers.mask_eos(logits[i : i + 1], eos, generated + i, min_new)
        probs = warpers.warp(row, temperature, top_p)[0]
        ids, raw = sparse_row(probs, k, quant)
        slot = sample_index(dequantize(raw), case.random())
        tokens.append(slot if ids is None else int(ids[slot]))
        rows.append((ids, raw))
    return tokens, ProposalBlock.from_rows(rows, logits.shape[1], quant)


def _random_round(case: np.random.Generator) -> dict:
    vocab = int(case.choice([37, 256, 1000]))
    gamma = int(case.integers(1, 7))
    temperature = float(case.choice([0.0, 0.0, 0.6, 1.0, 1.7]))
    top_p = float(case.choice([1.0, 1.0, 0.9, 0.5]))
    k = int(case.choice([1, 4, 16, vocab]))
    quant = str(case.choice(["f16", "u8", "f32"]))
    generated, min_new = int(case.integers(0, 4)), int(case.integers(0, 6))
    scale = float(case.choice([1.0, 4.0]))
    draft_logits = (case.standard_normal((gamma + 1, vocab)) * scale).astype(np.float32)
    noise = float(case.choice([0.0, 0.05, 0.5, 2.0]))  # how far the target is from the draft: accept rates
    target_logits = (draft_logits + noise * scale * case.standard_normal(draft_logits.shape)).astype(np.float32)
    tokens, proposals = _draft(case, draft_logits[:gamma], EOS, generated, min_new, temperature, top_p, k, quant)
    return {"logits": target_logits, "tokens": tokens, "proposals": proposals, "temperature": temperature,
            "top_p": top_p, "generated": generated, "min_new": min_new, "seed": int(case.integers(2**32))}


def _np_probs(r: dict) -> np.ndarray:
    logits = warpers.mask_eos(r["logits"], EOS, r["generated"], r["min_new"])
    return warpers.warp(logits, r["temperature"], r["top_p"])


def _torch_probs(r: dict) -> torch.Tensor:
    logits = ts.mask_eos(_t(r["logits"]), EOS, r["generated"], r["min_new"])
    return ts.warp(logits, r["temperature"], r["top_p"])


def _np_dssd(probs: np.ndarray, tokens, draft_probs, rng):
    """The verifier's numpy DSSD path: rows rounded to their wire form, accept tests on them."""
    rows = [ProposalBlock.from_rows([support_row(row)], probs.shape[1], "f32") for row in probs]
    split = rs.split_verify(np.stack([row.dense_row(0) for row in rows]), tokens, draft_probs, rng)
    return split, None if split.rejected_row is None else rows[split.rejected_row]


def test_random_rounds_give_identical_outcomes_and_dssd_rows():
    case = np.random.default_rng(2024)
    seen = {"corrected": 0, "bonus": 0, "greedy_corrected": 0, "top_p_corrected": 0, "dssd_rejected": 0}
    for _ in range(400):
        r = _random_round(case)
        p_np, p_t = _np_probs(r), _torch_probs(r)
        assert p_t.dtype == torch.float64
        np.testing.assert_allclose(p_t.numpy(), p_np, rtol=1e-12, atol=1e-300)
        assert ((p_t.numpy() > 0) == (p_np > 0)).all()  # the same top-p and EOS support

        want = rs.verify_block(p_np, r["tokens"], r["proposals"], np.random.default_rng(r["seed"]))
        got = ts.verify_block(p_t, r["tokens"], r["proposals"], np.random.default_rng(r["seed"]))
        assert got == want, r
        seen["corrected" if want.corrected else "bonus"] += 1
        seen["greedy_corrected"] += want.corrected and r["temperature"] == 0
        seen["top_p_corrected"] += want.corrected and r["top_p"] < 1

        q_x = [r["proposals"].prob_of(i, x) for i, x in enumerate(r["tokens"])]
        split_np, row_np = _np_dssd(p_np, r["tokens"], q_x, np.random.default_rng(r["seed"]))
        split_t, row_t = ts.split_verify_wire(p_t, r["tokens"], q_x, np.random.default_rng(r["seed"]))
        assert split_t == split_np
        assert (row_t is None) == (row_np is None)
        if row_np is not None:
            seen["dssd_rejected"] += 1
            assert (row_t.indices is None) == (row_np.indices is None)
            if row_np.indices is not None:
                np.testing.assert_array_equal(row_t.indices, row_np.indices)
            assert row_t.values.dtype == np.float32
            np.testing.assert_allclose(row_t.values, row_np.values, rtol=2.5e-7)  # at most 1 float32 ulp
            # and the device draws the same correction from either downlink row
            j = split_np.rejected_row
            q_dense = r["proposals"].dense_row(j)
            for u in np.random.default_rng(j).random(5):
                assert rs.correction(row_t.dense_row(0), q_dense, u) == rs.correction(row_np.dense_row(0), q_dense, u)
    assert min(seen.values()) >= 10, seen


def test_dssd_accept_tests_read_the_rows_the_device_rebuilds(monkeypatch):
    """The accept tests must use p_j exactly as it crosses the wire (float32), not the float64 row."""
    probs = warpers.warp(np.random.default_rng(1).standard_normal((3, 300)), 1.0, 0.9)
    want = np.stack([ProposalBlock.from_rows([support_row(row)], 300, "f32").dense_row(0) for row in probs])
    seen = []
    real = ts.split_verify
    monkeypatch.setattr(ts, "split_verify", lambda p, *rest: seen.append(p) or real(p, *rest))
    ts.split_verify_wire(_t(probs), [1, 2], [0.5, 0.5], np.random.default_rng(0))
    np.testing.assert_allclose(seen[0].numpy(), want, rtol=1e-12, atol=0)
    assert not np.allclose(want, probs, rtol=1e-12, atol=0)  # the rounding is visible at this tolerance


def test_warp_ties_eos_and_greedy_match_exactly():
    case = np.random.default_rng(7)
    for _ in range(60):
        vocab = int(case.integers(5, 40))
        logits = case.integers(-3, 3, size=(4, vocab)).astype(np.float32)  # many ties, across the top-p cut
        for temperature in (0.0, 1.0):
            for top_p in (1.0, 0.25, 0.5, 0.75):
                for generated, min_new in ((0, 2), (1, 9), (3, 2)):
                    m_np = warpers.mask_eos(logits, EOS, generated, min_new)
                    m_t = ts.mask_eos(_t(logits), EOS, generated, min_new)
                    np.testing.assert_array_equal(m_t.numpy(), m_np)
                    p_np = warpers.warp(m_np, temperature, top_p)
                    p_t = ts.warp(m_t, temperature, top_p).numpy()
                    np.testing.assert_array_equal(p_t > 0, p_np > 0)  # same ties kept, same first argmax
                    np.testing.assert_allclose(p_t, p_np, rtol=1e-12)
    # a single row, as the draft side warps it
    np.testing.assert_allclose(ts.warp(_t(logits[0]), 0.8, 0.9).numpy(), warpers.warp(logits[0], 0.8, 0.9), rtol=1e-12)


def test_sample_index_matches_including_the_rounding_fallback():
    case = np.random.default_rng(3)
    for _ in range(300):
        probs = case.random(int(case.integers(1, 50))) * (case.random(1) < 0.8)
        probs[int(case.integers(len(probs)))] = case.random() + 0.01  # some mass
        for u in (0.0, case.random(), 1 - 2**-53):
            assert ts.sample_index(_t(probs), u) == sample_index(probs, u)
    # u * total reaching total (u = 1 here; the fallback guards against it) gives the last slot with mass
    probs = np.array([0.1, 0.0, 0.2, 0.0, 0.0])
    assert ts.sample_index(_t(probs), 1.0) == sample_index(probs, 1.0) == 2


def _outcome(fn, *args):
    try:
        return fn(*args)
    except (rs.VerificationError, ValueError, IndexError) as exc:
        return type(exc), str(exc)


def test_checks_raise_the_same_errors_as_numpy():
    vocab = 8
    logits = np.zeros((4, vocab), np.float32)
    logits[:, 5] = 10.0  # greedy p = one-hot on 5: tokens 5 are accepted for sure, so later checks are reached
    greedy = warpers.warp(logits, 0.0, 1.0)

    def both(probs, tokens, q_x, dssd=True):
        seed = 11
        if dssd:
            a = _outcome(rs.split_verify, probs, tokens, q_x, np.random.default_rng(seed))
            b = _outcome(ts.split_verify, _t(probs), tokens, q_x, np.random.default_rng(seed))
        else:
            block = ProposalBlock.from_rows([sparse_row(row, 2, "f32") for row in q_x], vocab, "f32")
            a = _outcome(rs.verify_block, probs, tokens, block, np.random.default_rng(seed))
            b = _outcome(ts.verify_block, _t(probs), tokens, block, np.random.default_rng(seed))
        assert a == b
        return a

    assert both(greedy, [5, 5, 5], [0.5, 0.5, 0.5]) == rs.SplitOutcome(3, 5, None)
    for bad_q, kind in ((math.nan, rs.NonFinite), (1.5, rs.NonFinite), (math.inf, rs.NonFinite),
                        (0.0, rs.VerificationError)):
        assert both(greedy, [5, 5, 5], [0.5, 0.5, bad_q])[0] is kind
    assert both(greedy, [2, 5, 5], [0.5, 0.5, math.nan]) == rs.SplitOutcome(0, None, 0)  # rejected before
    assert both(greedy, [5, 5, 9], [0.5, 0.5, 0.5])[0] is IndexError  # a token outside the vocabulary
    assert both(greedy, [5, 5], [0.5, 0.5])[0] is ValueError  # row count

    for broken in (math.nan, math.inf, -0.25):
        probs = greedy.copy()
        probs[2, 1] = broken
        assert both(probs, [5, 5, 5], [0.5, 0.5, 0.5])[0] is rs.NonFinite
    probs = greedy.copy()
    probs[3] = 0.0
    assert both(probs, [5, 5, 5], [0.5, 0.5, 0.5])[0] is rs.NonFinite  # a row without mass

    # NaN logits through the sampled warp: a NaN row, NonFinite (never an acceptance)
    nan_logits = np.random.default_rng(0).standard_normal((4, vocab)).astype(np.float32)
    nan_logits[1, 3] = math.nan
    q_rows = [np.full(vocab, 1 / vocab)] * 3
    with np.errstate(invalid="ignore"):
        got = both(warpers.warp(nan_logits, 1.0, 0.9), [5, 5, 5], q_rows, dssd=False)
    assert got[0] is rs.NonFinite
    assert np.isnan(ts.warp(_t(nan_logits), 1.0, 0.9).numpy()[1]).all()


def test_check_logits_refuses_nan_posinf_and_rows_without_a_finite_value():
    ok = torch.zeros(3, 6)
    ok[:, 2] = -math.inf  # a mask is legal
    ts.check_logits(ok)
    for row, col, value in ((1, 1, math.nan), (2, 4, math.inf)):
        bad = ok.clone()
        bad[row, col] = value
        with pytest.raises(rs.NonFinite):
            ts.check_logits(bad)
    bad = ok.clone()
    bad[0] = -math.inf
    with pytest.raises(rs.NonFinite):
        ts.check_logits(bad)


def test_residual_matches_including_p_equal_q():
    case = np.random.default_rng(9)
    for _ in range(50):
        p, q = (warpers.warp(case.standard_normal(40) * 3, 1.0, 0.7) for _ in range(2))
        for q_dense in (q, p):  # p == q: no mass above q, so p itself
            np.testing.assert_allclose(ts.residual(_t(p), _t(q_dense)).numpy(), rs.residual(p, q_dense), rtol=1e-12)


def test_dense_row_scatters_the_oracles_q():
    probs = warpers.warp(np.random.default_rng(5).standard_normal((3, 50)), 1.0, 1.0)
    for k in (4, 50):
        block = ProposalBlock.from_rows([sparse_row(row, k, "u8") for row in probs], 50, "u8")
        for i in range(3):
            np.testing.assert_array_equal(ts.dense_row(block, i, "cpu").numpy(), block.dense_row(i))


# --- device placement ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_cuda_without_cuda_is_a_model_error():
    from draftwire.shared.models.runtime import load_model, resolve_device

    for dtype in ("fp32", "int8"):
        with pytest.raises(ModelError, match="CUDA"):
            load_model("tiny-random", dtype, progress=False, device="cuda")
    with pytest.raises(ModelError, match="CUDA"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == torch.device("cpu")
    for bad in ("tpu", "meta", ""):
        with pytest.raises(ModelError, match="invalid device"):
            resolve_device(bad)


def test_loaded_model_records_its_device_and_sequences_feed_it():
    from draftwire.shared.models.runtime import LoadedModel, load_model

    tiny = load_model("tiny-random", "fp32", progress=False, device="auto")
    assert tiny.device == next(tiny.model.parameters()).device == torch.device("cpu" if not torch.cuda.is_available()
                                                                              else "cuda")
    assert tiny.new_sequence().device == tiny.device
    elsewhere = LoadedModel(tiny.name, tiny.dtype, tiny.model, tiny.tokenizer, device="meta")
    assert elsewhere.new_sequence().device == torch.device("meta")
    assert load_model("tiny-random", "int8", progress=False, device="auto").device == torch.device("cpu")

    class Recorder(torch.nn.Module):
        """Stands in for a model on another device: records where its inputs were built."""

        config = tiny.model.config
        device = torch.device("meta")

        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, input_ids, position_ids, use_cache, logits_to_keep=0, **cache_or_packing):
            self.seen += [input_ids.device, position_ids.device]
            return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], 7, device=input_ids.device))

    fake = Recorder()
    from draftwire.shared.models.kv_sequence import KVSequence

    logits = KVSequence(fake).next_logits([1, 2, 3], 2)
    assert fake.seen == [torch.device("meta")] * 2 and logits.device == torch.device("meta")


def test_device_flags_parse_and_reach_the_services(monkeypatch):
    from draftwire.services.cli import main as cli
    from draftwire.services.cli.stack import service_args
    from draftwire.shared.io.service_shell import add_model_flags, service_parser

    def parser(role):
        p = service_parser("verifier", "x")
        add_model_flags(p, role, "fp32")
        return p

    assert parser("target").parse_args([]).target_device == "cpu"
    assert parser("draft").parse_args(["--draft-device", "cuda"]).draft_device == "cuda"
    monkeypatch.setenv("DRAFTWIRE_TARGET_DEVICE", "auto")
    assert parser("target").parse_args([]).target_device == "auto"
    with pytest.raises(SystemExit):
        parser("target").parse_args(["--target-device", "tpu"])

    args = cli.build_parser().parse_args(["up", "--draft-device", "cuda"])
    assert (args.target_device, args.draft_device) == ("auto", "cuda")  # env default for the CLI too
    assert service_args("verifier", args)[:6] == ["--target-model", "smollm2-135m", "--target-dtype", "fp32",
                                                  "--target-device", "auto"]
    assert "--draft-device" in service_args("draft", args) and "cuda" in service_args("draft", args)
    bare = argparse.Namespace(target_model="m", target_dtype="fp32", torch_threads=1)
    assert "--target-device" not in service_args("verifier", bare)

    loads = []

    def fake_load(source, dtype="fp32", progress=True, device="cpu"):
        loads.append((source, device))
        if len(loads) == 2:
            raise ModelError("stop here")
        return object()

    monkeypatch.setattr("draftwire.shared.models.runtime.load_model", fake_load)
    assert cli.main(["generate", "--local", "hi", "--target-device", "cuda", "--draft-device", "cpu"]) == 2
    assert loads == [("smollm2-135m", "cuda"), ("smollm2-135m", "cpu")]
