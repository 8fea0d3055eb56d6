"""Where a job is run: claim, fetch and decode, infer (through the batcher), encode and store, finish.

`JobExecutor` owns the in-process queue of claimed jobs (interactive before bulk) and the job threads
that work through it. Errors become the job's error code here, in one place (`_fail`): permanent
ones fail the job, transient ones send it back to `queued` to be retried after a short backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stylequeue.config.styles import StyleSpec
from stylequeue.errors import InternalError, JobError, JobTimeout, StyleQueueError
from stylequeue.jobs import MAX_ATTEMPTS, RETRY_KEY, Job, JobState, RedisJobStore, parse_iso
from stylequeue.pipeline.process import prepare, render
from stylequeue.worker.batching import BULK, INTERACTIVE, GroupFuture

log = logging.getLogger("stylequeue.worker")

# Seconds before attempt 2 and 3 of a job that failed transiently: seconds, never minutes.
RETRY_BACKOFF_S = (1.0, 4.0)


class Models(Protocol):
    """What the executor needs of the worker's models: a spec and a batcher per style."""

    def spec_and_model(self, style: str) -> tuple[StyleSpec, str]: ...

    def submit(self, style: str, pixels: np.ndarray, priority: int) -> Future[np.ndarray]: ...

    def submit_many(self, style: str, pixels: Sequence[np.ndarray], priority: int) -> GroupFuture: ...

    def results(self, group: GroupFuture) -> list[np.ndarray | Exception]: ...

    def result(self, future: Future[np.ndarray]) -> np.ndarray: ...


@dataclass
class _Running:
    job_id: str
    priority: int
    attempts: int
    job: Job
    claimed_at: float = field(default_factory=time.monotonic)
    started: bool = False
    abandoned: bool = False


INTERACTIVE_THREADS = 2


class GroupQueue:
    """The in-process queue of claimed job groups: interactive groups first, then bulk, each in order.

    `get(interactive_only=True)` serves the threads reserved for interactive jobs.
    """

    def __init__(self) -> None:
        lock = threading.Lock()
        self._general = threading.Condition(lock)
        self._reserved = threading.Condition(lock)
        self._interactive: deque[tuple[str, ...]] = deque()
        self._bulk: deque[tuple[str, ...]] = deque()
        self._closed = False

    def put(self, priority: int, group: tuple[str, ...]) -> None:
        with self._general:
            if priority == INTERACTIVE:
                self._interactive.append(group)
                self._reserved.notify()
            else:
                self._bulk.append(group)
            self._general.notify()

    def get(self, interactive_only: bool = False) -> tuple[str, ...] | None:
        """The next group, blocking; None once closed and empty."""
        waiting = self._reserved if interactive_only else self._general
        with waiting:
            while True:
                if self._interactive:
                    return self._interactive.popleft()
                if self._bulk and not interactive_only:
                    return self._bulk.popleft()
                if self._closed:
                    return None
                waiting.wait()

    def drain(self) -> list[tuple[str, ...]]:
        """Take every group not yet started (shutdown)."""
        with self._general:
            groups = [*self._interactive, *self._bulk]
            self._interactive.clear()
            self._bulk.clear()
            return groups

    def close(self) -> None:
        with self._general:
            self._closed = True
            self._general.notify_all()
            self._reserved.notify_all()


@dataclass
class _Work:
    """One job between its fetch and its final state, inside a group."""

    running: _Running
    timings: dict[str, float] = field(default_factory=dict)
    spec: Any = None
    model: str = ""
    prepared: Any = None
    future: Any = None
    submitted: float = 0.0
    output_bytes: int = 0


