"""Logits -> probabilities, applied identically to the draft's and the target's logits.

Speculative decoding is lossless with respect to the *warped* target distribution, so both sides must apply
the request's temperature, top-p and min-new-tokens mask with the same code. Everything runs in float64
numpy so the edge and the device agree to the last bit on the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mask_eos(logits: np.ndarray, eos_ids: Sequence[int], generated: int, min_new_tokens: int) -> np.ndarray:
    """transformers' MinNewTokensLength: end-of-sequence is impossible until `min_new_tokens` exist.

    `logits` is [n, V] for n consecutive positions; row j is the choice of generated token `generated + j`.
    """
    n_masked = min(max(min_new_tokens - generated, 0), logits.shape[0])
    if n_masked == 0 or not eos_ids:
        return logits
    out = logits.copy()
    out[:n_masked, list(eos_ids)] = -np.inf
    return out


def warp(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """[n, V] logits -> [n, V] float64 probabilities. Temperature 0 is greedy: a one-hot argmax row."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 1:
        return warp(logits[None], temperature, top_p)[0]
    if temperature == 0:
        probs = np.zeros_like(logits)
        probs[np.arange(len(logits)), np.argmax(logits, axis=-1)] = 1.0
        return probs
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        probs = _top_p(probs, top_p)
    return probs


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of highest-probability tokens whose mass reaches top_p (at least one)."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = mass_before < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    out = np.where(keep, probs, 0.0)
    return out / out.sum(axis=-1, keepdims=True)
