"""Backpressure (worker/backpressure.py): the bulk queue's high-water mark follows how fast the worker finishes
jobs, on a fake clock; and the service applies each decision to Celery's consumer whatever order its loop runs
them in."""

from __future__ import annotations

import pytest

from stylequeue.broker import BULK_CHUNK_SIZE
from stylequeue.config.settings import Settings
from stylequeue.worker.backpressure import HOLD_S, MAX_HELD, RATE_WINDOW_S, Backpressure
from stylequeue.worker.service import WorkerOptions, WorkerService


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def busy(bp: Backpressure, clock: Clock, jobs: int, seconds: float) -> None:
    """`jobs` finish over `seconds` of busy time (the worker holding jobs throughout)."""
    bp.update(inflight=1)  # busy from now
    clock.now += seconds
    bp.finished(jobs)
    bp.update(inflight=1)


def make(min_water: int = 2 * BULK_CHUNK_SIZE) -> tuple[Backpressure, Clock]:
    clock = Clock()
    return Backpressure(min_water, clock=clock), clock


def test_the_mark_starts_small_and_grows_with_the_finish_rate() -> None:
    bp, clock = make()
    assert bp.high_water == bp.min_water == 2 * BULK_CHUNK_SIZE  # one chunk in hand, one arriving
    assert bp.low_water == bp.high_water * 3 // 4
    busy(bp, clock, 300, 1.0)  # 300 jobs/s: hold about two seconds of them
    assert abs(bp.high_water - HOLD_S * 300) <= 3 and bp.low_water == bp.high_water * 3 // 4
    busy(bp, clock, 5000, 1.0)  # a GPU worker's pace: two seconds of the smoothed rate
    assert abs(bp.high_water - HOLD_S * (300 + 5000) / 2) <= 3
    busy(bp, clock, 50_000, 1.0)  # faster than any card: capped
    assert bp.high_water == MAX_HELD


def test_a_slow_worker_holds_the_minimum() -> None:
    bp, clock = make(min_water=256)
    busy(bp, clock, 4, 1.0)  # a CPU worker at 4 img/s
    assert bp.high_water == bp.min_water == 256


def test_the_rate_is_re_derived_once_per_window_of_busy_time() -> None:
    bp, clock = make()
    busy(bp, clock, 300, 1.0)
    mark = bp.high_water
    busy(bp, clock, 10_000, 0.001)  # a moment later: the window has not filled again
    assert bp.high_water == mark


def test_a_fast_worker_is_measured_within_a_fifth_of_the_window() -> None:
    bp, clock = make()
    busy(bp, clock, bp.min_water, RATE_WINDOW_S / 10)  # too soon to judge
    assert bp.high_water == bp.min_water
    busy(bp, clock, 2 * bp.min_water, RATE_WINDOW_S / 5)  # 768 jobs in 0.15 s: plainly fast
    assert bp.high_water == MAX_HELD
    slow, slow_clock = make()
    busy(slow, slow_clock, 10, RATE_WINDOW_S / 2)  # few jobs: it waits for the whole window
    assert slow.high_water == slow.min_water


def test_idle_time_does_not_read_as_a_slow_worker() -> None:
    bp, clock = make()
    bp.update(inflight=0)
    clock.now += 30  # idle for half a minute before a burst
    busy(bp, clock, 1000, RATE_WINDOW_S)  # then 1,000 jobs in half a second of work
    assert abs(bp.high_water - HOLD_S * 2000) <= 3  # 2,000 jobs/s, not 1,000 jobs over 30 s


def test_pause_at_high_water_resume_at_low_water() -> None:
    bp, _ = make()
    assert not bp.update(bp.high_water - 1) and not bp.paused
    assert bp.update(bp.high_water) and bp.paused
    assert not bp.update(bp.low_water + 1) and bp.paused
    assert bp.update(bp.low_water) and not bp.paused


def service(max_batch: int = 8) -> WorkerService:
    # Nothing connects: the store's client is lazy and start() is never called.
    return WorkerService(Settings(redis_url="redis://127.0.0.1:1/0", max_batch=max_batch), WorkerOptions(),
                         app=None)  # type: ignore[arg-type]


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
    worker._consumer, worker.executor = consumer, executor  # type: ignore[assignment]
    executor.held = worker.backpressure.high_water
    worker._flow()  # pause
    executor.held = 0
    worker._flow()  # resume, before the loop ran the pause
    consumer.run_pending(reverse)
    assert "stylequeue.bulk" in consumer.consuming and not worker.backpressure.paused
    executor.held = worker.backpressure.high_water
    worker._flow()
    consumer.run_pending(reverse)
    assert "stylequeue.bulk" not in consumer.consuming and worker.backpressure.paused
    assert "stylequeue.interactive" in consumer.consuming  # interactive jobs are never paused



def test_a_raised_floor_holds_a_group_for_every_codec_process() -> None:
    """A worker whose floor held two messages while one codec process took each group measured its own
    starvation as its rate (12 MP JPEGs on an H200: 14 codec processes, 2-3 of them busy)."""
    bp, clock = make(min_water=256)
    bp.raise_floor(14 * 64 + 128)
    assert bp.high_water == bp.min_water == 1024 and bp.low_water == 768
    busy(bp, clock, 100, 1.0)  # slow photos: the rate alone would say 200
    assert bp.high_water == 1024
    bp.raise_floor(100)  # a lower floor changes nothing
    assert bp.min_water == 1024