class JobExecutor:
    """Runs claimed jobs on `threads` job threads.

    Args:
        store: the job store.
        storage: object with read(uri)/write(uri, data, content_type)/delete(uri).
        models: see `Models`.
        worker_id: this worker's owner id in leases.
        on_finished: called with each job that reached a terminal state (callbacks, metrics).
        on_stage: called with (stage, seconds) for metrics.
        codec: a `CodecPool` for bulk groups (see worker/codec.py); None runs them on the job threads.
    """

    def __init__(self, *, store: RedisJobStore, storage: Any, models: Models, worker_id: str, lease_s: float,
                 max_input_pixels: int, job_timeout_s: float, threads: int = 8, group_size: int = 8,
                 on_finished: Callable[[Job], None] | None = None,
                 on_stage: Callable[[str, float], None] | None = None, codec: Any = None) -> None:
        self.store = store
        self.codec = codec
        self.storage = storage
        self.models = models
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.max_input_pixels = max_input_pixels
        self.job_timeout_s = job_timeout_s
        self.on_finished = on_finished or (lambda job: None)
        self.on_stage = on_stage or (lambda stage, seconds: None)
        # Items are groups of job ids: one interactive job, or bulk jobs of one chunk (`group_size` of
        # them, or the whole chunk with a codec pool), which a job thread runs together (one wake-up per
        # group, one Redis round trip to finish them).
        self._queue = GroupQueue()
        self.group_size = group_size
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        # Two extra threads take interactive jobs only: a bulk backlog never leaves them without a thread.
        self._threads = [threading.Thread(target=self._work, args=(i >= threads,), name=f"job-{i}", daemon=True)
                         for i in range(threads + INTERACTIVE_THREADS)]
        for thread in self._threads:
            thread.start()

    # --- intake ---------------------------------------------------------------------------------

    def accept(self, job_ids: Sequence[str], priority: int) -> list[str]:
        """Claim these jobs for this worker and queue them; returns the ids it could not take.

        Jobs already finished, cancelled, or running under someone else's live lease are skipped, so
        a redelivered message is harmless. Once stopping, nothing is claimed: the ids come back so
        the caller can send them again instead of acknowledging them away.
        """
        if self._stopping:
            return list(job_ids)
        with self._lock:
            fresh = [job_id for job_id in job_ids if job_id not in self._running]
        claimed: list[str] = []
        for job_id, claim in zip(fresh, self.store.claim_many(fresh, self.worker_id, lease_s=self.lease_s,
                                                               max_attempts=MAX_ATTEMPTS), strict=True):
            if claim.outcome == "claimed" and claim.job is not None:
                with self._lock:
                    self._running[job_id] = _Running(job_id, priority, claim.attempts, claim.job)
                claimed.append(job_id)
            elif claim.outcome == "failed":
                log.warning("job %s: failed, its worker was lost on the last attempt", job_id)
                self._notify(job_id)
            elif claim.outcome == "missing":
                log.warning("job %s: no such job (expired or never created); message dropped", job_id)
            else:
                log.info("job %s: %s, message dropped", job_id, claim.outcome if claim.outcome == "busy"
                         else f"already {claim.state}")
        # Interactive jobs run alone. Bulk jobs run in batch-sized groups on the job threads, or as one
        # group per message through the codec pool: one load and one store call, one finishing round trip.
        if priority == INTERACTIVE:
            size = 1
        else:
            size = self.group_size if self.codec is None else max(1, len(claimed))
        for start in range(0, len(claimed), size):
            self._queue.put(priority, tuple(claimed[start:start + size]))
        return []

    def inflight(self) -> int:
        with self._lock:
            return len(self._running)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def abandon(self, job_ids: Sequence[str]) -> None:
        """Forget jobs this worker no longer owns (cancelled, or taken over); their results are dropped."""
        with self._lock:
            for job_id in job_ids:
                if job_id in self._running:
                    self._running[job_id].abandoned = True

    def timed_out(self) -> list[str]:
        """Ids of jobs whose current attempt has run longer than the job timeout."""
        limit = time.monotonic() - self.job_timeout_s
        with self._lock:
            return [r.job_id for r in self._running.values() if r.claimed_at < limit and not r.abandoned]

    def expire(self, job_id: str) -> None:
        """End an attempt that ran past the job timeout (a transient `timeout`)."""
        with self._lock:
            running = self._running.get(job_id)
            if running is None:
                return
            running.abandoned = True
        self._fail(job_id, running.attempts, JobTimeout(f"attempt ran longer than {self.job_timeout_s:g} s"))

    # --- shutdown -------------------------------------------------------------------------------

    def stop(self, *, timeout: float = 60.0) -> list[str]:
        """Finish jobs already started, give back jobs not started; returns the ids given back."""
        self._stopping = True
        given_back: list[tuple[str, int]] = []
        for group in self._queue.drain():
            for job_id in group:
                with self._lock:
                    running = self._running.pop(job_id, None)
                if running is not None and not running.started:
                    given_back.append((job_id, running.attempts))
        released = []
        for job_id, attempts in given_back:
            # Not a real attempt: it never started, so the count goes back down.
            if self.store.transition(job_id, JobState.RUNNING, JobState.QUEUED, owner=self.worker_id,
                                     attempts=attempts - 1):
                released.append(job_id)
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._running and time.monotonic() < deadline:
                self._idle.wait(0.2)
        self._queue.close()
        return released

    # --- the job threads ------------------------------------------------------------------------

    def _work(self, interactive_only: bool) -> None:
        while True:
            group = self._queue.get(interactive_only)
            if group is None:
                return
            with self._lock:
                runnings = [self._running[j] for j in group if j in self._running]
                for running in runnings:
                    running.started = True
            try:
                if self.codec is not None and runnings and runnings[0].priority == BULK:
                    self._run_group_pooled(runnings)
                else:
                    self._run_group(runnings)
            except Exception:  # the executor must survive anything a job does
                log.exception("jobs %s: unexpected error", ", ".join(r.job_id for r in runnings))
                for running in runnings:
                    if not self._is_abandoned(running.job_id):
                        self._fail(running.job_id, running.attempts,
                                   InternalError("unexpected worker error; see worker log"))
            finally:
                for running in runnings:
                    self._finished(running.job_id)

    def _finished(self, job_id: str) -> None:
        with self._idle:
            self._running.pop(job_id, None)
            self._idle.notify_all()

    def _run_group(self, runnings: list[_Running]) -> None:
        """Fetch and decode each job and hand it to the batcher; then, in order, store each result.

        Finished jobs are marked succeeded in one pipelined round trip, flushed before the thread
        would block on an output not ready yet, so a result is never held back behind a slower one.
        """
        started_jobs = [work for work in map(self._start, runnings) if work is not None]
        done: list[_Work] = []
        for work in started_jobs:
            if not work.future.done():
                self._succeed(done)
                done = []
            if self._finish(work):
                done.append(work)
        self._succeed(done)

    def _run_group_pooled(self, runnings: list[_Running]) -> None:
        """A bulk group through the codec pool: load all, infer all (batched), store all, finish all."""
        styles: dict[str, tuple[StyleSpec, str]] = {}
        works = [work for work in (self._begin(running, styles) for running in runnings) if work is not None]
        loaded = self.codec.load([(w.running.job.input_uri, w.spec) for w in works], self.max_input_pixels)
        cancelled = self._abandoned_among([w.running.job_id for w in works])  # while the inputs loaded
        by_style: dict[str, list[_Work]] = {}
        for work, (prepared, seconds) in zip(works, loaded, strict=True):
            if isinstance(prepared, Exception):
                self._attempt_failed(work.running, prepared)
                continue
            work.prepared = prepared
            work.timings["fetch"] = self._record("fetch", seconds)
            if work.running.job_id not in cancelled:
                by_style.setdefault(work.running.job.style, []).append(work)
        inferred = []
        for style, group in by_style.items():  # one hand-over to the batcher per style
            began = time.perf_counter()
            try:
                outcomes = self.models.results(
                    self.models.submit_many(style, [w.prepared.pixels for w in group], BULK))
            except Exception as exc:  # a timeout, or the style could not be loaded
                for work in group:
                    self._attempt_failed(work.running, exc)
                continue
            seconds = time.perf_counter() - began
            for work, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    self._attempt_failed(work.running, outcome)
                    continue
                work.timings["infer"] = self._record("infer", seconds)
                inferred.append((work, outcome))
        cancelled = self._abandoned_among([w.running.job_id for w, _ in inferred])
        outputs = [(work, output) for work, output in inferred if work.running.job_id not in cancelled]
        stored = self.codec.store([(w.running.job.output_uri, output, w.spec, w.running.attempts > 1)
                                   for w, output in outputs])
        done = []
        for (work, _), (written, seconds) in zip(outputs, stored, strict=True):
            if isinstance(written, Exception):
                self._attempt_failed(work.running, written)
                continue
            work.output_bytes = written
            work.timings["store"] = self._record("store", seconds)
            done.append(work)
        self._succeed(done)

    def _begin(self, running: _Running, styles: dict[str, tuple[StyleSpec, str]]) -> _Work | None:
        """A job's work record with its style resolved (through `styles`, the lookups of one group);
        None (the job handled) on an error or cancellation."""
        job = running.job
        if self._is_abandoned(running.job_id):  # cancelled while it waited here
            return None
        work = _Work(running)
        if job.started_at:
            work.timings["queued"] = round(max(0.0, parse_iso(job.started_at) - parse_iso(job.created_at)) * 1000, 1)
        try:
            if job.style not in styles:
                styles[job.style] = self.models.spec_and_model(job.style)
            work.spec, work.model = styles[job.style]
        except Exception as exc:
            self._attempt_failed(running, exc)
            return None
        return work

    def _start(self, running: _Running) -> _Work | None:
        """Fetch, decode, submit for inference; None (the job handled) on an error or cancellation."""
        work = self._begin(running, {})
        if work is None:
            return None
        job = running.job
        try:
            started = time.perf_counter()
            work.prepared = prepare(self.storage.read(job.input_uri), work.spec, max_pixels=self.max_input_pixels)
            work.timings["fetch"] = self._stage("fetch", started)
            work.submitted = time.perf_counter()
            priority = INTERACTIVE if job.priority == "interactive" else BULK
            work.future = self.models.submit(job.style, work.prepared.pixels, priority)
        except Exception as exc:
            self._attempt_failed(running, exc)
            return None
        return work

    def _finish(self, work: _Work) -> bool:
        """Wait for one output, encode and store it; False (the job handled) on an error or cancellation."""
        running, spec = work.running, work.spec
        try:
            output = self.models.result(work.future)
            work.timings["infer"] = self._stage("infer", work.submitted)
            if self._is_abandoned(running.job_id):
                return False
            started = time.perf_counter()
            encoded = render(output, spec)
            self.storage.write(running.job.output_uri, encoded, spec.content_type, sweep=running.attempts > 1)
            work.output_bytes = len(encoded)
            work.timings["store"] = self._stage("store", started)
        except Exception as exc:
            self._attempt_failed(running, exc)
            return False
        return True

    def _attempt_failed(self, running: _Running, exc: Exception) -> None:
        if isinstance(exc, StyleQueueError):
            error = exc if isinstance(exc, JobError) else InternalError(str(exc))
            log.info("job %s: attempt %d failed: %s: %s", running.job_id, running.attempts, error.code, error.message)
        else:
            log.exception("job %s: attempt %d failed", running.job_id, running.attempts, exc_info=exc)
            error = InternalError(f"{type(exc).__name__}: {exc}")
        if not self._is_abandoned(running.job_id):
            self._fail(running.job_id, running.attempts, error)

    def _succeed(self, done: list[_Work]) -> None:
        """Mark stored jobs succeeded, all in one round trip."""
        if not done:
            return
        results = [dict(width=w.prepared.width, height=w.prepared.height, model=w.model, timings_ms=w.timings,
                        output_bytes=w.output_bytes, error=None) for w in done]
        moved = self.store.transition_many(
            [(w.running.job_id, JobState.RUNNING, JobState.SUCCEEDED, self.worker_id, result)
             for w, result in zip(done, results, strict=True)])
        for work, result, ok in zip(done, results, moved, strict=True):
            job = work.running.job
            if ok:
                log.debug("job %s: succeeded in %.0f ms -> %s", job.id, sum(work.timings.values()), job.output_uri)
                # The claimed record is this executor's own copy, and the job is done with it.
                job.state = JobState.SUCCEEDED
                for name, value in result.items():
                    setattr(job, name, value)
                self._notify(job.id, job)
            else:
                self._discard(job.id, job.output_uri)

    def _stage(self, stage: str, started: float) -> float:
        return self._record(stage, time.perf_counter() - started)

    def _record(self, stage: str, seconds: float) -> float:
        self.on_stage(stage, seconds)
        return round(seconds * 1000, 1)

    def _abandoned_among(self, job_ids: Sequence[str]) -> set[str]:
        with self._lock:
            return {j for j in job_ids if (r := self._running.get(j)) is None or r.abandoned}

    def _is_abandoned(self, job_id: str) -> bool:
        with self._lock:
            running = self._running.get(job_id)
            return running is None or running.abandoned

    def _discard(self, job_id: str, output_uri: str) -> None:
        """The job was cancelled (or taken over) while it ran: its result must not stay behind."""
        try:
            current = self.store.get(job_id)
        except StyleQueueError:
            return
        if current.state == JobState.CANCELLED:
            log.info("job %s: cancelled while running; result discarded", job_id)
            try:
                self.storage.delete(output_uri)
            except StyleQueueError as exc:
                log.warning("job %s: could not delete discarded output %s: %s", job_id, output_uri, exc)

    def _fail(self, job_id: str, attempts: int, error: JobError) -> None:
        """Map an attempt's error to the job's next state: a retry or a failure (the one place)."""
        if error.transient and attempts < MAX_ATTEMPTS:
            delay = RETRY_BACKOFF_S[min(attempts, len(RETRY_BACKOFF_S)) - 1]
            moved = self.store.transition(job_id, JobState.RUNNING, JobState.QUEUED, owner=self.worker_id,
                                          error=error.to_error(), schedule=(RETRY_KEY, time.time() + delay))
            if moved:
                log.info("job %s: transient %s; retry %d of %d in %.0f s", job_id, error.code, attempts + 1,
                         MAX_ATTEMPTS, delay)
            return
        if self.store.transition(job_id, JobState.RUNNING, JobState.FAILED, owner=self.worker_id,
                                 error=error.to_error()):
            log.info("job %s: failed: %s: %s", job_id, error.code, error.message)
            self._notify(job_id)

    def _notify(self, job_id: str, job: Job | None = None) -> None:
        try:
            self.on_finished(job if job is not None else self.store.get(job_id))
        except Exception:
            log.exception("job %s: after-finish hook failed", job_id)
