"""Backpressure: how many claimed jobs a worker holds before it stops taking bulk messages.

A worker holds about HOLD_S seconds of its own work: enough that its job threads and batcher never run dry
between messages, little enough that a message's jobs do not wait in this worker long (a waiting claimed
job is invisible to other workers). The mark follows the worker's measured finish rate, within
[min_water, MAX_HELD]. Pure: no Celery, no Redis; `WorkerService` applies the decision to the consumer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

HOLD_S = 2.0
# The cap on HOLD_S of work. At 1,024 an H200 worker (about 2,000-3,000 img/s at 256 px) held a third of a
# second: it paused and resumed the bulk queue three times a second and its card idled a third of the time
# while each resume took effect (bench/gpu.py, docs/performance.md).
MAX_HELD = 8192
# The finish rate is re-measured over every RATE_WINDOW_S of busy time (time holding jobs), or over a
# fifth of it once the worker finished min_water jobs in that time.
RATE_WINDOW_S = 0.5


class Backpressure:
    """Pause the bulk queue at `high_water` held jobs; resume at `low_water` (three quarters of it).

    A paused queue takes a moment to resume (a poll cycle, then Celery's intake), so resuming starts while the
    worker still holds work for that moment.
    """

    def __init__(self, min_water: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_water = min_water
        self.high_water = min_water
        self.paused = False
        self.rate = 0.0  # jobs finished per busy second, smoothed
        self._clock = clock
        self._finished = 0
        self._rate_base = 0  # jobs finished when the current window began
        self._busy_s = 0.0  # busy seconds in the current window
        self._last: tuple[float, bool] = (clock(), False)  # last look: when, and busy then
        self._lock = threading.Lock()

    @property
    def low_water(self) -> int:
        return self.high_water * 3 // 4

    def raise_floor(self, min_water: int) -> None:
        """Hold at least `min_water` jobs from now on (the marks move up with it; never down)."""
        with self._lock:
            self.min_water = max(self.min_water, min_water)
            self.high_water = max(self.high_water, self.min_water)

    def finished(self, count: int = 1) -> None:
        with self._lock:
            self._finished += count

    def update(self, inflight: int) -> bool:
        """Look at how many jobs the worker holds now; True when `paused` changed."""
        with self._lock:
            self._follow_rate(busy=inflight > 0)
            if not self.paused and inflight >= self.high_water:
                self.paused = True
                return True
            if self.paused and inflight <= self.low_water:
                self.paused = False
                return True
            return False

    def _follow_rate(self, busy: bool) -> None:
        """Re-derive the marks from the jobs finished per busy second, once per RATE_WINDOW_S of it.

        Only time spent holding jobs counts: a worker idle before a burst must not read as a slow one (it would
        then hold the minimum for seconds into the burst).
        """
        now = self._clock()
        last, was_busy = self._last
        self._last = (now, busy)
        if was_busy:
            self._busy_s += now - last
        done = self._finished - self._rate_base
        # A full window, or sooner where the evidence is already plain: a fast worker that finished the whole
        # minimum mark within a tenth of a second need not hold the minimum for half a second.
        if self._busy_s < RATE_WINDOW_S and (self._busy_s < RATE_WINDOW_S / 5 or done < self.min_water):
            return
        rate = done / self._busy_s
        self.rate = rate if self.rate == 0 else (self.rate + rate) / 2
        self._busy_s, self._rate_base = 0.0, self._finished
        self.high_water = int(min(MAX_HELD, max(self.min_water, HOLD_S * self.rate)))
