"""A rolling 64-bit digest of a session's committed token ids, so two generations are never confused.

Length and last token alone cannot tell apart two sessions that differ earlier (a reused session id, a
verifier holding another generation's cache under the same name); the device and the verifier each keep this
digest of their copy of the committed tokens, and a round is verified only when the two agree.

Each step is h' = splitmix64(h + (token + 1) * GOLDEN) mod 2**64. For a fixed h the step is a bijection in the
token, and for a fixed token a bijection in h, so two equal-length sequences that differ in exactly one
position never collide; otherwise a collision has probability about 2**-64. Not cryptographic: it guards
against accidents, not against a peer that wants to collide. Pure Python ints, a few hundred ns per token,
and incremental: `extend(extend(h, a), b) == extend(h, a + b)`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MASK = (1 << 64) - 1
EMPTY = 0  # the digest of no tokens
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def extend(h: int, ids: Iterable[int]) -> int:
    """The digest of (the tokens `h` digests) followed by `ids`."""
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()  # Python ints are several times faster to loop over than numpy scalars
    for t in ids:
        z = (h + (t + 1) * _GOLDEN) & MASK
        z = ((z ^ (z >> 30)) * _M1) & MASK
        z = ((z ^ (z >> 27)) * _M2) & MASK
        h = z ^ (z >> 31)
    return h


def of(ids: Iterable[int]) -> int:
    """The digest of a whole token sequence."""
    return extend(EMPTY, ids)
