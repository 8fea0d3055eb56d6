"""Where bulk jobs are fetched, decoded, encoded and stored: a pool of codec processes.

The worker's main process runs Celery, the job store, the batcher and the model. Decoding an input
and encoding an output is Python-level work (Pillow, numpy) that holds the GIL, so in threads it
queues behind everything else and adds GIL hand-offs to every job. Bulk groups therefore go to
this pool instead: `load` reads and prepares a group's inputs, `store` renders and writes its
outputs, each in a child process with its own `Storage`. Interactive jobs stay on the executor's
threads: a single image should not wait behind queued bulk groups, nor pay the round trip.

A child that dies (a decoder crashing on a hostile file) breaks the pool. It is rebuilt, and the
group is retried one job at a time, so the job that crashes a child again fails alone.
Children exit on their own when the worker process is gone (even after SIGKILL), never mid-write.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from stylequeue.config.settings import Settings
from stylequeue.config.styles import StyleSpec
from stylequeue.errors import InternalError, InvalidInput, JobError, JobTimeout

log = logging.getLogger("stylequeue.worker")

# One item's outcome and the seconds it took: a `Prepared` (load) or the bytes written (store),
# or the JobError that ended it.
Outcome = tuple[Any, float]


def default_processes() -> int:
    """Codec processes when not configured: one per core up to 4; none on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < 2 else min(4, cores)


class CodecPool:
    """`processes` child processes that load and store groups of jobs.

    Args:
        settings: the worker's settings (each child builds its own Storage from them).
        processes: how many children.
        timeout_s: the longest a group may take; its jobs then fail this attempt with `timeout`.
    """

    def __init__(self, settings: Settings, processes: int, *, timeout_s: float) -> None:
        if processes < 1:
            raise ValueError("a codec pool needs at least one process")
        self.settings = settings
        self.processes = processes
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the worker already runs threads (Celery, Redis, the batcher).
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_child_init, initargs=(self.settings, os.getpid()))

    def warm(self) -> None:
        """Start every child now (imports take a moment), so the first bulk group does not wait."""
        with self._lock:
            pool = self._pool
        futures = [pool.submit(_child_ping, 0.2) for _ in range(self.processes)]
        for future in futures:
            future.result(timeout=120)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)

    # --- the two calls ------------------------------------------------------------------------

    def load(self, items: Sequence[tuple[str, StyleSpec]], max_pixels: int) -> list[Outcome]:
        """Fetch and prepare each (input URI, style): a `Prepared` per job, or its JobError."""
        return self._call(_child_load, [(uri, spec, max_pixels) for uri, spec in items],
                          crashed="the image crashed the decoder")

    def store(self, items: Sequence[tuple[str, np.ndarray, StyleSpec]]) -> list[Outcome]:
        """Render and write each (output URI, model output, style): bytes written, or its JobError."""
        return self._call(_child_store, list(items), crashed="a codec process died while encoding this output")

    def _call(self, function: Callable[[list[Any]], list[Outcome]], items: list[Any], *, crashed: str) -> list[Outcome]:
        if not items:
            return []
        with self._lock:
            pool = self._pool
        try:
            future: Future[list[Outcome]] = pool.submit(function, items)
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            error = JobTimeout(f"decoding or encoding took longer than {self.timeout_s:g} s")
            return [(error, self.timeout_s)] * len(items)
        except BrokenProcessPool:
            self._replace(pool)
            if len(items) == 1:
                log.warning("a codec process died on one job: %s", crashed)
                return [(InvalidInput(crashed) if function is _child_load else InternalError(crashed), 0.0)]
            # Some job in this group (or in another group in flight) killed a child: one at a time now.
            return [self._call(function, [item], crashed=crashed)[0] for item in items]

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:  # another thread may have replaced it already
                log.warning("a codec process died; starting a new pool")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()


# --- the children -------------------------------------------------------------------------------

_storage: Any = None
_busy = threading.Lock()
_io: ThreadPoolExecutor | None = None


def _child_init(settings: Settings, parent: int) -> None:
    from stylequeue.pipeline.storage import Storage

    global _storage, _io
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    _storage = Storage(settings, max_pool_connections=16)
    _io = ThreadPoolExecutor(8, thread_name_prefix="codec-io")
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Exit once the worker is gone; the lock waits for a call in progress (no half-written output)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            with _busy:
                os._exit(0)


def _child_ping(seconds: float) -> int:
    time.sleep(seconds)  # long enough that each ping lands in a different child
    return os.getpid()


def _as_job_error(exc: Exception) -> JobError:
    return exc if isinstance(exc, JobError) else InternalError(f"{type(exc).__name__}: {exc}")


def _remote(uri: str) -> bool:
    return not uri.startswith("file:")


def _read_one(uri: str) -> bytes | JobError:
    try:
        return _storage.read(uri)
    except Exception as exc:
        return _as_job_error(exc)


def _child_load(items: list[tuple[str, StyleSpec, int]]) -> list[Outcome]:
    from stylequeue.pipeline.process import prepare

    with _busy:
        started = time.perf_counter()
        uris = [uri for uri, _, _ in items]
        # Remote reads wait on the network: fetch them together, then decode one after another.
        if _io is not None and len(uris) > 1 and any(map(_remote, uris)):
            datas = list(_io.map(_read_one, uris))
        else:
            datas = [_read_one(uri) for uri in uris]
        fetch_each = (time.perf_counter() - started) / len(items)
        outcomes: list[Outcome] = []
        for data, (_, spec, max_pixels) in zip(datas, items, strict=True):
            began = time.perf_counter()
            if isinstance(data, JobError):
                outcomes.append((data, fetch_each))
                continue
            try:
                result: Any = prepare(data, spec, max_pixels=max_pixels)
            except Exception as exc:
                result = _as_job_error(exc)
            outcomes.append((result, fetch_each + time.perf_counter() - began))
        return outcomes


def _write_one(item: tuple[str, bytes, str]) -> JobError | None:
    uri, data, content_type = item
    try:
        _storage.write(uri, data, content_type)
    except Exception as exc:
        return _as_job_error(exc)
    return None


def _child_store(items: list[tuple[str, np.ndarray, StyleSpec]]) -> list[Outcome]:
    from stylequeue.pipeline.process import render

    with _busy:
        encoded: list[tuple[bytes | JobError, float]] = []
        for _, output, spec in items:
            began = time.perf_counter()
            try:
                encoded.append((render(output, spec), time.perf_counter() - began))
            except Exception as exc:
                encoded.append((_as_job_error(exc), time.perf_counter() - began))
        writes = [(uri, data, spec.content_type) for (uri, _, spec), (data, _) in zip(items, encoded, strict=True)
                  if not isinstance(data, JobError)]
        started = time.perf_counter()
        if _io is not None and len(writes) > 1 and any(_remote(uri) for uri, _, _ in writes):
            errors = iter(list(_io.map(_write_one, writes)))
        else:
            errors = iter([_write_one(write) for write in writes])
        write_each = (time.perf_counter() - started) / max(1, len(writes))
        outcomes: list[Outcome] = []
        for data, seconds in encoded:
            if isinstance(data, JobError):
                outcomes.append((data, seconds))
                continue
            error = next(errors)
            outcomes.append((error if error is not None else len(data), seconds + write_each))
        return outcomes
