"""A bigram "language model" behind the runtime interface, for fast statistical tests of the engine.

Its next-token distribution depends only on the previous token, so the exact joint distribution of the first
generated tokens is known in closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class BigramSequence:
    def __init__(self, log_table: np.ndarray) -> None:
        self._log = log_table
        self.tokens: list[int] = []

    def next_logits(self, tokens: Sequence[int], n_out: int = 1) -> torch.Tensor:
        self.tokens = list(tokens)
        rows = [self._log[t] for t in tokens[len(tokens) - n_out :]]
        return torch.tensor(np.stack(rows), dtype=torch.float32)

    def rollback(self, length: int) -> None:
        del self.tokens[length:]

    def __len__(self) -> int:
        return len(self.tokens)


class BigramModel:
    dtype = "fp32"

    def __init__(self, table: np.ndarray, name: str = "bigram", eos: tuple[int, ...] = ()) -> None:
        self.table = table
        self.name = name
        self.vocab_size = table.shape[1]
        self.eos_token_ids = eos
        # float32 logits, as a real model emits; the float32 table is the ground truth
        self.log_table = np.log(np.maximum(table, 1e-30)).astype(np.float32)

    def encode(self, text: str) -> list[int]:
        return [int(c) % self.vocab_size for c in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids)

    def new_sequence(self) -> BigramSequence:
        return BigramSequence(self.log_table)


def bigram_pair(vocab: int, seed: int, agreement: float | None = None) -> tuple[BigramModel, BigramModel]:
    """An unrelated draft by default; with `agreement` a peaked target and a draft mixed from it (high alpha)."""
    rng = np.random.default_rng(seed)
    if agreement is None:
        target = BigramModel(rng.dirichlet(np.ones(vocab), size=vocab), "target")
        draft = BigramModel(rng.dirichlet(np.full(vocab, 0.5), size=vocab), "draft")
        return target, draft
    table = rng.dirichlet(np.full(vocab, 0.2), size=vocab)
    noise = rng.dirichlet(np.ones(vocab), size=vocab)
    return BigramModel(table, "target"), BigramModel(agreement * table + (1 - agreement) * noise, "draft")
