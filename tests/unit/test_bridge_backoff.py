"""The bridge's retry policy (`provisioning.Backoff`): fast first retries, a cap that grows with
failures, full jitter for reconnects, and what that means for a fleet that lost its server together."""

from __future__ import annotations

import heapq
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.bridge.provisioning import Backoff


@settings(max_examples=200, deadline=None)
@given(initial=st.floats(0.01, 30), maximum=st.floats(0.01, 3600), failures=st.integers(1, 120),
       seed=st.integers(0, 2**32))
def test_full_jitter_waits_lie_between_zero_and_a_cap_that_doubles_to_the_maximum(
        initial: float, maximum: float, failures: int, seed: int) -> None:
    b = Backoff(initial, maximum, full_jitter=True, rng=random.Random(seed))
    cap = max(initial, maximum)
    for k in range(failures):
        wait = b.next()
        expected_cap = min(cap, initial * 2.0 ** k)
        assert math.isclose(b.current, expected_cap, rel_tol=1e-9)
        assert 0.0 <= wait <= b.current
    b.reset()
    assert b.next() <= initial


def test_the_first_retries_stay_fast_and_the_cap_reaches_the_maximum() -> None:
    rng = random.Random(7)
    firsts, seconds = [], []
    for _ in range(500):
        b = Backoff(0.5, 5.0, full_jitter=True, rng=rng)
        firsts.append(b.next())
        seconds.append(b.next())
    assert max(firsts) <= 0.5 and max(seconds) <= 1.0
    assert min(firsts) < 0.05 and max(firsts) > 0.45  # spread over the whole range, not bunched
    b = Backoff(0.5, 5.0, full_jitter=True, rng=rng)
    waits = [b.next() for _ in range(200)]
    assert max(waits) <= 5.0 and max(waits[10:]) > 4.5 and b.current == 5.0


def test_fractional_jitter_keeps_its_pace() -> None:
    b = Backoff(30, 1800, jitter=0)
    assert [b.next() for _ in range(8)] == [30, 60, 120, 240, 480, 960, 1800, 1800]
    b.reset()
    assert b.next() == 30
    j = Backoff(0.5, 5, jitter=0.2)
    for _ in range(20):
        assert 0.4 <= j.next() <= 6.0


def reconnects_per_second(devices: int, outage_s: float, maximum: float, seed: int) -> tuple[list[int], float]:
    """A fleet that lost its server at t=0: every attempt fails at once while the server is down,
    succeeds once it is back. Returns CONNECTs at the server per second after its return, and the
    time until the last device was back."""
    rng = random.Random(seed)
    backoffs = [Backoff(0.5, maximum, full_jitter=True, rng=rng) for _ in range(devices)]
    attempts = [(b.next(), i) for i, b in enumerate(backoffs)]
    heapq.heapify(attempts)
    bins: dict[int, int] = {}
    last = 0.0
    for _ in range(devices * 10_000):
        if not attempts:
            break
        t, i = heapq.heappop(attempts)
        if t < outage_s:
            heapq.heappush(attempts, (t + backoffs[i].next(), i))
            continue
        bins[int(t - outage_s)] = bins.get(int(t - outage_s), 0) + 1
        last = t - outage_s
    assert not attempts
    return [bins.get(s, 0) for s in range(int(last) + 1)], last


def test_a_fleet_sized_cap_keeps_the_reconnect_peak_under_the_ceiling() -> None:
    """The rule documented for fleets: reconnect_max_s >= 3 x devices / ceiling (CONNECTs/s)."""
    devices, ceiling = 200, 50
    maximum = 3 * devices / ceiling
    for seed in range(5):
        per_s, back_after = reconnects_per_second(devices, 60.0, maximum, seed)
        assert sum(per_s) == devices
        assert max(per_s) < ceiling, per_s
        assert back_after <= maximum
    # the default cap (5 s) brings the same fleet back faster, and with a higher peak
    per_s, back_after = reconnects_per_second(devices, 60.0, 5.0, 0)
    assert back_after <= 5.0 and max(per_s) > ceiling


def test_one_device_is_back_within_seconds_of_the_servers_return() -> None:
    for outage in (0.2, 1.0, 5.0, 60.0, 3600.0):
        backs = sorted(reconnects_per_second(1, outage, 5.0, seed)[1] for seed in range(50))
        assert backs[-1] <= 5.0
        if outage <= 1.0:  # a blip: most devices are back within a second
            assert backs[len(backs) // 2] < 1.0, backs
