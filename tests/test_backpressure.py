"""The bulk queue's high-water mark follows how fast the worker finishes jobs (worker/service.py)."""

from __future__ import annotations

import time

from stylequeue.config.settings import Settings
from stylequeue.worker.service import HOLD_S, MAX_HELD, WorkerOptions, WorkerService


def service(max_batch: int = 8) -> WorkerService:
    # Nothing connects: the store's client is lazy and start() is never called.
    return WorkerService(Settings(redis_url="redis://127.0.0.1:1/0", max_batch=max_batch), WorkerOptions(),
                         app=None)  # type: ignore[arg-type]


def finish(worker: WorkerService, jobs: int, seconds: float) -> None:
    """Pretend `jobs` finished over the last `seconds`, then let the marks follow."""
    since, count = worker._rate_since
    worker._rate_since = (time.monotonic() - seconds, count)
    worker._finished += jobs
    worker._follow_rate()


def test_the_mark_starts_small_and_grows_with_the_finish_rate() -> None:
    worker = service()
    assert worker.high_water == worker.min_water == 128 and worker.low_water == 96
    finish(worker, 300, 1.0)  # 300 jobs/s: hold about two seconds of them
    assert abs(worker.high_water - HOLD_S * 300) <= 3 and worker.low_water == worker.high_water * 3 // 4
    finish(worker, 5000, 1.0)  # very fast: capped
    assert worker.high_water == MAX_HELD


def test_a_slow_worker_holds_the_minimum() -> None:
    worker = service(max_batch=64)
    finish(worker, 4, 1.0)  # a CPU worker at 4 img/s
    assert worker.high_water == worker.min_water == 256


def test_the_rate_is_re_derived_at_most_once_a_second() -> None:
    worker = service()
    finish(worker, 300, 1.0)
    mark = worker.high_water
    worker._finished += 10_000
    worker._follow_rate()  # less than a second later: unchanged
    assert worker.high_water == mark
