"""Long polls (`GET /v1/jobs/{id}?wait=S`): one subscriber per gateway process, waiting requests as futures.

Every final state PUBLISHes the job id on `{prefix}finished` in the same script that finishes the job. One
daemon thread per process holds the only subscription and hands each id to the event loop, which resolves
the futures of the requests waiting on that job. A waiting request costs a future, never a thread or a
Redis call, until it wakes.

No finish is missed: a request registers its future, and only then reads the record (subscribe, then
check). The subscription is live before the first request is served (`start`), and after a lost
connection every waiter is woken to read its record again, since ids published while the subscriber was
away are gone.

Finishes come in bursts (a GPU worker ends a batch of dozens at once): ids announced while a read is in
flight are read together, in one pipelined round trip, and each waiter gets its record with its wake-up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from stylequeue.errors import RedisUnavailable
from stylequeue.jobs import Job, RedisJobStore

log = logging.getLogger("stylequeue.gateway")

MAX_WAIT_S = 30.0
# How long the subscriber blocks in one read: the longest a stop waits for the thread.
_POLL_S = 1.0
_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class FinishedWatcher:
    """Futures for jobs that requests wait on, resolved when the job store announces those jobs finished."""

    def __init__(self, store: RedisJobStore) -> None:
        self.store = store
        self._waiters: dict[str, set[asyncio.Future[Job | None]]] = {}
        self._announced: set[str] = set()  # finished ids waiting to be read (on the loop)
        self._reading = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # --- the subscriber thread ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the subscriber (once per process) and return when it is subscribed; RedisUnavailable if not."""
        with self._lock:
            if self._thread is None:
                self._loop = asyncio.get_running_loop()
                self._thread = threading.Thread(target=self._run, name="stylequeue-longpoll", daemon=True)
                self._thread.start()
        if not self._subscribed.is_set() and not await run_in_threadpool(self._subscribed.wait, 5.0):
            raise RedisUnavailable("the job store is unavailable: cannot wait for jobs now")

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=_POLL_S + 2)

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            pubsub: Any = None
            try:
                pubsub = self.store.subscribe_finished()
                self._subscribed.set()
                if failures:
                    log.info("long poll subscriber reconnected")
                    self._call(self._wake_all)  # ids published while away are lost: everyone reads again
                failures = 0
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=_POLL_S)
                    if message is not None and message.get("type") == "message":
                        self._call(self._wake, message["data"].decode())
            except Exception as exc:  # redis-py raises several connection error types; keep serving
                self._subscribed.clear()
                log.warning("long poll subscriber lost the job store (%s); retrying", type(exc).__name__)
                self._stopping.wait(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
                failures += 1
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: S110 - a dead connection is closed anyway
                        pass

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    # --- on the event loop ------------------------------------------------------------------------

    def _wake(self, job_id: str) -> None:
        """A finish was announced: read it (with any others announced meanwhile) for the requests waiting."""
        if job_id not in self._waiters:
            return
        self._announced.add(job_id)
        if not self._reading:
            self._reading = True
            asyncio.get_running_loop().create_task(self._read_announced())

    async def _read_announced(self) -> None:
        try:
            while self._announced:
                ids = list(self._announced)
                self._announced.clear()
                try:
                    jobs: list[Job | None] = await run_in_threadpool(self.store.get_many, ids)
                except Exception as exc:  # the waiters read for themselves
                    log.warning("reading finished jobs failed (%s)", type(exc).__name__)
                    jobs = [None] * len(ids)
                for job_id, job in zip(ids, jobs, strict=True):
                    self._resolve(job_id, job)
        finally:
            self._reading = False

    def _resolve(self, job_id: str, job: Job | None) -> None:
        for future in self._waiters.get(job_id, ()):
            if not future.done():
                future.set_result(job)

    def _wake_all(self) -> None:
        for job_id in list(self._waiters):
            self._resolve(job_id, None)  # None: read the record again

    def _register(self, job_id: str) -> asyncio.Future[Job | None]:
        future: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(future)
        return future

    def _unregister(self, job_id: str, future: asyncio.Future[Job | None]) -> None:
        waiting = self._waiters.get(job_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiters[job_id]

    @property
    def waiting(self) -> int:
        """How many requests wait now (metrics)."""
        return sum(len(futures) for futures in self._waiters.values())

    async def wait(self, job_id: str, timeout_s: float, read: Callable[[], Job],
                   check: Callable[[Job], Job]) -> Job:
        """The job's record once it is finished, or after `timeout_s` as it is then.

        `read` (run in a thread) returns the record or raises (JobNotFound ...); it is called after the
        future is registered, so a finish between the two is never missed. A record the watcher read for
        the wake-up goes through `check` (the caller's ownership test) instead of another read.
        """
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout_s, MAX_WAIT_S)
        while True:
            future = self._register(job_id)
            try:
                job = await run_in_threadpool(read)
                left = deadline - loop.time()
                if job.finished or left <= 0:
                    return job
                try:
                    woken = await asyncio.wait_for(future, left)
                except TimeoutError:
                    woken = None  # read once more: the record as it is now
                if woken is not None and woken.finished:
                    return check(woken)
            finally:
                self._unregister(job_id, future)
