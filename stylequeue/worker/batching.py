"""Dynamic batching: one class, two knobs (`max_batch`, `max_wait_ms`), futures out.

Callers hand in one image array and get a Future of its output, or several at once (a bulk group)
and get one GroupFuture for all of them; they never see a batch. One inference thread per batcher
(per loaded model) groups waiting items of the same shape, interactive items first, and runs them.
If a batch raises, its items are run one by one, so a poison image fails alone.

A model that runs asynchronously (a GPU: `start_batch(batch)` queues it and returns a `finish()` that
waits for its output) is kept busy: while batch N runs, the thread forms batch N+1 and queues it
behind N, then hands out N's outputs. It does so only with a batch that is ready at once (full, or past
its wait); otherwise it finishes N first. The seconds reported per batch are the device's busy time as
the thread sees it, so their sum never exceeds the wall time.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from stylequeue.jobs.record import Priority

log = logging.getLogger("stylequeue.worker.batching")


class GroupFuture:
    """The outputs of images handed over together (`submit_many`): one wait for the whole group.

    `result()` gives one entry per image, in order: its output array, or the exception its batch (or,
    after a failed batch, its own run) raised. Cheaper than a Future per image, which a bulk group of
    64 paid for in locks and condition variables.
    """

    __slots__ = ("_outcomes", "_left", "_done", "cancelled")

    def __init__(self, size: int) -> None:
        self._outcomes: list[np.ndarray | Exception | None] = [None] * size
        self._left = size
        self._done = threading.Event()
        self.cancelled = False
        if size == 0:
            self._done.set()

    def _claim(self) -> bool:
        return not self.cancelled

    def _set(self, index: int, outcome: np.ndarray | Exception) -> None:
        # Only the batcher's one inference thread calls this, so the count needs no lock.
        self._outcomes[index] = outcome
        self._left -= 1
        if self._left == 0:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> list[np.ndarray | Exception]:
        """Wait for every image; raises TimeoutError (the builtin) after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self._left} of {len(self._outcomes)} images still waiting")
        return self._outcomes  # type: ignore[return-value]

    def cancel(self) -> None:
        """Images not yet run are skipped (a group whose jobs timed out)."""
        self.cancelled = True


