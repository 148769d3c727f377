"""The watchdog's and the renewal's cadence (``next_due``): start to start, without I/O.

The takeover bound counts watchdog passes of ``LEASE_TTL_MS / 4``; a loop that slept a whole
interval after each pass ran one pass per interval plus the pass's own time, so a slow pass
under load pushed every later pass back. (A CI chaos run once saw a takeover 0.15 s past its
bound; whether this was the cause is not known.)
"""

from __future__ import annotations

from threadline.coordination.redis import next_due


def test_a_step_starts_one_interval_after_the_last_start_whatever_it_took() -> None:
    starts = [0.0]
    for took in (0.0, 0.3, 0.49):  # each step's own time, all under the interval
        starts.append(next_due(starts[-1], 0.5, now=starts[-1] + took))
    assert starts == [0.0, 0.5, 1.0, 1.5]


def test_a_step_that_overran_is_followed_by_a_short_gap_not_a_catch_up_burst() -> None:
    after_slow = next_due(0.0, 0.5, now=1.7)  # the step took 3.4 intervals
    assert after_slow == 1.7 + 0.125  # a quarter interval: a Redis that is down gets a rest
    assert next_due(after_slow, 0.5, now=after_slow + 0.1) == after_slow + 0.5
