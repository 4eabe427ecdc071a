"""`tiny-random`: a small random Llama built from a config, for fast deterministic tests.

Same seed, same weights, on any machine and in any process, without touching the global torch RNG.
The logits are 260 wide while the tokenizer has 259 ids, as with real models whose embedding matrix is
padded past the tokenizer: code must use `vocab_size`, not `len(tokenizer)`.
"""

from __future__ import annotations

import torch

from .byte_tokenizer import ByteTokenizer

SEED = 20240601


def build_tiny_random() -> tuple[torch.nn.Module, ByteTokenizer]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = ByteTokenizer()
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # Larger than the usual 0.02 so the logits are far from uniform (argmax is meaningful), small enough
        # that fp32 cached-vs-full differences stay ~1e-6.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.to(torch.float32).eval(), tokenizer
