"""Where a job is run: claim, fetch and decode, infer (through the batcher), encode, then a fenced write.

`JobExecutor` owns the in-process queue of claimed jobs (interactive before bulk) and the job threads that
work through it. Errors become the job's error code here, in one place (`_fail`): permanent ones fail the
job, transient ones send it back to `queued`, its message due after a short backoff.

An output is written so that a stale attempt can neither replace the winner's bytes nor delete them:
1. the attempt **stages** its bytes in an attempt-specific temporary object beside the output;
2. **fence**: one script checks this worker still holds the job in this attempt, and records the staged
   object and the results; from then on no other attempt can begin the job;
3. **promote** the staged object to the output URI (a rename, or an S3 copy), idempotently;
4. mark the job `succeeded`.
An attempt that lost the job before step 2 deletes only its own staged object. One that dies between 2 and 4
leaves the job fenced: whoever claims it next finishes the promotion (claim outcome `promote`).
For a bulk group, steps 1-3 run in the codec process that encodes it (worker/codec.py), in one call; what
that process could not fence (the job store did not answer it) the job thread fences and promotes itself.

Faults of the infrastructure are not the job's: a dependency the outage guard (worker/outage.py) finds down
gets the jobs that need it handed back to `queued` without spending an attempt; a job store that cannot be
reached in a finishing step parks that step, retried every round of the lease keeper until Redis answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stylequeue.config.styles import StyleSpec
from stylequeue.errors import InternalError, JobError, JobTimeout, RedisUnavailable, StyleQueueError
from stylequeue.jobs import MAX_ATTEMPTS, Change, ClaimOutcome, Job, JobState, Priority, RedisJobStore, parse_iso
from stylequeue.pipeline.process import Prepared, prepare, render
from stylequeue.worker.batching import GroupFuture
from stylequeue.worker.codec import Done, Fence, LoadItem, PromoteItem, Staged, StageItem
from stylequeue.worker.outage import OutageGuard

log = logging.getLogger("stylequeue.worker")

# Seconds before attempt 2 and 3 of a job that failed transiently: seconds, never minutes.
RETRY_BACKOFF_S = (1.0, 4.0)
# A message for a job this worker still holds from an earlier attempt comes back after this long.
HELD_RESCHEDULE_S = 2.0
# Staged outputs whose delete failed, kept to delete again (beyond this, an outage's leftovers are only logged).
MAX_UNDELETED = 10000
INTERACTIVE_THREADS = 2


class Models(Protocol):
    """What the executor needs of the worker's models: a spec and a batcher per style."""

    def spec_and_model(self, style: str) -> tuple[StyleSpec, str]: ...

    def submit(self, style: str, pixels: np.ndarray, priority: Priority) -> Future[np.ndarray]: ...

    def submit_many(self, style: str, pixels: Sequence[np.ndarray], priority: Priority) -> GroupFuture: ...

    def results(self, group: GroupFuture) -> list[np.ndarray | Exception]: ...

    def result(self, future: Future[np.ndarray]) -> np.ndarray: ...


class Storage(Protocol):
    """What the executor needs of object storage (pipeline/storage)."""

    def read(self, uri: str) -> bytes: ...

    def stage(self, uri: str, data: bytes, content_type: str, *, tag: str) -> str: ...

    def promote(self, staged_uri: str, uri: str) -> None: ...

    def discard(self, staged_uri: str) -> None: ...

    def staged_copies(self, uri: str) -> list[str]: ...

    def batch(self) -> AbstractContextManager[None]: ...


class Codec(Protocol):
    """What the executor needs of a codec pool (worker/codec.py) for bulk groups."""

    def load(self, items: Sequence[LoadItem]) -> list[Done]: ...

    def stage(self, items: Sequence[StageItem]) -> list[Done]: ...

    def promote(self, items: Sequence[PromoteItem]) -> list[Done]: ...


@dataclass
class Held:
    """A job this worker claimed, from its claim until it leaves the executor."""

    job: Job
    priority: Priority
    promote_only: bool = False  # claimed to finish a lost attempt's promotion
    claimed_at: float = 0.0  # the executor's clock
    started: bool = False
    abandoned: bool = False
    parked: bool = False  # a finishing step waits for the job store: stays held (and renewed) meanwhile

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def attempts(self) -> int:
        return self.job.attempts


