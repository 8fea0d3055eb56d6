"""The consumption watchdog, on an injected clock: restarts a consumer that takes nothing while messages
wait for it, and only then; and what the worker service's restart does to Celery's consumer."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from stylequeue.broker import BULK_QUEUE, CALLBACK_QUEUE, INTERACTIVE_QUEUE
from stylequeue.config.settings import Settings
from stylequeue.worker.consumption import ConsumptionWatchdog
from stylequeue.worker.service import WorkerOptions, WorkerService
from tests.workers import wait_for


class Broker:
    """What the watchdog sees: the queues holding messages (or an unreachable broker), and the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waiting: list[str] = []
        self.down = False
        self.restarts = 0

    def clock(self) -> float:
        return self.now

    def queues(self) -> Sequence[str]:
        if self.down:
            raise ConnectionError("broker unreachable")
        return self.waiting

    def restart(self) -> None:
        self.restarts += 1


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
def watchdog(broker: Broker) -> ConsumptionWatchdog:
    return ConsumptionWatchdog(waiting=broker.queues, restart=broker.restart, stall_s=30, clock=broker.clock)


def run(broker: Broker, watchdog: ConsumptionWatchdog, seconds: float, *, receiving: bool = False) -> None:
    """Let `seconds` pass in 5 s looks, taking a message between looks when `receiving`."""
    for _ in range(int(seconds // 5)):
        broker.now += 5
        if receiving:
            watchdog.received()
        watchdog.check()


def test_messages_waiting_with_nothing_received_restart_the_consumer_once_per_stall(
        broker: Broker, watchdog: ConsumptionWatchdog, caplog: pytest.LogCaptureFixture) -> None:
    broker.waiting = ["stylequeue.interactive"]
    with caplog.at_level(logging.WARNING, "stylequeue.worker.consumption"):
        run(broker, watchdog, 25)
        assert broker.restarts == 0  # waiting, but not yet for stall_s
        run(broker, watchdog, 10)
        assert broker.restarts == 1
        run(broker, watchdog, 25)
        assert broker.restarts == 1  # the restart gets its own stall_s to take effect
        run(broker, watchdog, 10)
    assert broker.restarts == 2 and watchdog.restarts == 2
    assert "stylequeue.interactive" in caplog.text and "restarting its consumer" in caplog.text


def test_a_worker_taking_messages_from_a_backlog_is_left_alone(broker: Broker, watchdog: ConsumptionWatchdog) -> None:
    broker.waiting = ["stylequeue.bulk"]
    run(broker, watchdog, 300, receiving=True)
    assert broker.restarts == 0


def test_an_idle_worker_with_empty_queues_is_left_alone(broker: Broker, watchdog: ConsumptionWatchdog) -> None:
    run(broker, watchdog, 300)
    assert broker.restarts == 0


def test_the_stall_clock_starts_when_messages_begin_to_wait(broker: Broker, watchdog: ConsumptionWatchdog) -> None:
    run(broker, watchdog, 300)  # idle for long: nothing received, nothing waiting
    broker.waiting = ["stylequeue.interactive"]
    run(broker, watchdog, 25)
    assert broker.restarts == 0  # a message that just arrived is not a stall
    broker.waiting = []
    run(broker, watchdog, 5)  # taken: the queue emptied
    broker.waiting = ["stylequeue.interactive"]
    run(broker, watchdog, 25)
    assert broker.restarts == 0


def test_an_unreachable_broker_is_not_a_stall(broker: Broker, watchdog: ConsumptionWatchdog) -> None:
    broker.waiting = ["stylequeue.interactive"]
    run(broker, watchdog, 20)
    broker.down = True  # Redis restarting: the consumer is reconnecting by itself
    run(broker, watchdog, 60)
    assert broker.restarts == 0
    broker.down = False
    run(broker, watchdog, 25)
    assert broker.restarts == 0  # judged afresh once the broker answers
    run(broker, watchdog, 10)
    assert broker.restarts == 1


def test_the_watchdog_thread_outlives_a_failing_restart(broker: Broker) -> None:
    calls: list[int] = []

    def restart() -> None:
        calls.append(1)
        raise RuntimeError("event loop gone")

    watchdog = ConsumptionWatchdog(waiting=lambda: ["q"], restart=restart, stall_s=0.05, check_s=0.01).start()
    try:
        assert wait_for(lambda: len(calls) >= 2, timeout=10, interval=0.01)
    finally:
        watchdog.stop()


class Consumer:
    """Celery's consumer as the service's restart sees it."""

    def __init__(self, consuming: set[str]) -> None:
        self.consuming = consuming
        self.task_consumer = self

    def consuming_from(self, queue: str) -> bool:
        return queue in self.consuming

    def add_task_queue(self, queue: str) -> None:
        self.consuming.add(queue)


def test_a_restart_takes_the_wanted_queues_again_then_reconnects_the_consumer() -> None:
    worker = WorkerService(Settings(redis_url="redis://127.0.0.1:1/0"), WorkerOptions(), app=None)  # type: ignore[arg-type]
    worker._consumer = consumer = Consumer({CALLBACK_QUEUE})  # it stopped taking the job queues
    worker._consumed = [INTERACTIVE_QUEUE, BULK_QUEUE, CALLBACK_QUEUE]
    worker.backpressure.paused = True  # backpressure: the bulk queue stays off
    with pytest.raises(ConnectionError):  # Celery's consumer reconnects on a connection error from its loop
        worker._restart_consumer()
    assert consumer.consuming == {INTERACTIVE_QUEUE, CALLBACK_QUEUE}
