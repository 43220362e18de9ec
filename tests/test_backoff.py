"""The one rule every retry loop waits by (src/moorage/backoff.py): doubling to a cap, with jitter."""

from __future__ import annotations

import random

import pytest

from moorage.backoff import Backoff, nth

pytestmark = pytest.mark.cluster


def test_waits_double_to_the_cap_within_their_jitter_and_start_again_after_reset():
    random.seed(7)
    b = Backoff(0.1, 1.0)
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    waits = [b.next() for _ in steps]
    for wait, step in zip(waits, steps):
        assert step / 2 <= wait <= step
    b.reset()
    assert 0.05 <= b.next() <= 0.1


def test_jitter_spreads_the_waits_of_loops_that_failed_together():
    # Twenty processes whose etcd came back at the same moment: their third waits differ.
    thirds = set()
    for _ in range(20):
        b = Backoff(1.0, 30.0)
        b.next(), b.next()
        thirds.add(round(b.next(), 3))
    assert len(thirds) > 10 and min(thirds) >= 2.0 and max(thirds) <= 4.0


def test_least_bounds_the_jitter():
    assert all(0 <= Backoff(1.0, 1.0, least=0).next() <= 1.0 for _ in range(100))
    assert [Backoff(1.0, 8.0, least=1).next() for _ in range(3)] == [1.0, 1.0, 1.0]
    assert nth(1, 0.2, 5.0, least=1) == 0.2
    assert nth(4, 0.2, 5.0, least=1) == pytest.approx(1.6)
    assert nth(10_000, 0.2, 5.0, least=1) == 5.0   # a loop that counts very far does not overflow


@pytest.mark.parametrize("first, cap, least", [(0, 1, 0.5), (2, 1, 0.5), (0.1, 1, 1.5), (0.1, 1, -0.1)])
def test_a_backoff_that_could_not_wait_sensibly_is_refused(first, cap, least):
    with pytest.raises(ValueError):
        Backoff(first, cap, least)