class GroupQueue:
    """The in-process queue of claimed job groups: interactive groups first, then bulk, each in order.

    `get(interactive_only=True)` serves the threads reserved for interactive jobs.
    """

    def __init__(self) -> None:
        lock = threading.Lock()
        self._general = threading.Condition(lock)
        self._reserved = threading.Condition(lock)
        self._interactive: deque[tuple[Held, ...]] = deque()
        self._bulk: deque[tuple[Held, ...]] = deque()
        self._closed = False

    def put(self, priority: Priority, group: tuple[Held, ...]) -> None:
        with self._general:
            if priority is Priority.INTERACTIVE:
                self._interactive.append(group)
                self._reserved.notify()
            else:
                self._bulk.append(group)
            self._general.notify()

    def get(self, interactive_only: bool = False) -> tuple[Held, ...] | None:
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

    def drain(self) -> list[tuple[Held, ...]]:
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


def stage_tag(held: Held) -> str:
    """`a{attempt}-{job id}`: a staged copy names its attempt and its job, so that cleaning up after lost attempts
    never touches a copy another job (one with the same explicit output_uri) is staging."""
    return f"a{held.attempts}-{held.job_id}"


@dataclass
class _Work:
    """One job between its fetch and its final state, inside a group."""

    held: Held
    timings: dict[str, float] = field(default_factory=dict)
    spec: Any = None
    model: str = ""
    prepared: Prepared | None = None
    future: Future[np.ndarray] | None = None
    submitted: float = 0.0
    staged_uri: str = ""
    output_bytes: int = 0

    def results(self) -> dict[str, Any]:
        """What the record says of a succeeded job, written with the fence. Its `error` is null already: every
        claim clears it, and nothing writes it while the job runs."""
        assert self.prepared is not None
        return {"width": self.prepared.width, "height": self.prepared.height, "model": self.model,
                "timings_ms": self.timings, "output_bytes": self.output_bytes}


