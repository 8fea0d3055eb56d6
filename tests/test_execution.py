"""The executor's in-process queue: interactive groups first, reserved threads, shutdown drain."""

from __future__ import annotations

import threading

from stylequeue.worker.batching import BULK, INTERACTIVE
from stylequeue.worker.execution import GroupQueue


def test_interactive_groups_come_first_then_bulk_in_order() -> None:
    q = GroupQueue()
    q.put(BULK, ("b1", "b2"))
    q.put(BULK, ("b3",))
    q.put(INTERACTIVE, ("i1",))
    assert [q.get(), q.get(), q.get()] == [("i1",), ("b1", "b2"), ("b3",)]


def test_reserved_threads_take_only_interactive_work() -> None:
    q = GroupQueue()
    q.put(BULK, ("b1",))
    got: list[tuple[str, ...] | None] = []
    reserved = threading.Thread(target=lambda: got.append(q.get(interactive_only=True)))
    reserved.start()
    reserved.join(0.2)
    assert reserved.is_alive() and got == []  # a bulk group does not wake it
    q.put(INTERACTIVE, ("i1",))
    reserved.join(5)
    assert got == [("i1",)]
    assert q.get() == ("b1",)


def test_drain_and_close_release_every_waiter() -> None:
    q = GroupQueue()
    q.put(BULK, ("b1",))
    q.put(INTERACTIVE, ("i1",))
    assert q.drain() == [("i1",), ("b1",)]
    results: list[tuple[str, ...] | None] = []
    waiters = [threading.Thread(target=lambda r=r: results.append(q.get(interactive_only=r))) for r in (True, False)]
    for w in waiters:
        w.start()
    q.close()
    for w in waiters:
        w.join(5)
    assert results == [None, None]
