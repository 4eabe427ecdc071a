"""The shared retry backoff: growth, cap, jitter bounds and reset."""

import random

import pytest

from draftwire.shared.core.backoff import Backoff


def test_delays_grow_to_the_cap_without_jitter():
    b = Backoff(initial=0.1, cap=0.5, jitter=False)
    assert [round(b.next(), 3) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.next() == pytest.approx(0.1)


def test_jittered_delays_stay_within_half_to_full_ceiling():
    b = Backoff(initial=0.1, cap=1.0, rng=random.Random(3))
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for c in ceilings:
        assert c / 2 <= b.next() <= c


@pytest.mark.parametrize("kw", [{"initial": 0}, {"initial": 1, "cap": 0.5}, {"factor": 0.5}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(**kw)
