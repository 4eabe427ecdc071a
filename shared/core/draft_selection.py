"""Which draft tokens to verify when a forward pass cannot take them all (TETRIS, Wu et al. 2025).

Under load the verifier gives each forward pass a token budget. Every session in the batch costs at least
one row (the target's own token: a correction or a bonus), and each draft token it verifies one more. Verifying
only a PREFIX of a session's proposals is lossless: it is exactly the round the device would have sent had it
drafted fewer tokens (the accept tests and the residual of the kept positions do not depend on the dropped
ones), so the output is still distributed as the target's.

Draft token i of a row is accepted only if every token before it is, so its expected contribution is the
product of the estimated acceptance probabilities up to i. The estimate is the draft's own probability of the
token it sampled, q_i(x_i), which the verifier already receives (1 under greedy: then all rows tie and the
budget is shared round-robin). Those products fall along a row, so taking the largest marginal gain first is
optimal for the sum over the batch.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def select_prefixes(confidences: Sequence[Sequence[float]], budget: int) -> list[int]:
    """How many draft tokens of each row to verify: k_b <= len(row b), sum(k_b + 1) <= budget, maximising
    the expected accepted tokens sum_b sum_{i < k_b} prod_{j <= i} a_bj. Needs budget >= len(confidences).

    Ties go to the row with fewer tokens chosen, then to the earlier row (fair round-robin under greedy).
    """
    if budget < len(confidences):
        raise ValueError(f"a budget of {budget} tokens cannot give each of {len(confidences)} rows its one row")
    chosen = [0] * len(confidences)
    spare = budget - len(confidences)
    survive = [1.0] * len(confidences)  # probability that row b's first chosen[b] tokens are all accepted
    heap: list[tuple[float, int, int]] = []

    def push(b: int) -> None:
        row = confidences[b]
        if chosen[b] < len(row):
            gain = survive[b] * min(max(float(row[chosen[b]]), 0.0), 1.0)
            heapq.heappush(heap, (-gain, chosen[b], b))

    for b in range(len(confidences)):
        push(b)
    while spare > 0 and heap:
        neg_gain, _, b = heapq.heappop(heap)
        survive[b] = -neg_gain
        chosen[b] += 1
        spare -= 1
        push(b)
    return chosen


def expected_accepted(confidences: Sequence[float], k: int) -> float:
    """The objective for one row: sum over the first k tokens of the probability all up to it are accepted."""
    total, survive = 0.0, 1.0
    for a in confidences[:k]:
        survive *= min(max(float(a), 0.0), 1.0)
        total += survive
    return total
