"""Seeded randomness that survives failover.

Each round draws from a generator derived from (seed, side, position): the device's draft sampling and the
edge's accept/resample draws are independent streams, and a verifier that replaces a crashed one (or a
session rebuilt from its token history) draws exactly what the lost one would have. So (seed, request)
always reproduces the same output, however the work was spread over instances.
"""

from __future__ import annotations

import numpy as np

DRAFT_SIDE = 0
VERIFY_SIDE = 1
CORRECTION_SIDE = 2  # DSSD: the device draws the correction from the residual


def round_rng(seed: int, side: int, position: int) -> np.random.Generator:
    """Generator for one round: `position` is the committed length (prompt + generated) at the round start."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, side, position])))
