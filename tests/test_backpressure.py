"""The bulk queue's high-water mark follows how fast the worker finishes jobs (worker/service.py)."""

from __future__ import annotations

import time

import pytest

from stylequeue.config.settings import Settings
from stylequeue.worker.messages import BULK_CHUNK_SIZE
from stylequeue.worker.service import HOLD_S, MAX_HELD, RATE_WINDOW_S, WorkerOptions, WorkerService


def service(max_batch: int = 8) -> WorkerService:
    # Nothing connects: the store's client is lazy and start() is never called.
    return WorkerService(Settings(redis_url="redis://127.0.0.1:1/0", max_batch=max_batch), WorkerOptions(),
                         app=None)  # type: ignore[arg-type]


def finish(worker: WorkerService, jobs: int, seconds: float) -> None:
    """Pretend `jobs` finished over the last `seconds` of busy time, then let the marks follow."""
    worker._busy_s += seconds
    worker._finished += jobs
    worker._follow_rate(busy=True)


def test_the_mark_starts_small_and_grows_with_the_finish_rate() -> None:
    worker = service()
    assert worker.high_water == worker.min_water == 2 * BULK_CHUNK_SIZE  # one chunk in hand, one arriving
    assert worker.low_water == worker.high_water * 3 // 4
    finish(worker, 300, 1.0)  # 300 jobs/s: hold about two seconds of them
    assert abs(worker.high_water - HOLD_S * 300) <= 3 and worker.low_water == worker.high_water * 3 // 4
    finish(worker, 5000, 1.0)  # very fast: capped
    assert worker.high_water == MAX_HELD


def test_a_slow_worker_holds_the_minimum() -> None:
    worker = service(max_batch=64)
    finish(worker, 4, 1.0)  # a CPU worker at 4 img/s
    assert worker.high_water == worker.min_water == 256


def test_the_rate_is_re_derived_once_per_window_of_busy_time() -> None:
    worker = service()
    finish(worker, 300, 1.0)
    mark = worker.high_water
    worker._finished += 10_000
    worker._follow_rate(busy=True)  # a moment later: the window has not filled again
    assert worker.high_water == mark


def test_a_fast_worker_is_measured_within_a_fifth_of_the_window() -> None:
    worker = service()
    finish(worker, worker.min_water, RATE_WINDOW_S / 10)  # too soon to judge
    assert worker.high_water == worker.min_water
    finish(worker, 2 * worker.min_water, RATE_WINDOW_S / 5)  # 384 jobs in 0.15 s: plainly fast
    assert worker.high_water == MAX_HELD
    slow = service()
    finish(slow, 10, RATE_WINDOW_S / 2)  # few jobs: it waits for the whole window
    assert slow.high_water == slow.min_water and slow._busy_s > 0


def test_idle_time_does_not_read_as_a_slow_worker() -> None:
    worker = service()
    worker._clock = (time.monotonic() - 30, False)  # idle for half a minute before a burst
    worker._follow_rate(busy=True)  # the burst's first jobs arrive
    assert worker._busy_s < RATE_WINDOW_S and worker.high_water == worker.min_water
    worker._clock = (time.monotonic() - RATE_WINDOW_S, True)  # half a second busy since, 1,000 jobs done
    worker._finished += 1000
    worker._follow_rate(busy=True)
    assert worker.high_water == MAX_HELD  # 2,000 jobs/s, not 1,000 jobs over 30 s


class FakeConsumer:
    """Celery's consumer as the service sees it; its event loop runs pending callbacks in any order."""

    def __init__(self) -> None:
        self.consuming = {"stylequeue.interactive", "stylequeue.bulk"}
        self.pending: list = []
        self.hub = self
        self.task_consumer = self

    def call_soon(self, callback, *args) -> None:
        self.pending.append((callback, args))

    def consuming_from(self, queue: str) -> bool:
        return queue in self.consuming

    def cancel_task_queue(self, queue: str) -> None:
        self.consuming.discard(queue)

    def add_task_queue(self, queue: str) -> None:
        self.consuming.add(queue)

    def run_pending(self, reverse: bool) -> None:
        pending, self.pending = self.pending, []
        for callback, args in reversed(pending) if reverse else pending:
            callback(*args)


class FakeExecutor:
    def __init__(self) -> None:
        self.held = 0

    def inflight(self) -> int:
        return self.held


@pytest.mark.parametrize("reverse", [False, True])
def test_pause_then_resume_ends_consuming_whatever_order_the_loop_runs_them(reverse: bool) -> None:
    worker = service()
    consumer, executor = FakeConsumer(), FakeExecutor()
    worker._consumer, worker.executor = consumer, executor
    executor.held = worker.high_water
    worker._flow()  # pause
    executor.held = 0
    worker._flow()  # resume, before the loop ran the pause
    consumer.run_pending(reverse)
    assert "stylequeue.bulk" in consumer.consuming and not worker._bulk_paused
    executor.held = worker.high_water
    worker._flow()
    consumer.run_pending(reverse)
    assert "stylequeue.bulk" not in consumer.consuming and worker._bulk_paused
    assert "stylequeue.interactive" in consumer.consuming  # interactive jobs are never paused