class _FutureSink:
    """One image's Future (`submit`) as the batcher's sink: same protocol as GroupFuture."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: Future[np.ndarray] = Future()

    def _claim(self) -> bool:
        return self.future.set_running_or_notify_cancel()

    def _set(self, _index: int, outcome: np.ndarray | Exception) -> None:
        if isinstance(outcome, Exception):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


@dataclass(order=True)
class _Item:
    rank: int  # Priority.rank: interactive items sort first
    seq: int
    array: np.ndarray = field(compare=False)
    sink: GroupFuture | _FutureSink = field(compare=False)
    index: int = field(compare=False)
    enqueued: float = field(compare=False, default_factory=time.monotonic)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def finish(self, outcome: np.ndarray | Exception) -> None:
        self.sink._set(self.index, outcome)


@dataclass
class _InFlight:
    """A batch queued on an asynchronous model: its items, its `finish()`, and when it was queued."""

    items: list[_Item]
    finish: Callable[[], np.ndarray]
    queued: float


@dataclass
class BatchStats:
    """What the batcher did, for metrics and benchmarks."""

    batches: int = 0
    items: int = 0
    sizes: list[int] = field(default_factory=list)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        if len(self.sizes) < 100000:
            self.sizes.append(size)


class DynamicBatcher:
    """Groups single images into batches for `run_batch(stacked items) -> one output per item`.

    Args:
        run_batch: the model; called from this batcher's one inference thread only.
        max_batch: largest batch formed.
        max_wait_ms: how long the first waiting item may wait for batch-mates before running anyway.
        on_batch: optional callback(size, seconds) after every batch (metrics).
        start_batch: the model's asynchronous form, `start_batch(batch)() == run_batch(batch)`; with it,
            the next batch is formed and queued while one runs (see the module docstring).
    """

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], *, max_batch: int = 8,
                 max_wait_ms: float = 10.0, name: str = "batcher",
                 on_batch: Callable[[int, float], None] | None = None,
                 start_batch: Callable[[np.ndarray], Callable[[], np.ndarray]] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.run_batch = run_batch
        self.start_batch = start_batch
        self._last_done = 0.0  # when the last asynchronous batch was seen finished
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.stats = BatchStats()
        # Waiting items by shape, each shape with an interactive and a bulk FIFO: the head item (the
        # oldest of the highest priority) and its batch-mates are found without scanning the backlog.
        self._queues: dict[tuple[int, ...], tuple[deque[_Item], deque[_Item]]] = {}
        self._count = 0
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"infer-{name}", daemon=True)
        self._thread.start()

    def submit(self, array: np.ndarray, *, priority: Priority = Priority.BULK) -> Future[np.ndarray]:
        """Queue one image (in the worker: uint8 [H,W,3] pixels); the future resolves to its output."""
        sink = _FutureSink()
        self._enqueue([_Item(priority.rank, next(self._seq), array, sink, 0, time.monotonic())], priority)
        return sink.future

    def submit_many(self, arrays: Sequence[np.ndarray], *, priority: Priority = Priority.BULK) -> GroupFuture:
        """Queue several images at once (one lock, at most one wake-up); one GroupFuture for them all."""
        group = GroupFuture(len(arrays))
        now = time.monotonic()
        self._enqueue([_Item(priority.rank, next(self._seq), array, group, index, now)
                       for index, array in enumerate(arrays)], priority)
        return group

    def _enqueue(self, items: list[_Item], priority: Priority) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            wake = self._count == 0 or priority is Priority.INTERACTIVE
            for item in items:
                pair = self._queues.get(item.shape)
                if pair is None:
                    pair = self._queues[item.shape] = (deque(), deque())
                pair[item.rank].append(item)
                # Wake the inference thread only when it has something new to decide: its first item,
                # a possibly full batch, or an interactive item. Otherwise its max_wait timer suffices,
                # and a thread wake-up per image (costly on VMs) is saved.
                wake = wake or len(pair[0]) + len(pair[1]) >= self.max_batch
            self._count += len(items)
            if wake:
                self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return self._count

    def close(self, timeout: float | None = 30) -> None:
        """Stop after the items already queued have run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # --- the inference thread --------------------------------------------------------------------

    def _head(self) -> _Item:
        """The item to serve next: interactive first, then the oldest (one look per shape and priority)."""
        return min(queue[0] for pair in self._queues.values() for queue in pair if queue)

    def _take_batch(self, wait: bool = True) -> list[_Item] | None:
        """The next batch; None once closed and drained. With `wait=False` (a batch is in flight) only a
        batch that is ready now (full, or past its wait), else [] at once."""
        with self._cond:
            while not self._count:
                if self._closed:
                    return None
                if not wait:
                    return []
                self._cond.wait()
            head = self._head()
            deadline = head.enqueued + self.max_wait_s
            while True:
                interactive, bulk = self._queues[head.shape]
                if len(interactive) + len(bulk) >= self.max_batch or self._closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not wait:
                    return []
                self._cond.wait(left)
                if self._head() is not head:  # an interactive item arrived: serve it first
                    head = self._head()
                    deadline = min(deadline, head.enqueued + self.max_wait_s)
            pair = self._queues[head.shape]
            batch: list[_Item] = []
            for queue in pair:  # interactive mates first, then bulk, each oldest first
                while queue and len(batch) < self.max_batch:
                    batch.append(queue.popleft())
            if not pair[0] and not pair[1]:
                del self._queues[head.shape]
            self._count -= len(batch)
            return batch

    def _loop(self) -> None:
        in_flight: _InFlight | None = None
        while True:
            batch = self._take_batch(wait=in_flight is None)
            if batch is None:
                if in_flight is not None:
                    self._finish(in_flight)
                return
            live = [item for item in batch if item.sink._claim()]
            queued = None
            if live and self.start_batch is None:
                self._run(live)
            elif live:
                queued = self._queue(live)  # behind the batch in flight, if any
            if in_flight is not None:
                self._finish(in_flight)
            in_flight = queued

    def _queue(self, batch: list[_Item]) -> _InFlight | None:
        assert self.start_batch is not None
        try:
            finish = self.start_batch(np.stack([item.array for item in batch]))
        except Exception as exc:
            self._failed(batch, exc)
            return None
        return _InFlight(batch, finish, time.perf_counter())

    def _finish(self, flight: _InFlight) -> None:
        try:
            outputs = flight.finish()
            if outputs.shape[0] != len(flight.items):
                raise RuntimeError(f"model returned {outputs.shape[0]} outputs for a batch of {len(flight.items)}")
        except Exception as exc:
            self._failed(flight.items, exc)
            return
        done = time.perf_counter()
        # The device ran this batch from when it was queued or when the one before it finished, if later.
        busy = done - max(flight.queued, self._last_done)
        self._last_done = done
        self.stats.record(len(flight.items))
        if self.on_batch:
            self.on_batch(len(flight.items), busy)
        for item, output in zip(flight.items, outputs, strict=True):
            item.finish(output)

    def _failed(self, batch: list[_Item], exc: Exception) -> None:
        """A batch raised: a single item fails with it; a larger batch's items run one by one."""
        if len(batch) == 1:
            batch[0].finish(exc)
            return
        log.warning("batch of %d failed (%s); running its items one by one", len(batch), exc)
        for item in batch:
            self._run_single(item)

    def _run(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = self.run_batch(np.stack([item.array for item in batch]))
            if outputs.shape[0] != len(batch):
                raise RuntimeError(f"model returned {outputs.shape[0]} outputs for a batch of {len(batch)}")
        except Exception as exc:
            self._failed(batch, exc)
            return
        self.stats.record(len(batch))
        if self.on_batch:
            self.on_batch(len(batch), time.perf_counter() - started)
        for item, output in zip(batch, outputs, strict=True):
            item.finish(output)

    def _run_single(self, item: _Item) -> None:
        try:
            output = self.run_batch(item.array[None])[0]
        except Exception as exc:
            item.finish(exc)
        else:
            self.stats.record(1)
            item.finish(output)
