"""How many runs may hold a concurrency slot at once: a fixed number, or one that adapts.

``AdaptiveLimit`` follows Netflix's concurrency-limits ``Gradient2Limit``
(github.com/Netflix/concurrency-limits, ``limit/Gradient2Limit.java``): compare a short-term
latency average with a long-term one, the baseline (first learnt at light load: a server
starts idle, and the averages learn even while the limit may not move). While the short one
stays within ``tolerance`` of the baseline the limit grows by a few slots per round of runs
(a limit's worth of them, like TCP's additive increase); once it climbs
above, the limit shrinks in proportion (never below half in one step). Every step is
smoothed, so one slow sample moves the limit a little, a trend moves it a lot.

The baseline is a moving average, not a minimum, on purpose (as in Gradient2): a model that
became slower for good, or answers of very different lengths, are learnt as normal instead of
pinning the limit at its floor. The price: latency that stays inflated is learnt too, within a
few long windows, so the latency signal catches a rise (a provider or the database pool
starting to queue as the limit grows), not a steady state.

Threadline adds a second signal, the event loop's lag, because its bottleneck is usually its
own core rather than the model: when the loop saturates, every run slows at once and the
latency baseline drifts up with them, while the lag measures the overload directly, against a
fixed target that nothing learns away. The lag is judged as a short average of heartbeats
(``lag_window``): one late heartbeat is a collection of the garbage collector or one large
request, not an overload, and cutting runs for it only throttles a healthy server; a
saturated loop makes every heartbeat late, which the average shows within a few. While the
average is above the target the limit shrinks by ``target / lag`` (smoothed the same way)
once per window of heartbeats, not on each: runs let in take a few heartbeats to show in the
lag, and cutting on every heartbeat of one episode compounded (200 streams finishing
together cut the limit from 200 to 19 in a second, then callers queued for a slot while the
loop idled). Meanwhile latency samples may not grow it.

The lag also grows the limit. Latency samples come one per finished run, so with a real
model (seconds per streamed reply) additive growth takes a minute to go from 32 runs to 200,
while the loop idles and callers wait for a slot. So while every slot is taken, most of the
latest heartbeats came within a quarter of the target (their median: an idle loop; a
saturated one lags 3-8 ms between its bursts, which half the target would count as idle) and
run latency is not climbing, each heartbeat grows the limit by a few percent
(``idle_growth``), like TCP's slow start: runs that wait on their model, not the CPU, are let
in within a second or two, and growth stops as soon as the runs let in make the loop busy.
Idleness is the median, not the average: streams that started together end together, and
each such wave stalls an otherwise idle loop once (20-100 ms with 200 streams of a 3 s
model); the average carried every wave for a dozen heartbeats, so the limit never grew
between them and callers waited for slots at 45 % of a core (docs/performance.md, "Slow
models: idleness by the median heartbeat").

Neither signal moves the limit while fewer than half of its slots are taken (Gradient2's
"app-limited" guard): an idle server learns nothing about its capacity, and a loop lagging
for other reasons (thousands of open streams) is not cured by refusing runs it is not running.

Pure: no clock, no I/O. The queue core feeds it samples (``queue/core.py``) and reads
``value``; tests feed it sequences.
"""

from __future__ import annotations

from collections import deque
from statistics import median
from typing import Protocol

# The event-loop lag the adaptive limit holds a saturated loop to, on average: the server's
# default too (ADAPTIVE_LAG_TARGET_MS, config.py), whose comment says why it is this low.
DEFAULT_LAG_TARGET_MS = 3.0


class ConcurrencyLimit(Protocol):
    """The limit the queue core enforces, and the samples that may move it."""

    @property
    def value(self) -> int:
        """Runs that may hold a slot now (>= 1)."""

    def observe_latency(self, seconds: float, in_flight: int) -> None:
        """A run that held a slot for ``seconds`` finished; ``in_flight`` runs held one."""

    def observe_lag(self, seconds: float, in_flight: int) -> None:
        """The event loop woke a heartbeat ``seconds`` late; ``in_flight`` runs held a slot."""


