"""The dynamic batcher on its own: grouping, waiting, priorities, poison isolation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from stylequeue.jobs import Priority
from stylequeue.worker.batching import DynamicBatcher

INTERACTIVE, BULK = Priority.INTERACTIVE, Priority.BULK


class RecordingModel:
    """Doubles its input; remembers batch sizes and order of first items; can be made to fail."""

    def __init__(self, delay: float = 0.0, poison: float | None = None) -> None:
        self.delay = delay
        self.poison = poison
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait()
        self.batches.append([float(x[0, 0, 0]) for x in batch])
        if self.poison is not None and np.any(batch[:, 0, 0, 0] == self.poison):
            raise ValueError("poison")
        time.sleep(self.delay)
        return batch * 2


def img(value: float, size: int = 8) -> np.ndarray:
    return np.full((3, size, size), value, dtype=np.float32)


def test_each_caller_gets_its_own_result() -> None:
    batcher = DynamicBatcher(RecordingModel(), max_batch=4, max_wait_ms=5)
    futures = [batcher.submit(img(i)) for i in range(10)]
    for i, future in enumerate(futures):
        assert future.result(5)[0, 0, 0] == 2 * i
    batcher.close()


def test_items_arriving_together_form_batches() -> None:
    model = RecordingModel()
    model.gate.clear()
    batcher = DynamicBatcher(model, max_batch=4, max_wait_ms=50)
    futures = [batcher.submit(img(i)) for i in range(9)]
    model.gate.set()
    for f in futures:
        f.result(5)
    sizes = [len(b) for b in model.batches]
    assert sum(sizes) == 9 and max(sizes) == 4 and len(sizes) <= 4
    assert batcher.stats.items == 9
    batcher.close()


def test_a_group_handed_over_at_once_runs_in_full_batches_per_shape() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher(model, max_batch=4, max_wait_ms=10_000)  # only full batches run early
    arrays = [img(i, size=8 if i % 3 else 16) for i in range(12)]  # 8 of one shape, 4 of another
    outputs = batcher.submit_many(arrays, priority=BULK).result(5)
    assert [float(o[0, 0, 0]) for o in outputs] == [2.0 * i for i in range(12)]
    assert [o.shape[-1] for o in outputs] == [a.shape[-1] for a in arrays]
    assert sorted(map(sorted, model.batches)) == [[0, 3, 6, 9], [1, 2, 4, 5], [7, 8, 10, 11]]
    batcher.close()


def test_a_group_gets_each_outcome_and_a_poison_image_fails_alone() -> None:
    batcher = DynamicBatcher(RecordingModel(poison=3.0), max_batch=4, max_wait_ms=5)
    outcomes = batcher.submit_many([img(i) for i in range(6)]).result(5)
    assert isinstance(outcomes[3], ValueError)
    assert [float(o[0, 0, 0]) for i, o in enumerate(outcomes) if i != 3] == [0.0, 2.0, 4.0, 8.0, 10.0]
    assert batcher.submit_many([]).result(0) == []
    stuck = RecordingModel()
    stuck.gate.clear()
    slow = DynamicBatcher(stuck, max_batch=2, max_wait_ms=1)
    group = slow.submit_many([img(1), img(2), img(3)])
    with pytest.raises(TimeoutError):
        group.result(0.05)
    group.cancel()  # what a timed-out job does: its images not yet run are skipped
    stuck.gate.set()
    slow.close()
    assert [len(b) for b in stuck.batches] == [2] and not group.done()
    batcher.close()


def test_a_lone_item_runs_after_max_wait() -> None:
    batcher = DynamicBatcher(RecordingModel(), max_batch=8, max_wait_ms=20)
    started = time.monotonic()
    assert batcher.submit(img(1)).result(5)[0, 0, 0] == 2
    assert time.monotonic() - started < 2
    batcher.close()


def test_only_same_shapes_share_a_batch() -> None:
    model = RecordingModel()
    model.gate.clear()
    batcher = DynamicBatcher(model, max_batch=8, max_wait_ms=30)
    small = [batcher.submit(img(i, 8)) for i in range(3)]
    large = [batcher.submit(img(10 + i, 16)) for i in range(3)]
    model.gate.set()
    assert [f.result(5).shape for f in small] == [(3, 8, 8)] * 3
    assert [f.result(5).shape for f in large] == [(3, 16, 16)] * 3
    assert sorted(len(b) for b in model.batches) == [3, 3]
    batcher.close()


def test_interactive_items_jump_the_queue() -> None:
    model = RecordingModel(delay=0.01)
    model.gate.clear()
    batcher = DynamicBatcher(model, max_batch=2, max_wait_ms=1)
    bulk = [batcher.submit(img(i), priority=BULK) for i in range(10)]
    urgent = batcher.submit(img(99), priority=INTERACTIVE)
    model.gate.set()
    urgent.result(5)
    for f in bulk:
        f.result(5)
    first_batch_with_urgent = next(i for i, b in enumerate(model.batches) if 99.0 in b)
    assert first_batch_with_urgent <= 1  # at most the batch already taken before it arrived
    batcher.close()


def test_poison_image_fails_alone() -> None:
    model = RecordingModel(poison=3.0)
    model.gate.clear()
    batcher = DynamicBatcher(model, max_batch=8, max_wait_ms=50)
    futures = {i: batcher.submit(img(i)) for i in range(6)}
    model.gate.set()
    with pytest.raises(ValueError, match="poison"):
        futures[3].result(5)
    for i, f in futures.items():
        if i != 3:
            assert f.result(5)[0, 0, 0] == 2 * i
    batcher.close()


def test_close_drains_queued_items() -> None:
    batcher = DynamicBatcher(RecordingModel(delay=0.01), max_batch=2, max_wait_ms=1)
    futures = [batcher.submit(img(i)) for i in range(5)]
    batcher.close()
    assert all(f.done() and not f.exception() for f in futures)
    with pytest.raises(RuntimeError):
        batcher.submit(img(1))


def test_a_deep_mixed_backlog_forms_full_batches_in_order() -> None:
    model = RecordingModel()
    model.gate.clear()  # hold the first batch while the backlog builds
    batcher = DynamicBatcher(model, max_batch=16, max_wait_ms=50)
    futures = [(batcher.submit(img(i, 8 if i % 3 else 16)), i) for i in range(600)]
    urgent = batcher.submit(img(-1.0, 16), priority=INTERACTIVE)
    model.gate.set()
    for future, i in futures:
        assert future.result(10)[0, 0, 0] == 2 * i
    assert urgent.result(10)[0, 0, 0] == -2.0
    assert batcher.pending() == 0
    # The interactive item led the first batch formed after it arrived (the first or second batch,
    # depending on whether the inference thread took a batch before the backlog was queued).
    urgent_batch = next(k for k, batch in enumerate(model.batches) if -1.0 in batch)
    assert urgent_batch <= 1 and model.batches[urgent_batch][0] == -1.0
    assert sum(len(batch) for batch in model.batches) == 601
    # Full batches of one shape, at most one partial batch per shape besides the first one taken.
    assert sum(1 for batch in model.batches[1:] if len(batch) < 16) <= 2
    for batch in model.batches:
        rest = [value for value in batch if value != -1.0]
        assert rest == sorted(rest)  # oldest first within a batch
    batcher.close()


class AsyncDevice:
    """A device that runs queued batches one after another on its own thread (a GPU stream, in effect):
    `start(batch)` queues and returns `finish()`; every call is logged in order."""

    def __init__(self, seconds_per_batch: float, poison: float | None = None) -> None:
        self.seconds = seconds_per_batch
        self.poison = poison
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.free_at = time.monotonic()

    def start(self, batch: np.ndarray):  # type: ignore[no-untyped-def]
        with self.lock:
            number = sum(1 for kind, _ in self.events if kind == "start")
            self.events.append(("start", number))
            begins = max(time.monotonic(), self.free_at)
            self.free_at = ready = begins + self.seconds
        if self.poison is not None and np.any(batch[:, 0, 0, 0] == self.poison):
            def fail() -> np.ndarray:
                raise ValueError("poison")
            return fail

        def finish() -> np.ndarray:
            time.sleep(max(0.0, ready - time.monotonic()))
            with self.lock:
                self.events.append(("finish", number))
            return batch * 2

        return finish

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.start(batch)()


def test_an_asynchronous_model_gets_the_next_batch_before_the_last_one_is_handed_out() -> None:
    device = AsyncDevice(0.05)
    busy: list[float] = []
    batcher = DynamicBatcher(device.run, start_batch=device.start, max_batch=4, max_wait_ms=5,
                             on_batch=lambda size, seconds: busy.append(seconds))
    started = time.monotonic()
    group = batcher.submit_many([img(i) for i in range(16)])
    outputs = group.result(10)
    wall = time.monotonic() - started
    assert [float(out[0, 0, 0]) for out in outputs] == [2.0 * i for i in range(16)]
    # Batch N+1 was queued before batch N was finished: the device never waited for the thread.
    order = device.events
    for n in range(3):
        assert order.index(("start", n + 1)) < order.index(("finish", n))
    assert len(busy) == 4 and sum(busy) <= wall and sum(busy) >= 4 * 0.05 * 0.9
    batcher.close()


def test_an_asynchronous_model_does_not_hold_back_a_lone_item() -> None:
    device = AsyncDevice(0.01)
    batcher = DynamicBatcher(device.run, start_batch=device.start, max_batch=8, max_wait_ms=5)
    for i in range(3):  # one at a time: each is finished without waiting for a batch-mate that never comes
        began = time.monotonic()
        assert batcher.submit(img(i), priority=INTERACTIVE).result(5)[0, 0, 0] == 2 * i
        assert time.monotonic() - began < 2.0
    batcher.close()


def test_a_poison_item_fails_alone_on_an_asynchronous_model() -> None:
    device = AsyncDevice(0.0, poison=3.0)
    batcher = DynamicBatcher(device.run, start_batch=device.start, max_batch=4, max_wait_ms=20)
    outcomes = batcher.submit_many([img(i) for i in range(8)]).result(10)
    assert isinstance(outcomes[3], ValueError)
    assert [float(o[0, 0, 0]) for i, o in enumerate(outcomes) if i != 3] == [2.0 * i for i in range(8) if i != 3]
    batcher.close()
