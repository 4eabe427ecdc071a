"""A tiny Llama GGUF written with the `gguf` package: real conversion code paths in about a second.

Matrices are Q8_0 (quantized blocks, as the catalog's models; the output layer is kept in them, raw), one is
F16 (kept in its own precision), the norms F32 with values that bfloat16 cannot hold exactly (so a rounding
through bf16 shows), and the tokenizer is byte-level BPE over the 256 byte symbols and two merges, so any text
round-trips. `tied=True` leaves out the output layer, so the model ties it to the embedding (as SmolLM2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
SPECIAL = ["<s>", "</s>"]
MERGES = [("h", "e"), ("Ġ", "t")]


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable unicode table (what byte-level BPE vocabularies are spelled in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0, tied: bool = False) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    rng = np.random.default_rng(seed)
    tokens = [*SPECIAL, *_byte_symbols(), *("".join(pair) for pair in MERGES)]
    vocab = len(tokens)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-gguf")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (vocab - 2))
    writer.add_token_merges([" ".join(pair) for pair in MERGES])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    def matrix(name: str, rows: int, cols: int, kind: str = "q8") -> None:
        w = (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)
        if kind == "f16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            q = quants.quantize(w, GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)

    def vector(name: str) -> None:
        writer.add_tensor(name, (1.0 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32))

    matrix("token_embd.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        vector(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        matrix(f"blk.{i}.attn_k.weight", HIDDEN * KV_HEADS // HEADS, HIDDEN)
        matrix(f"blk.{i}.attn_v.weight", HIDDEN * KV_HEADS // HEADS, HIDDEN, "f16" if i == 0 else "q8")
        matrix(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        vector(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    vector("output_norm.weight")
    if not tied:
        matrix("output.weight", vocab, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