class FixedLimit:
    """An explicit ``MAX_CONCURRENT_RUNS``: samples change nothing."""

    def __init__(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"a concurrency limit must be at least 1, got {value!r}")
        self._value = value

    @property
    def value(self) -> int:
        return self._value

    def observe_latency(self, seconds: float, in_flight: int) -> None:
        pass

    def observe_lag(self, seconds: float, in_flight: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedLimit({self._value})"


class AdaptiveLimit:
    """Gradient2 on run latency, bounded by an event-loop lag target. See the module docstring.

    Defaults are Gradient2's (tolerance 1.5, smoothing 0.2, a long window of 600 samples, a
    headroom of 4) except the short window: Gradient2 takes each sample (or a windowed
    average) as the short-term latency; runs of one model vary a lot, so an average over a few
    keeps one slow answer from reading as a trend. The lag is averaged over 8 heartbeats
    (80 ms of an idle loop's 10 ms beats); an idle loop grows the limit by 2 % a heartbeat
    (``idle_growth`` 0.1, smoothed by 0.2): from 32 to 256 runs in about a second.
    """

    def __init__(
        self,
        *,
        initial: int = 32,
        minimum: int = 4,
        maximum: int = 256,
        lag_target_s: float = DEFAULT_LAG_TARGET_MS / 1000,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        short_window: int = 10,
        long_window: int = 600,
        headroom: float = 4.0,
        lag_window: int = 8,
        idle_growth: float = 0.1,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum!r} and {maximum!r}")
        if lag_target_s <= 0 or tolerance < 1 or not 0 < smoothing <= 1:
            raise ValueError("need lag_target_s > 0, tolerance >= 1 and 0 < smoothing <= 1")
        self.minimum = minimum
        self.maximum = maximum
        self._limit = float(min(max(initial, minimum), maximum))
        self._lag_target = lag_target_s
        self._tolerance = tolerance
        self._smoothing = smoothing
        self._headroom = headroom
        self._idle_growth = idle_growth
        self._short = _Average(short_window)
        self._long = _Average(long_window)
        self._lag = _Average(lag_window)
        # The latest heartbeats' own lags, whose median says whether the loop idles.
        self._beats: deque[float] = deque(maxlen=lag_window)
        self._lag_window = lag_window
        self._lagging = False
        # Heartbeats until a lagging loop may cut the limit again.
        self._cut_wait = 0
        # The latest latency gradient was below 1: runs take longer than their baseline
        # (a provider or the database pool queueing), so the idle loop is no reason to grow.
        self._latency_rising = False

    @property
    def value(self) -> int:
        return int(self._limit)

    def observe_latency(self, seconds: float, in_flight: int) -> None:
        if seconds <= 0:
            return
        short = self._short.add(seconds)
        long = self._long.add(seconds)
        # After a long overload the baseline has learned the slow latency; once latency is
        # back to well under it, let the baseline fall faster than its window would.
        if long / short > 2:
            long = self._long.scale(0.95)
        if self._app_limited(in_flight):
            return
        # 1 while latency stays within tolerance of the baseline; down to 0.5 as it grows.
        gradient = max(0.5, min(1.0, self._tolerance * long / short))
        self._latency_rising = gradient < 1.0
        # Headroom on top, so a healthy limit keeps probing upwards (Gradient2's queue size),
        # spread over a limit's worth of runs: +headroom per round of runs, as TCP's window
        # grows by one segment per round trip. Gradient2 adds it on every sample; at a few
        # hundred runs a second that outran the lag signal, and the limit see-sawed between
        # growing past the point where the loop lags and being cut back (docs/performance.md).
        target = self._limit * gradient + self._headroom / (self._smoothing * self._limit)
        if self._lagging:
            target = min(target, self._limit)
        self._move_towards(target)

    def observe_lag(self, seconds: float, in_flight: int) -> None:
        lag = self._lag.add(seconds)
        self._beats.append(seconds)
        self._lagging = lag > self._lag_target
        if not self._lagging:
            self._cut_wait = 0
        if self._app_limited(in_flight):
            return
        if self._lagging:
            self._cut_wait -= 1
            if self._cut_wait <= 0:
                self._cut_wait = self._lag_window
                self._move_towards(self._limit * max(0.5, self._lag_target / lag))
        elif (
            in_flight >= self.value
            and not self._latency_rising
            and median(self._beats) < self._lag_target / 4
        ):
            self._move_towards(self._limit * (1 + self._idle_growth))

    def _app_limited(self, in_flight: int) -> bool:
        return in_flight < self._limit / 2

    def _move_towards(self, target: float) -> None:
        smoothed = self._limit * (1 - self._smoothing) + target * self._smoothing
        self._limit = min(float(self.maximum), max(float(self.minimum), smoothed))

    def __repr__(self) -> str:
        return f"AdaptiveLimit({self.value}, between {self.minimum} and {self.maximum})"


class _Average:
    """An exponential moving average that starts as a plain mean over its first ``window``
    samples (so the first sample does not weigh as much as ``window`` of them)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"a window must hold at least 1 sample, got {window!r}")
        self._window = window
        self._count = 0
        self._value = 0.0

    def add(self, sample: float) -> float:
        self._count = min(self._count + 1, self._window)
        self._value += (sample - self._value) / self._count
        return self._value

    def scale(self, factor: float) -> float:
        self._value *= factor
        return self._value