class JobExecutor:
    """Runs claimed jobs on `threads` job threads (plus INTERACTIVE_THREADS that take interactive jobs only).

    Args:
        store: the job store.
        storage: see `Storage`.
        models: see `Models`.
        worker_id: this worker's owner id in leases.
        on_finished: called with (job, callback token) for each job this executor ended (callbacks, metrics).
        on_stage: called with (stage, seconds) for metrics.
        on_error: called with each unexpected error a job thread survived (metrics).
        codec: a `Codec` for bulk groups; None runs them on the job threads.
        guard: an `OutageGuard`; None treats every transient error as the job's.
        dependency_of: the dependency a URI needs (outage.dependency_of with the S3 endpoint bound).
        clock: monotonic seconds (tests inject a fake one).
    """

    def __init__(self, *, store: RedisJobStore, storage: Storage, models: Models, worker_id: str, lease_s: float,
                 max_input_pixels: int, job_timeout_s: float, threads: int = 8, group_size: int = 8,
                 on_finished: Callable[[Job, int], None] | None = None,
                 on_stage: Callable[[str, float], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, codec: Codec | None = None,
                 guard: OutageGuard | None = None, dependency_of: Callable[[str], str | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.codec = codec
        self.storage = storage
        self.models = models
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.max_input_pixels = max_input_pixels
        self.job_timeout_s = job_timeout_s
        self.on_finished = on_finished or (lambda job, token: None)
        self.on_stage = on_stage or (lambda stage, seconds: None)
        self.on_error = on_error or (lambda exc: None)
        self.guard = guard
        self.dependency_of = dependency_of or (lambda uri: None)
        self.clock = clock
        # Finishing steps that met an unreachable job store, retried by `retry_parked` until they go through.
        self._parked: list[tuple[list[Held], Callable[[], None]]] = []
        self._undeleted: list[str] = []  # staged outputs a failed delete left behind, deleted again later
        # Items are groups: one interactive job, or bulk jobs of one message (`group_size` of them, or the
        # whole message with a codec pool), which a job thread runs together (one wake-up per group, one
        # fence and one finishing round trip).
        self._queue = GroupQueue()
        self.group_size = group_size
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, args=(i >= threads,), name=f"job-{i}", daemon=True)
                         for i in range(threads + INTERACTIVE_THREADS)]
        for thread in self._threads:
            thread.start()

    # --- intake ---------------------------------------------------------------------------------

    def accept(self, job_ids: Sequence[str], priority: Priority) -> None:
        """Claim these jobs for this worker and queue them.

        Jobs already finished, or running under another worker's live lease, are skipped, so a redelivered
        message is harmless. A job this worker still holds from an earlier attempt (a message sent again
        after that attempt timed out or was reaped) is made due again shortly, never dropped. Once stopping,
        nothing is claimed: each job's message is made due again for another worker.
        Raises RedisUnavailable when the job store cannot be reached (nothing was claimed then).
        """
        if self._stopping:
            for job_id in job_ids:
                self.store.reschedule(job_id, 0)
            return
        with self._lock:
            fresh = [job_id for job_id in job_ids if job_id not in self._held]
        for job_id in job_ids:
            if job_id not in fresh and self.store.reschedule(job_id, HELD_RESCHEDULE_S):
                log.info("job %s: message for an earlier attempt still held here; sent again in %g s", job_id,
                         HELD_RESCHEDULE_S)
        claimed: list[Held] = []
        now = self.clock()
        for job_id, claim in zip(fresh, self.store.claim_many(fresh, self.worker_id, lease_s=self.lease_s,
                                                               max_attempts=MAX_ATTEMPTS), strict=True):
            if claim.outcome in (ClaimOutcome.CLAIMED, ClaimOutcome.PROMOTE) and claim.job is not None:
                held = Held(claim.job, claim.job.priority, claim.outcome == ClaimOutcome.PROMOTE, now)
                with self._lock:
                    self._held[job_id] = held
                claimed.append(held)
            elif claim.outcome in (ClaimOutcome.FAILED, ClaimOutcome.EXPIRED):
                reason = ("its worker was lost on the last attempt" if claim.outcome == ClaimOutcome.FAILED
                          else "its deadline passed before it started")
                log.warning("job %s: %s (%s)", job_id, claim.state, reason)
                self._notify(job_id, claim.callback_token)
            elif claim.outcome == ClaimOutcome.MISSING:
                log.warning("job %s: no such job (expired or never created); message dropped", job_id)
            else:
                log.debug("job %s: %s, message dropped", job_id,
                          "held by another worker" if claim.outcome == ClaimOutcome.BUSY else f"already {claim.state}")
        # Interactive jobs run alone. Bulk jobs run in batch-sized groups on the job threads, or as one group
        # per message through the codec pool: one load and one store call, one finishing round trip.
        if priority is Priority.INTERACTIVE:
            size = 1
        else:
            size = self.group_size if self.codec is None else max(1, len(claimed))
        for start in range(0, len(claimed), size):
            self._queue.put(priority, tuple(claimed[start:start + size]))

    def inflight(self) -> int:
        with self._lock:
            return len(self._held)

    def held(self) -> list[tuple[str, int, bool]]:
        """(job id, attempt, begun) of every job this worker holds: what the lease keeper renews. A job a thread
        has not begun is not charged an attempt if this worker is lost."""
        with self._lock:
            return [(held.job_id, held.attempts, held.started) for held in self._held.values()]

    def abandon(self, job_ids: Sequence[str]) -> None:
        """Forget jobs this worker no longer owns (cancelled, or taken over); their results are dropped."""
        with self._lock:
            for job_id in job_ids:
                if job_id in self._held:
                    self._held[job_id].abandoned = True

    def timed_out(self) -> list[str]:
        """Ids of jobs whose current attempt has run longer than the job timeout."""
        limit = self.clock() - self.job_timeout_s
        with self._lock:
            return [h.job_id for h in self._held.values() if h.claimed_at < limit and not h.abandoned]

    def expire(self, job_id: str) -> None:
        """End an attempt that ran past the job timeout (a transient `timeout`)."""
        with self._lock:
            held = self._held.get(job_id)
            if held is None:
                return
            held.abandoned = True
        self._fail(held, JobTimeout(f"attempt ran longer than {self.job_timeout_s:g} s"))

    # --- shutdown -------------------------------------------------------------------------------

    def stop(self, *, timeout: float = 60.0) -> list[str]:
        """Give back jobs not started (queued again, their messages due now, their attempts returned), then
        wait up to `timeout` for started ones; returns the ids given back."""
        self._stopping = True
        unstarted: list[Held] = []
        for group in self._queue.drain():
            for held in group:
                with self._lock:
                    if self._held.pop(held.job_id, None) is not None and not held.started:
                        unstarted.append(held)
        moved = self.store.transition_many([
            Change(h.job_id, JobState.RUNNING, JobState.QUEUED, owner=self.worker_id, attempt=h.attempts,
                   give_back=not h.promote_only) for h in unstarted])
        released = [held.job_id for held, ok in zip(unstarted, moved, strict=True) if ok]
        deadline = self.clock() + timeout
        with self._idle:
            while self._held and self.clock() < deadline:
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
                for held in group:
                    held.started = True
            try:
                self._run(list(group))
            except BaseException as exc:  # a job thread survives anything, its own error handling included
                log.exception("jobs %s: unexpected error", ", ".join(h.job_id for h in group))
                self._survived(exc)
                for held in group:
                    self._fail_quietly(held, InternalError("unexpected worker error; see the worker log"))
            finally:
                for held in group:
                    self._release(held)

    def _run(self, group: list[Held]) -> None:
        promotions = [held for held in group if held.promote_only]
        if promotions:
            self._finish_promotions(promotions)
        jobs = [held for held in group if not held.promote_only]
        if not jobs:
            return
        if self.codec is not None and jobs[0].priority is Priority.BULK:
            self._run_pooled(jobs)
        else:
            self._run_inline(jobs)

    def _release(self, held: Held) -> None:
        with self._idle:
            if self._held.get(held.job_id) is held and not held.parked:
                del self._held[held.job_id]
            self._idle.notify_all()

    # --- parked steps (the job store unreachable) -----------------------------------------------------

    def _park(self, helds: Sequence[Held], step: Callable[[], None], exc: Exception) -> None:
        """Keep `helds` and retry `step` later: their work is done, only recording it waits for Redis."""
        log.warning("jobs %s: the job store is unreachable (%s); finishing them when it answers",
                    ", ".join(h.job_id for h in helds), exc)
        self._survived(exc)
        with self._lock:
            for held in helds:
                held.parked = True
            self._parked.append((list(helds), step))

    def retry_parked(self) -> int:
        """Retry the parked finishing steps (the lease keeper calls this each round); returns how many went
        through. A step that still meets an unreachable store stays parked; its jobs stay held and renewed."""
        with self._lock:
            parked, self._parked = self._parked, []
            undeleted, self._undeleted = self._undeleted, []
        for staged_uri in undeleted:
            self._discard(staged_uri)
        done = 0
        for index, (helds, step) in enumerate(parked):
            with self._lock:
                for held in helds:
                    held.parked = False  # a step that parks again (a later stage met Redis away) sets it anew
            try:  # run even for jobs lost meanwhile: the step's own checks refuse them and delete what they staged
                step()
            except RedisUnavailable:
                with self._lock:
                    for again, _ in parked[index:]:
                        for held in again:
                            held.parked = True
                    self._parked.extend(parked[index:])
                return done
            except Exception as exc:
                log.exception("jobs %s: a parked step failed", ", ".join(h.job_id for h in helds))
                self._survived(exc)
            done += 1
            self._unpark(helds)
        return done

    def _unpark(self, helds: Sequence[Held]) -> None:
        """Let go of jobs whose parked step went through (those parked again stay)."""
        for held in helds:
            self._release(held)

    def _survived(self, exc: BaseException) -> None:
        try:
            self.on_error(exc)
        except Exception:
            log.exception("error hook failed")

    def _run_inline(self, helds: list[Held]) -> None:
        """Fetch and decode each job and hand it to the batcher; then, in order, encode and stage each result.

        Staged jobs are fenced, promoted and marked succeeded together, flushed before the thread would block
        on an output not ready yet, so a result is never held back behind a slower one.
        """
        started = [work for work in map(self._start, helds) if work is not None]
        staged: list[_Work] = []
        for work in started:
            if work.future is not None and not work.future.done():
                self._complete(staged)
                staged = []
            if self._encode_and_stage(work):
                staged.append(work)
        self._complete(staged)

    def _run_pooled(self, helds: list[Held]) -> None:
        """A bulk group through the codec pool: load all, infer all (batched), stage all, finish all."""
        assert self.codec is not None
        styles: dict[str, tuple[StyleSpec, str]] = {}
        works = [work for work in (self._begin(held, styles) for held in helds) if work is not None]
        loaded = self.codec.load([LoadItem(w.held.job.input_uri, w.spec, self.max_input_pixels) for w in works])
        by_style: dict[str, list[_Work]] = {}
        for work, done in zip(works, loaded, strict=True):
            if done.error is not None:
                self._attempt_failed(work.held, done.error, work.held.job.input_uri)
                continue
            self._reached(work.held.job.input_uri)
            work.prepared = done.value
            work.timings["fetch"] = self._record("fetch", done.seconds)
            if not self._is_abandoned(work.held):
                by_style.setdefault(work.held.job.style, []).append(work)
        inferred: list[tuple[_Work, np.ndarray]] = []
        for style, group in by_style.items():  # one hand-over to the batcher per style
            began = time.perf_counter()
            try:
                outcomes = self.models.results(self.models.submit_many(
                    style, [w.prepared.pixels for w in group if w.prepared is not None], Priority.BULK))
            except Exception as exc:  # a timeout, or the style could not be loaded
                for work in group:
                    self._attempt_failed(work.held, exc)
                continue
            seconds = time.perf_counter() - began
            for work, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    self._attempt_failed(work.held, outcome)
                    continue
                work.timings["infer"] = self._record("infer", seconds)
                inferred.append((work, outcome))
        outputs = [(work, output) for work, output in inferred if not self._is_abandoned(work.held)]
        # The codec process that stages the group also fences and promotes it (one round trip, none of that work
        # in this process); what it could not fence (the job store did not answer it) is finished here.
        stored = self.codec.stage([
            StageItem(w.held.job.output_uri, output, w.spec, stage_tag(w.held),
                      Fence(w.held.job_id, w.held.attempts, self.worker_id, self.lease_s, w.results()))
            for w, output in outputs])
        staged, finished = [], []
        for (work, _), done in zip(outputs, stored, strict=True):
            if done.error is not None:
                self._attempt_failed(work.held, done.error, work.held.job.output_uri)
                continue
            self._reached(work.held.job.output_uri)
            result: Staged = done.value
            work.staged_uri, work.output_bytes = result.staged_uri, result.size
            work.timings["store"] = self._record("store", done.seconds)
            if result.fenced is None:
                staged.append(work)
            elif result.fenced:
                finished.append((work, result.promote_error))
            else:
                self._drop(work)
        self._promoted(finished)
        self._complete(staged)

    def _begin(self, held: Held, styles: dict[str, tuple[StyleSpec, str]]) -> _Work | None:
        """A job's work record with its style resolved (through `styles`, the lookups of one group);
        None (the job handled) on an error or cancellation."""
        job = held.job
        if self._is_abandoned(held):  # cancelled while it waited here
            return None
        if self._held_back(held):
            return None
        work = _Work(held)
        if job.started_at and job.created_at:
            work.timings["queued"] = round(max(0.0, parse_iso(job.started_at) - parse_iso(job.created_at)) * 1000, 1)
        try:
            if job.style not in styles:
                styles[job.style] = self.models.spec_and_model(job.style)
            work.spec, work.model = styles[job.style]
        except Exception as exc:
            self._attempt_failed(held, exc)
            return None
        return work

    def _start(self, held: Held) -> _Work | None:
        """Fetch, decode, submit for inference; None (the job handled) on an error or cancellation."""
        work = self._begin(held, {})
        if work is None:
            return None
        job = held.job
        try:
            started = time.perf_counter()
            try:
                data = self.storage.read(job.input_uri)
            except JobError as exc:
                self._attempt_failed(held, exc, job.input_uri)
                return None
            self._reached(job.input_uri)
            work.prepared = prepare(data, work.spec, max_pixels=self.max_input_pixels)
            work.timings["fetch"] = self._stage("fetch", started)
            work.submitted = time.perf_counter()
            work.future = self.models.submit(job.style, work.prepared.pixels, held.priority)
        except Exception as exc:
            self._attempt_failed(held, exc)
            return None
        return work

    def _encode_and_stage(self, work: _Work) -> bool:
        """Wait for one output, encode it and stage it; False (the job handled) on an error or cancellation."""
        held, spec = work.held, work.spec
        try:
            assert work.future is not None
            output = self.models.result(work.future)
            work.timings["infer"] = self._stage("infer", work.submitted)
            if self._is_abandoned(held):
                return False
            started = time.perf_counter()
            encoded = render(output, spec)
            try:
                work.staged_uri = self.storage.stage(held.job.output_uri, encoded, spec.content_type,
                                                     tag=stage_tag(held))
            except JobError as exc:
                self._attempt_failed(held, exc, held.job.output_uri)
                return False
            self._reached(held.job.output_uri)
            work.output_bytes = len(encoded)
            work.timings["store"] = self._stage("store", started)
        except Exception as exc:
            self._attempt_failed(held, exc)
            return False
        return True

    # --- finishing: fence, promote, succeed ---------------------------------------------------------

    def _complete(self, staged: list[_Work]) -> None:
        """Fence the staged outputs, promote those fenced, mark them succeeded; a lost job's staged output is
        deleted, never promoted."""
        if not staged:
            return
        try:
            fenced = self.store.fence_many(
                self.worker_id, [(w.held.job_id, w.held.attempts, w.staged_uri, w.results()) for w in staged],
                lease_s=self.lease_s)
        except RedisUnavailable as exc:  # fencing again with the same staged output is harmless
            self._park([w.held for w in staged], lambda: self._complete(staged), exc)
            return
        promoted: list[_Work] = []
        for work, ok in zip(staged, fenced, strict=True):
            if ok:
                promoted.append(work)
            else:
                self._drop(work)
        errors = self._promote([(w.staged_uri, w.held.job.output_uri) for w in promoted])
        self._promoted(list(zip(promoted, errors, strict=True)))

    def _drop(self, work: _Work) -> None:
        """A staged output whose fence failed: this attempt no longer holds the job, so its copy goes."""
        log.info("job %s: no longer held by this attempt (cancelled or taken over); its output is dropped",
                 work.held.job_id)
        self._discard(work.staged_uri)

    def _promoted(self, finished: list[tuple[_Work, JobError | None]]) -> None:
        """After fenced outputs were promoted (here or by a codec process): delete what lost attempts of these
        jobs staged, and mark succeeded those whose promotion worked."""
        done = []
        for work, error in finished:
            if work.held.attempts > 1 or work.held.job.given_back:
                self._discard_earlier_attempts(work)
            if error is None:
                done.append(work.held)
            else:  # fenced: the next claim of this job finishes the promotion
                log.warning("job %s: promoting its output failed (%s); it will be finished on its next claim",
                            work.held.job_id, error)
        self._succeed(done)

    def _finish_promotions(self, helds: list[Held]) -> None:
        """Jobs claimed to finish a lost attempt's promotion: promote, then succeed (no model time)."""
        errors = self._promote([(h.job.staged_uri or "", h.job.output_uri) for h in helds])
        done = []
        for held, error in zip(helds, errors, strict=True):
            if error is None:
                log.info("job %s: finished the promotion of an earlier attempt's output", held.job_id)
                done.append(held)
            elif isinstance(error, JobError) and not error.transient:  # the staged output is gone: run it again
                log.warning("job %s: an earlier attempt's output is lost (%s); running it again", held.job_id, error)
                self.store.transition(held.job_id, JobState.RUNNING, JobState.QUEUED, owner=self.worker_id,
                                      attempt=held.attempts, staged_uri=None)
            else:
                log.warning("job %s: promoting its output failed (%s); trying again later", held.job_id, error)
        self._succeed(done)

    def _promote(self, items: list[tuple[str, str]]) -> list[JobError | None]:
        """Promote staged outputs: None per item, or the JobError that stopped it.

        A group of remote outputs goes to the codec pool, whose I/O threads overlap the store's round trips.
        file:// promotions are renames: here, in one storage batch scope (each directory walked once), they
        cost less than the round trip to a codec process (pickling, waking the child, the answer back).
        """
        if not items:
            return []
        local = all(output_uri.startswith("file:") for _, output_uri in items)
        if self.codec is not None and len(items) > 1 and not local:
            return [done.error for done in self.codec.promote([PromoteItem(*item) for item in items])]
        errors: list[JobError | None] = []
        with self.storage.batch() if local else nullcontext():
            for staged_uri, output_uri in items:
                try:
                    self.storage.promote(staged_uri, output_uri)
                    errors.append(None)
                except JobError as exc:
                    errors.append(exc)
                except Exception as exc:  # as the codec pool reports it: this item's failure, not the group's
                    errors.append(InternalError(f"{type(exc).__name__}: {exc}"))
        return errors

    def _succeed(self, helds: list[Held]) -> None:
        """Mark fenced-and-promoted jobs succeeded, all in one round trip."""
        if not helds:
            return
        try:
            moved = self.store.transition_many([
                Change(h.job_id, JobState.RUNNING, JobState.SUCCEEDED, owner=self.worker_id, attempt=h.attempts)
                for h in helds])
        except RedisUnavailable as exc:
            self._park(helds, lambda: self._succeed(helds), exc)
            return
        for held, result in zip(helds, moved, strict=True):
            if result:
                held.job.state = JobState.SUCCEEDED
                log.debug("job %s: succeeded -> %s", held.job_id, held.job.output_uri)
                self._notify(held.job_id, result.callback_token, held.job)
            else:
                log.info("job %s: finished after it was cancelled; its output stays at %s", held.job_id,
                         held.job.output_uri)

    def _discard_earlier_attempts(self, work: _Work) -> None:
        """Delete what lost attempts staged for this output (a worker killed between staging and fencing left
        it). Only after this attempt's fence: no other attempt can promote any more, so none of it is needed."""
        mine = f"-{work.held.job_id}."  # in every copy this job's attempts staged (stage_tag)
        try:  # another job writing the same output_uri (an explicit one) may be staging now: leave its copies
            earlier = [uri for uri in self.storage.staged_copies(work.held.job.output_uri)
                       if uri != work.staged_uri and mine in uri]
        except StyleQueueError as exc:
            log.info("job %s: could not look for earlier attempts' staged outputs: %s", work.held.job_id, exc)
            return
        for staged_uri in earlier:
            self._discard(staged_uri)

    def _discard(self, staged_uri: str) -> None:
        """Delete a staged output this attempt will not promote; a store that cannot delete it now (down, say)
        gets the delete again at each `retry_parked` until it goes through (at most MAX_UNDELETED kept)."""
        try:
            self.storage.discard(staged_uri)
        except StyleQueueError as exc:
            log.warning("could not delete a staged output %s (%s); trying again later", staged_uri, exc)
            with self._lock:
                if len(self._undeleted) < MAX_UNDELETED:
                    self._undeleted.append(staged_uri)

    # --- failures -----------------------------------------------------------------------------------

    def _reached(self, uri: str) -> None:
        if self.guard is not None:
            self.guard.succeeded(self.dependency_of(uri))

    def _held_back(self, held: Held) -> bool:
        """Hand the job back (no attempt spent) if a dependency it needs is down; True if it was."""
        if self.guard is None:
            return False
        for uri in (held.job.input_uri, held.job.output_uri):
            dependency = self.dependency_of(uri)
            if self.guard.holds(dependency):
                self._hand_back(held, dependency)
                return True
        return False

    def _hand_back(self, held: Held, dependency: str | None) -> None:
        """Back to `queued` with its attempt returned, due when the dependency is probed next."""
        delay = self.guard.retry_in(dependency) if self.guard is not None else 1.0
        error = {"code": "storage_error", "message": f"waiting for {dependency} to answer again (not this job's "
                 "fault: no attempt was spent)"}
        try:
            self.store.transition(held.job_id, JobState.RUNNING, JobState.QUEUED, owner=self.worker_id,
                                  attempt=held.attempts, delay_s=delay, give_back=True, error=error)
        except RedisUnavailable as exc:
            self._survived(exc)
            return
        log.info("job %s: handed back without spending an attempt (%s is down); due again in %.0f s",
                 held.job_id, dependency, delay)

    def _attempt_failed(self, held: Held, exc: Exception, uri: str | None = None) -> None:
        if (self.guard is not None and uri is not None and isinstance(exc, JobError) and exc.transient
                and self.guard.failed(self.dependency_of(uri), held.job_id, uri)):
            if not self._is_abandoned(held):
                self._hand_back(held, self.dependency_of(uri))
            return
        if isinstance(exc, StyleQueueError):
            error = exc if isinstance(exc, JobError) else InternalError(str(exc))
            log.info("job %s: attempt %d failed: %s: %s", held.job_id, held.attempts, error.code, error.message)
        else:
            log.exception("job %s: attempt %d failed", held.job_id, held.attempts, exc_info=exc)
            error = InternalError(f"{type(exc).__name__}: {exc}")
        if not self._is_abandoned(held):
            self._fail_quietly(held, error)
            dependency = self.dependency_of(uri) if uri is not None else None
            if self.guard is not None and error.transient and self.guard.holds(dependency):
                # The outage was declared while this failure was being recorded, too late for the guard's own
                # refund of the failures that revealed it: this job gives its attempt back itself.
                self._refund(held.job_id, error)

    def _refund(self, job_id: str, error: JobError) -> None:
        try:
            self.store.refund_attempts([job_id], error.code)
        except RedisUnavailable as exc:
            self._survived(exc)

    def _fail_quietly(self, held: Held, error: JobError) -> None:
        """`_fail`, parked while the job store cannot be reached."""
        try:
            self._fail(held, error)
        except RedisUnavailable as exc:
            self._park([held], lambda: self._fail(held, error), exc)

    def _fail(self, held: Held, error: JobError) -> None:
        """Map an attempt's error to the job's next state: a retry or a failure (the one place)."""
        if error.transient and held.attempts < MAX_ATTEMPTS:
            delay = RETRY_BACKOFF_S[min(held.attempts, len(RETRY_BACKOFF_S)) - 1]
            if self.store.transition(held.job_id, JobState.RUNNING, JobState.QUEUED, owner=self.worker_id,
                                     attempt=held.attempts, delay_s=delay, error=error.to_error()):
                log.info("job %s: transient %s; retry %d of %d in %.0f s", held.job_id, error.code,
                         held.attempts + 1, MAX_ATTEMPTS, delay)
            return
        moved = self.store.transition(held.job_id, JobState.RUNNING, JobState.FAILED, owner=self.worker_id,
                                      attempt=held.attempts, error=error.to_error())
        if moved:
            log.info("job %s: failed: %s: %s", held.job_id, error.code, error.message)
            self._notify(held.job_id, moved.callback_token)

    # --- small helpers ------------------------------------------------------------------------------

    def _stage(self, stage: str, started: float) -> float:
        return self._record(stage, time.perf_counter() - started)

    def _record(self, stage: str, seconds: float) -> float:
        self.on_stage(stage, seconds)
        return round(seconds * 1000, 1)

    def _is_abandoned(self, held: Held) -> bool:
        with self._lock:
            return held.abandoned or self._held.get(held.job_id) is not held

    def _notify(self, job_id: str, token: int, job: Job | None = None) -> None:
        try:
            self.on_finished(job if job is not None else self.store.get(job_id), token)
        except Exception:
            log.exception("job %s: after-finish hook failed", job_id)
