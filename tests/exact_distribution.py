"""The target's exact distribution of generated tokens, and the chi-square tests against it.

Every statistical losslessness test (in-process engine, pipelining on a real transformer, the services) uses
these helpers, for positive tests and negative controls alike, so a planted bug is judged by exactly the
statistic that passes the correct code. Two statistics:

- `chi_square_pvalue` on the joint of the first few tokens, against `exact_prefixes`: the target's
  distribution enumerated from the target model alone (its logits, the request's EOS mask, temperature and
  top-p), never from the engine under test, as a tree of prefixes, each extended by every token of nonzero
  probability, an EOS ending its branch. Branches less likely than `min_prob` are not expanded; their mass
  stays in a "rest" cell that sampled sequences outside the enumerated tree fall into, so the partition is
  still exact.
- `conditional_pvalue` on every token of long generations, each against the target's row given its prefix:
  for what happens only after the first round (pipelining), where enumerating the joint is out of reach.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np
from scipy import stats

from draftwire.shared.core.params import SamplingParams
from draftwire.shared.core.warpers import mask_eos, warp

MIN_EXPECTED = 5.0  # the usual validity condition of the chi-square approximation
REST = "rest"


def exact_prefixes(
    model, prompt: Sequence[int], params: SamplingParams, length: int, min_prob: float = 0.0
) -> dict[tuple[int, ...], float]:
    """P(the generation starts with t) for every t of `length` tokens (or fewer, ending in EOS) that is at
    least `min_prob` likely; the missing mass belongs to prefixes that are not."""
    seq = model.new_sequence()
    eos = tuple(model.eos_token_ids)
    out: dict[tuple[int, ...], float] = {}

    def expand(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == length or (prefix and prefix[-1] in eos):
            out[prefix] = prob
            return
        logits = seq.next_logits([*prompt, *prefix], 1).numpy()
        logits = mask_eos(logits, eos, len(prefix), params.min_new_tokens)
        row = warp(logits, params.temperature, params.top_p)[0]
        for token in np.flatnonzero(row):
            p = prob * float(row[token])
            if p >= min_prob:
                expand((*prefix, int(token)), p)

    expand((), 1.0)
    return out


def chi_square_pvalue(
    samples: Iterable[Sequence[int]],
    exact: dict[tuple[int, ...], float],
    key: Callable[[tuple[int, ...]], Hashable] = lambda t: t,
) -> float:
    """p-value of "the samples' first tokens are distributed as `exact`".

    A sample counts in the cell key(its prefix) when its prefix was enumerated, else in the rest cell; the
    prefix length is that of `exact`'s keys. Cells expected to hold fewer than MIN_EXPECTED samples are
    pooled with the rest, and a rest cell still below it with the smallest other cell.
    """
    length = max(len(t) for t in exact)
    counts = Counter(key(t) if (t := tuple(int(x) for x in s[:length])) in exact else REST for s in samples)
    n = sum(counts.values())
    probs: dict[Hashable, float] = {}
    for t, p in exact.items():
        probs[key(t)] = probs.get(key(t), 0.0) + p
    cells = [c for c, p in probs.items() if p * n >= MIN_EXPECTED]
    rest_p = max(1.0 - sum(probs[c] for c in cells), 0.0)
    rest_n = n - sum(counts[c] for c in cells)
    if cells and rest_p * n < MIN_EXPECTED:
        smallest = min(cells, key=probs.__getitem__)
        cells.remove(smallest)
        rest_p, rest_n = rest_p + probs[smallest], rest_n + counts[smallest]
    observed = np.array([counts[c] for c in cells] + [rest_n], dtype=np.float64)
    expected = np.array([probs[c] for c in cells] + [rest_p], dtype=np.float64)
    if expected[-1] <= 0:
        if observed[-1] > 0:
            return 0.0  # a sequence the target cannot produce
        observed, expected = observed[:-1], expected[:-1]
    if len(observed) < 2:
        raise ValueError("fewer than two cells: the target is (almost) deterministic here, nothing to test")
    return float(stats.chisquare(observed, expected / expected.sum() * n).pvalue)


def generate_seeds(engine, prompt, params: SamplingParams, spec, samples: int) -> list[list[int]]:
    """The token ids of `samples` generations with seeds 0..samples-1, on one event loop (a loop per
    generation doubles the cost on the bigram toy)."""

    async def run() -> list[list[int]]:
        return [(await engine.agenerate(prompt, dataclasses.replace(params, seed=s), spec)).token_ids
                for s in range(samples)]

    return asyncio.run(run())


def conditional_pvalue(
    model,
    prompt: Sequence[int],
    params: SamplingParams,
    outputs: Iterable[Sequence[int]],
    categorize: Callable[[int, np.ndarray], np.ndarray],
) -> float:
    """p-value of "every generated token was drawn from the target's row given the tokens before it".

    Sees every token of long generations, not only the first few: each token is one draw whose distribution
    the target states exactly (one forward pass over the sample). `categorize(previous token, row)` maps each
    vocabulary id to a category; the statistic compares the category counts with their conditional
    expectations, D = sum(onehot - pi), against their conditional covariance C = sum(diag(pi) - pi pi^T):
    T = D^T C^+ D is asymptotically chi-square with rank(C) degrees of freedom (martingale central limit
    theorem). With categories (previous token, token) on a bigram target it is the classical Markov-chain
    goodness-of-fit test. Categories expected fewer than MIN_EXPECTED times in all are pooled into one.
    """
    eos = tuple(model.eos_token_ids)
    observed, probs = [], []
    for out in outputs:
        out = [int(t) for t in out]
        logits = model.new_sequence().next_logits([*prompt, *out[:-1]], len(out)).numpy()
        rows = warp(mask_eos(logits, eos, 0, params.min_new_tokens), params.temperature, params.top_p)
        for prev, token, row in zip([prompt[-1], *out[:-1]], out, rows, strict=True):
            cat = categorize(prev, row)
            if row[token] <= 0:
                return 0.0  # a token the target cannot produce here
            observed.append(cat[token])
            probs.append(np.bincount(cat, weights=row, minlength=int(cat.max()) + 1))
    k = max(len(p) for p in probs)
    pi = np.zeros((len(probs), k))
    for i, p in enumerate(probs):
        pi[i, : len(p)] = p
    small = pi.sum(0) < MIN_EXPECTED
    if small.any():  # pool the rare categories (a linear map of the counts: the statistic stays valid)
        pi = np.column_stack([pi[:, ~small], pi[:, small].sum(1)])
        remap = np.full(k, pi.shape[1] - 1)
        remap[~small] = np.arange(int((~small).sum()))
        observed = remap[np.asarray(observed)]
    onehot = np.zeros_like(pi)
    onehot[np.arange(len(pi)), observed] = 1.0
    d = (onehot - pi).sum(0)
    cov = np.diag(pi.sum(0)) - pi.T @ pi
    w, v = np.linalg.eigh(cov)
    keep = w > 1e-9 * w.max()
    if not keep.any():
        raise ValueError("every draw was certain: nothing to test")
    t = float((((v[:, keep].T @ d) ** 2) / w[keep]).sum())
    return float(stats.chi2.sf(t, int(keep.sum())))


def by_previous_token(vocab: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """Categories (previous token, token): for a bigram target, the transition counts."""
    return lambda prev, row: prev * vocab + np.arange(vocab)


def by_rank(buckets: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """Categories by the token's rank in the target's row (0 = most likely), the last bucket pooling the tail:
    for a target whose rows are not a function of one previous token."""

    def categorize(prev: int, row: np.ndarray) -> np.ndarray:
        rank = np.empty(len(row), dtype=np.int64)
        rank[np.argsort(-row, kind="stable")] = np.arange(len(row))
        return np.minimum(rank, buckets - 1)

    return categorize
