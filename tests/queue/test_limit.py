"""``AdaptiveLimit`` and ``FixedLimit`` fed deterministic sample sequences: no clock, no loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadline.queue.limit import AdaptiveLimit, FixedLimit

BASE = 0.050  # a 50 ms model
TARGET = 0.010  # the lag target these tests set (the default is 3 ms)
BUSY = 0.007  # a loop busy with its runs but under the target: no idle growth


def saturate(limit: AdaptiveLimit, samples: int, latency: float = BASE, lag: float = 0.001) -> None:
    """``samples`` runs finish with every slot taken, each followed by one heartbeat."""
    for _ in range(samples):
        limit.observe_latency(latency, limit.value)
        limit.observe_lag(lag, limit.value)


def test_starts_at_its_initial_value_clamped_into_its_bounds() -> None:
    assert AdaptiveLimit(initial=32).value == 32
    assert AdaptiveLimit(initial=1, minimum=4).value == 4
    assert AdaptiveLimit(initial=500, maximum=64).value == 64


def test_rejects_bounds_that_cannot_hold() -> None:
    with pytest.raises(ValueError, match="minimum <= maximum"):
        AdaptiveLimit(minimum=10, maximum=5)
    with pytest.raises(ValueError, match="at least 1"):
        FixedLimit(0)


def test_a_fixed_limit_ignores_every_sample() -> None:
    limit = FixedLimit(32)
    for _ in range(100):
        limit.observe_latency(10.0, 32)
        limit.observe_lag(1.0, 32)
    assert limit.value == 32


def test_grows_to_its_maximum_while_latency_and_lag_stay_healthy() -> None:
    limit = AdaptiveLimit(initial=32, maximum=128)
    seen = [limit.value]
    for _ in range(2500):
        saturate(limit, 1)
        seen.append(limit.value)
    assert seen == sorted(seen)  # never shrinks on healthy samples
    assert limit.value == 128


def test_grows_by_its_headroom_per_round_of_runs_not_per_run() -> None:
    """Additive increase: a limit's worth of healthy runs adds about ``headroom`` slots (4),
    where adding it per run (Gradient2) would have added 0.8 per run, 32 in that round."""
    limit = AdaptiveLimit(initial=40, maximum=256, lag_target_s=TARGET)
    saturate(limit, 40, lag=BUSY)
    assert 43 <= limit.value <= 44
    saturate(limit, 44, lag=BUSY)
    assert 47 <= limit.value <= 48


def test_an_idle_loop_with_every_slot_taken_lets_runs_in_within_a_second() -> None:
    """Runs that wait on a slow model (a streamed reply takes seconds) finish too rarely for
    latency samples to grow the limit; the idle loop does, by a few percent a heartbeat. The
    limit held at 32 for as long as no run finished before."""
    limit = AdaptiveLimit(initial=32, maximum=256, lag_target_s=TARGET)
    seen = [limit.value]
    for _ in range(100):  # one second of 10 ms heartbeats, not one run finished
        limit.observe_lag(0.001, limit.value)
        seen.append(limit.value)
    assert seen == sorted(seen)
    assert limit.value >= 200


def test_at_the_default_target_an_idle_loop_still_lets_runs_in() -> None:
    """The default target is low (3 ms: a saturated loop lags in spikes), and an idle loop's
    heartbeats still read as idle under it: an idle uvloop's lag p99 was 0.43 ms here."""
    limit = AdaptiveLimit(initial=32, maximum=256)
    for _ in range(100):
        limit.observe_lag(0.0004, limit.value)
    assert limit.value >= 200
    busy = AdaptiveLimit(initial=32, maximum=256)
    for _ in range(100):
        busy.observe_lag(0.004, busy.value)  # over the default target: cut, never grown
    assert busy.value < 32


def test_an_idle_loop_does_not_grow_it_while_slots_are_free_or_latency_climbs() -> None:
    free = AdaptiveLimit(initial=32, lag_target_s=TARGET)
    for _ in range(100):
        free.observe_lag(0.001, 31)  # one slot free: nobody waits for one
    assert free.value == 32
    climbing = AdaptiveLimit(initial=32, lag_target_s=TARGET)
    saturate(climbing, 300, lag=BUSY)
    for _ in range(10):  # runs got slower than their baseline: a provider queues
        climbing.observe_latency(4 * BASE, climbing.value)
    before = climbing.value
    for _ in range(100):
        climbing.observe_lag(0.001, climbing.value)
    assert climbing.value <= before


def test_idle_growth_stops_once_the_runs_let_in_keep_the_loop_busy() -> None:
    """The loop lags 0.1 ms per run in flight: idle growth takes the limit to where the
    average lag reaches a quarter of the target (25 runs), overshooting by the few heartbeats the
    average takes to follow."""
    limit = AdaptiveLimit(initial=8, maximum=256, lag_target_s=TARGET)
    for _ in range(500):
        limit.observe_lag(0.0001 * limit.value, limit.value)
    assert 25 <= limit.value <= 30


def test_one_late_heartbeat_does_not_shrink_it() -> None:
    """A young-generation collection or one large request stalls the loop once (45 ms was
    seen at saturation); the average over a few heartbeats stays under the target. Before
    the average, that one heartbeat cut the limit by 15 %."""
    limit = AdaptiveLimit(initial=64, lag_target_s=TARGET)
    for lag in [0.003] * 20 + [0.045] + [0.003] * 20:
        limit.observe_lag(lag, 40)  # most slots taken, none waited for: no idle growth
    assert limit.value == 64


