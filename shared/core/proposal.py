"""The draft's proposal distribution q, exactly as it crosses the wire.

TK-SLT stays lossless only if the edge knows q bit for bit. So the device never samples from its model's
softmax: it truncates to the top K, quantizes the kept probabilities for the wire (float16, or 8-bit fixed
point scaled to the row maximum), and renormalises the *quantized* values in float64. That renormalised row
is what the device samples its draft token from and what `dequantize` rebuilds on the edge from the same
bytes: quantize-then-sample. K >= vocab size is the dense `full` mode (no indices are sent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_U8_SCALE = 255.0


def quantize(values: np.ndarray, quant: str) -> np.ndarray:
    """Wire form of non-negative probabilities; the row maximum always survives, so a row never sums to 0."""
    values = np.asarray(values, dtype=np.float64)
    if quant == "f16":
        return (values / values.sum()).astype(np.float16)
    if quant == "u8":
        return np.rint(values / values.max() * _U8_SCALE).astype(np.uint8)
    if quant == "f32":
        return (values / values.sum()).astype(np.float32)
    raise ValueError(f"unknown quantization {quant!r}; expected 'f16', 'u8' or 'f32'")


def dequantize(raw: np.ndarray) -> np.ndarray:
    """The exact q both sides use: the quantized row renormalised in float64."""
    q = raw.astype(np.float64)
    return q / q.sum()


def sample_index(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF sampling with a caller-supplied uniform u in [0, 1); never returns a zero-probability slot."""
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    # u * total can round up to total itself: fall back to the last slot that has mass
    return i if i < len(probs) else int(np.flatnonzero(probs)[-1])


@dataclass(frozen=True, eq=False)
class ProposalBlock:
    """The proposals of one round's gamma draft positions, stored flat the way they go on the wire.

    Row i holds `counts[i]` entries: `indices[offsets[i]:offsets[i+1]]` (token ids) and the quantized
    `values` at the same slice. `indices is None` means dense rows over the whole vocabulary (`full` mode).
    """

    vocab_size: int
    quant: str
    counts: np.ndarray  # int64 [gamma]
    indices: np.ndarray | None  # int64 [sum(counts)], or None when dense
    values: np.ndarray  # float16 or uint8 [sum(counts)]

    @property
    def gamma(self) -> int:
        return len(self.counts)

    @property
    def dense(self) -> bool:
        return self.indices is None

    def _bounds(self, i: int) -> tuple[int, int]:
        start = int(self.counts[:i].sum())
        return start, start + int(self.counts[i])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, q) of position i, q renormalised in float64 exactly as the device sampled from it."""
        lo, hi = self._bounds(i)
        ids = np.arange(self.vocab_size) if self.indices is None else self.indices[lo:hi]
        return ids, dequantize(self.values[lo:hi])

    def prob_of(self, i: int, token: int) -> float:
        """q_i(token): 0.0 for a token outside the row's support."""
        ids, q = self.row(i)
        if self.indices is None:
            return float(q[token]) if 0 <= token < self.vocab_size else 0.0
        hit = np.flatnonzero(ids == token)
        return float(q[hit[0]]) if hit.size else 0.0

    def dense_row(self, i: int) -> np.ndarray:
        """q_i scattered over the whole vocabulary (for the residual max(0, p - q))."""
        ids, q = self.row(i)
        out = np.zeros(self.vocab_size, dtype=np.float64)
        out[ids] = q
        return out

    @classmethod
    def from_rows(cls, rows: list[tuple[np.ndarray | None, np.ndarray]], vocab_size: int, quant: str):
        """Assemble a block from `sparse_row` outputs (indices None for dense rows)."""
        if not rows:
            return cls(vocab_size, quant, np.zeros(0, np.int64), np.zeros(0, np.int64), _empty(quant))
        dense = rows[0][0] is None
        counts = np.array([len(v) for _, v in rows], dtype=np.int64)
        values = np.concatenate([v for _, v in rows])
        indices = None if dense else np.concatenate([ix for ix, _ in rows]).astype(np.int64)
        return cls(vocab_size, quant, counts, indices, values)


def _empty(quant: str) -> np.ndarray:
    return np.zeros(0, {"f16": np.float16, "u8": np.uint8, "f32": np.float32}[quant])


def sparse_row(probs: np.ndarray, k: int, quant: str) -> tuple[np.ndarray | None, np.ndarray]:
    """Top-K truncation + quantization of one position's (already warped) draft distribution.

    Returns (indices or None for dense, quantized values). Sparse rows keep at most K entries ordered by
    descending probability (ties by token id) and drop entries that are zero after quantization, so the
    support the edge sees is exactly the support the device can sample.
    """
    vocab = probs.shape[-1]
    if k >= vocab:
        return None, quantize(probs, quant)
    top = np.argpartition(-probs, k - 1)[:k]
    top = top[np.lexsort((top, -probs[top]))]
    top = top[probs[top] > 0]
    raw = quantize(probs[top], quant)
    keep = raw > 0
    return top[keep].astype(np.int64), raw[keep]


def support_row(probs: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """A target row for the downlink, as float32: its nonzero support when that is smaller than dense.

    DSSD's edge tests acceptance against `dequantize` of exactly these values (see `verification.split_verify`),
    so the device's correction from the same bytes is exact, whatever the row's size. Greedy rows are one entry.
    """
    support = np.flatnonzero(probs > 0)
    if 2 * len(support) >= len(probs):  # an id costs as much as a value: dense is smaller
        return None, quantize(probs, "f32")
    raw = quantize(probs[support], "f32")
    keep = raw > 0
    return support[keep].astype(np.int64), raw[keep]
