"""Noticing a worker that stays up but no longer takes messages, and restarting its consumer.

Celery over Redis has known states, after a connection reset, where the worker process lives on and
never reads its queues again (celery #10205; docs/jobs.md: outages). A `ConsumptionWatchdog`
looks every `check_s` seconds at two facts:
- which queues this worker should be consuming right now (not the bulk queue while backpressure has
  paused it) hold messages, asked of the broker (`waiting`);
- when this worker last received a message (`received()`, called for every message it takes).
When messages have been waiting for `stall_s` seconds and nothing was received meanwhile, it logs a
warning and calls `restart` (the service has Celery's consumer rebuild its broker connection); then it
gives the restart another `stall_s` before judging again. It never ends the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("stylequeue.worker.consumption")


class ConsumptionStalled(ConnectionError):
    """Raised on Celery's event loop to make its consumer reconnect as after a lost connection."""


class ConsumptionWatchdog:
    """Restart consumption when messages wait for this worker and it takes none (see the module docstring).

    Args:
        waiting: the queues this worker should consume now that hold messages; may raise while the
            broker is unreachable (the consumer is reconnecting then anyway).
        restart: ask the consumer to restart; called from the watchdog's thread.
        stall_s: how long messages may wait with nothing received.
        check_s: seconds between looks (default stall_s / 5).
        clock: monotonic seconds (tests inject their own).
    """

    def __init__(self, *, waiting: Callable[[], Sequence[str]], restart: Callable[[], None], stall_s: float,
                 check_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.waiting = waiting
        self.restart = restart
        self.stall_s = stall_s
        self.check_s = check_s if check_s is not None else stall_s / 5
        self.clock = clock
        self.restarts = 0
        self._received_at = clock()
        self._restarted_at = float("-inf")
        self._waiting_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="consumption-watchdog", daemon=True)

    def received(self) -> None:
        """This worker took a message (called per message: one clock read)."""
        self._received_at = self.clock()

    def check(self) -> bool:
        """One look; True when it asked for a restart."""
        now = self.clock()
        try:
            queues = list(self.waiting())
        except Exception as exc:  # broker unreachable: the consumer is reconnecting; judge afresh later
            log.debug("consumption watchdog: cannot see the queues: %s", exc)
            queues = []
        if not queues:
            self._waiting_since = None
            return False
        if self._waiting_since is None:
            self._waiting_since = now
        quiet_since = max(self._waiting_since, self._received_at, self._restarted_at)
        if now - quiet_since < self.stall_s:
            return False
        self.restarts += 1
        self._restarted_at = now
        log.warning("messages have waited in %s for %.0f s and this worker took none: restarting its consumer "
                    "(restart %d)", ", ".join(queues), now - quiet_since, self.restarts)
        self.restart()
        return True

    def start(self) -> ConsumptionWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                self.check()
            except Exception:  # the watchdog must outlive its own failures
                log.exception("consumption watchdog: unexpected error")