def test_a_loop_idle_between_waves_of_ending_streams_still_lets_runs_in() -> None:
    """Streams of a slow model that started together end together: each wave stalls the
    loop once (20 ms here, every 8th heartbeat), the loop idles in between. With every slot
    taken the limit grows to let the waiting streams in (at the default target, 3 ms).
    Judged by the average lag, each wave kept the loop from counting as idle for a dozen
    heartbeats, and the cuts took the limit to its minimum."""
    limit = AdaptiveLimit(initial=32, maximum=256)
    for _ in range(60):
        for lag in [0.0003] * 7 + [0.020]:
            limit.observe_lag(lag, limit.value)
    assert limit.value > 200


def test_does_not_grow_while_less_than_half_its_slots_are_taken() -> None:
    limit = AdaptiveLimit(initial=32)
    for _ in range(1000):
        limit.observe_latency(BASE, 15)
        limit.observe_lag(0.5, 15)  # a loop lagging for reasons other than runs, too
    assert limit.value == 32


def test_shrinks_when_latency_rises_against_its_baseline() -> None:
    limit = AdaptiveLimit(initial=32, maximum=128)
    saturate(limit, 2500)
    assert limit.value == 128
    seen = []
    for _ in range(30):
        saturate(limit, 1, latency=4 * BASE)
        seen.append(limit.value)
    assert seen == sorted(seen, reverse=True)
    assert limit.value < 128 / 2


def test_a_single_slow_run_moves_the_limit_only_a_little() -> None:
    limit = AdaptiveLimit(initial=32, maximum=128)
    saturate(limit, 2500)
    limit.observe_latency(20 * BASE, limit.value)
    assert limit.value >= 128 * 0.9


def test_shrinks_while_the_loop_lags_more_than_its_target_and_never_grows_meanwhile() -> None:
    limit = AdaptiveLimit(initial=64, lag_target_s=TARGET)
    seen = [limit.value]
    for _ in range(400):
        limit.observe_lag(4 * TARGET, limit.value)
        limit.observe_latency(BASE, limit.value)  # latency looks fine: no help
        seen.append(limit.value)
    assert seen == sorted(seen, reverse=True)
    assert limit.value == limit.minimum


def test_a_lagging_loop_cuts_it_once_per_window_of_heartbeats() -> None:
    """Runs let in take a few heartbeats to show in the lag: one cut per window (8), by
    ``target / lag`` smoothed, never one per heartbeat. Cutting on each compounded: a few
    hundred ms of lag while 200 streams finished together took the limit from 200 to 19."""
    limit = AdaptiveLimit(initial=200, maximum=256, lag_target_s=TARGET)
    for _ in range(16):
        limit.observe_lag(4 * TARGET, 200)
    assert limit.value == int(200 * 0.9 * 0.9)  # two cuts to 0.8 + 0.2 * 0.5 of the limit


def test_lag_under_the_target_does_not_shrink_it() -> None:
    limit = AdaptiveLimit(initial=64, lag_target_s=TARGET)
    for _ in range(100):
        limit.observe_lag(TARGET, 64)  # at the target is healthy
    assert limit.value == 64


def test_grows_back_once_lag_and_latency_are_healthy_again() -> None:
    limit = AdaptiveLimit(initial=64, lag_target_s=TARGET)
    saturate(limit, 400, lag=5 * TARGET)
    low = limit.value
    saturate(limit, 200)
    assert low == limit.minimum
    assert limit.value > 4 * low


@pytest.mark.parametrize("capacity", [8, 40, 150])
def test_settles_where_the_loop_starts_to_lag(capacity: int) -> None:
    """A loop whose lag grows by 2 ms per run beyond ``capacity``: the limit settles just
    above it, where lag reaches the target, and stays in a narrow band."""
    limit = AdaptiveLimit(initial=32, minimum=4, maximum=256, lag_target_s=TARGET)
    seen = []
    for _ in range(6000):
        running = limit.value
        limit.observe_latency(BASE, running)
        limit.observe_lag(0.001 + 0.002 * max(0, running - capacity), running)
        seen.append(limit.value)
    settled = seen[-1000:]
    at_target = capacity + (TARGET - 0.001) / 0.002
    assert at_target - 10 <= min(settled) <= max(settled) <= at_target + 10


samples = st.lists(
    st.tuples(
        st.sampled_from(["latency", "lag"]),
        st.floats(min_value=0.0, max_value=120.0, allow_nan=False),
        st.integers(min_value=0, max_value=1000),
    ),
    max_size=300,
)


@given(
    samples,
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=300),
)
def test_stays_within_its_bounds_whatever_it_is_fed(
    fed: list[tuple[str, float, int]], minimum: int, span: int, initial: int
) -> None:
    limit = AdaptiveLimit(initial=initial, minimum=minimum, maximum=minimum + span)
    for kind, seconds, in_flight in fed:
        if kind == "latency":
            limit.observe_latency(seconds, in_flight)
        else:
            limit.observe_lag(seconds, in_flight)
        assert minimum <= limit.value <= minimum + span


@given(st.floats(min_value=0.001, max_value=60.0))
def test_steady_latency_never_shrinks_it(latency: float) -> None:
    """Whatever the model's latency, while each run takes as long as the one before it the
    limit only grows: latency is judged against its own baseline, not an absolute."""
    limit = AdaptiveLimit(initial=16)
    before = limit.value
    for _ in range(50):
        limit.observe_latency(latency, limit.value)
        assert limit.value >= before
        before = limit.value
    assert limit.value > 16
