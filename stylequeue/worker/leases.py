"""Keeping jobs alive, and bringing back what is owed (docs/jobs.md: leases, the due set, the sweep).

One `LeaseKeeper` thread per worker process. Every `tick_s` seconds it
- publishes the worker's heartbeat;
- renews the leases of the jobs this worker holds (per attempt) and abandons those it no longer holds
  (cancelled, taken over);
- ends attempts that ran past STYLEQUEUE_JOB_TIMEOUT_S;
- reaps jobs of any worker whose lease ended: back to `queued` with their message due in the same script
  (or failed after the last attempt), so a killed worker's jobs finish elsewhere.
Every `due_tick_s` (sooner: retries wait one or four seconds) it drains the due sets: it sends the message of
each job whose message is owed, then moves the entry to `sent` only if it is still the one it took; and it
sends a delivery message for each callback that came due. Every `watch_every_s`, one worker at a time looks
at `sent`: a job whose message went out more than `lost_after_s` ago, still unclaimed while its broker queue
is empty, had its message lost by the broker (a worker killed between taking a message and recording it):
it is owed again. Every `sweep_every_s`, one worker at a time sweeps: jobs queued for several visibility
periods on neither `due` nor `sent` are scheduled again and counted (in a correct system the count stays 0).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from stylequeue.errors import StyleQueueError
from stylequeue.jobs import CALLBACK_LEASE_S, CALLBACKS_DUE, DUE, JobState, Priority, ReapOutcome, RedisJobStore
from stylequeue.jobs.presence import Presence

log = logging.getLogger("stylequeue.worker.leases")

DUE_TICK_S = 0.5
DUE_BATCH = 500
WATCH_EVERY_S = 2.0
WATCH_LOCK = "watch:lock"
SWEEP_EVERY_S = 60.0
SWEEP_LOCK = "sweep:lock"


class Holder(Protocol):
    """What the keeper needs of the executor."""

    def held(self) -> list[tuple[str, int, bool]]: ...

    def retry_parked(self) -> int: ...

    def abandon(self, job_ids: Sequence[str]) -> None: ...

    def timed_out(self) -> list[str]: ...

    def expire(self, job_id: str) -> None: ...


class LeaseKeeper:
    """Background thread doing the periodic duties above.

    Args:
        send_jobs: send messages for jobs of one priority: (job ids, priority).
        send_callback: send a delivery message: (job id, token).
        queue_depths: messages waiting per broker queue of each priority (for the sweep).
        heartbeat: JSON-able info published with each heartbeat.
        sweep_after_s: how long a job may sit queued with no message owed before the sweep looks at it.
        lost_after_s: how long after its message went out an unclaimed job's message counts as lost (if its
            broker queue is empty by then).
        probe: called every round (the outage guard's `probe_due`), so a dependency found down is probed on time.
        clock: monotonic seconds (tests inject a fake one and call the duties directly).
    """

    def __init__(self, *, store: RedisJobStore, executor: Holder | None, worker_id: str, lease_s: float,
                 send_jobs: Callable[[Sequence[str], Priority], None], send_callback: Callable[[str, int], None],
                 queue_depths: Callable[[], dict[Priority, int]], heartbeat: Callable[[], dict[str, Any]],
                 sweep_after_s: float, lost_after_s: float = 60.0, tick_s: float | None = None,
                 due_tick_s: float = DUE_TICK_S, watch_every_s: float = WATCH_EVERY_S,
                 sweep_every_s: float = SWEEP_EVERY_S, probe: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.presence = Presence(store)
        self.executor = executor
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.send_jobs = send_jobs
        self.send_callback = send_callback
        self.queue_depths = queue_depths
        self.heartbeat = heartbeat
        self.sweep_after_s = sweep_after_s
        self.tick_s = tick_s if tick_s is not None else max(0.2, min(5.0, lease_s / 3))
        self.due_tick_s = min(due_tick_s, self.tick_s)
        self.sweep_every_s = sweep_every_s
        self.lost_after_s = lost_after_s
        self.watch_every_s = watch_every_s
        self.probe = probe or (lambda: None)
        self.clock = clock
        self.sweep_found = 0  # jobs this worker's sweeps scheduled (a metric: it should stay 0)
        self.resent = 0  # jobs whose lost message this worker's watch made owed again
        self.errors = 0  # rounds that failed (Redis away for a moment)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        next_tick = next_watch = next_sweep = self.clock()
        while not self._stop.wait(self.due_tick_s):
            now = self.clock()
            self._probe()
            try:
                if self.executor is not None:
                    self.executor.retry_parked()
                if now >= next_tick:
                    next_tick = now + self.tick_s
                    self.tick()
                self.drain()
                if now >= next_watch:
                    next_watch = now + self.watch_every_s
                    self.watch()
                if now >= next_sweep:
                    next_sweep = now + self.sweep_every_s
                    self.sweep()
            except StyleQueueError as exc:  # Redis away for a moment: try again next round
                self.errors += 1
                log.warning("lease keeper: %s", exc)
            except Exception:
                self.errors += 1
                log.exception("lease keeper: unexpected error")

    def _probe(self) -> None:
        try:
            self.probe()
        except Exception:
            log.exception("lease keeper: probing a dependency failed unexpectedly")

    # --- the duties (public so tests drive them deterministically) ----------------------------------

    def tick(self) -> None:
        """Heartbeat, renew, time out, reap."""
        self.presence.heartbeat(self.worker_id, self.heartbeat())
        if self.executor is not None:
            lost = self.store.renew_leases(self.worker_id, self.executor.held(), lease_s=self.lease_s)
            if lost:
                log.info("no longer holding %s (cancelled, taken over or given back)", ", ".join(lost))
                self.executor.abandon(lost)
            for job_id in self.executor.timed_out():
                self.executor.expire(job_id)
        self.reap()

    def reap(self) -> None:
        for reaped in self.store.reap(self.store.expired_leases()):
            owner = reaped.previous_owner or "an unknown worker"
            if reaped.outcome == ReapOutcome.REQUEUED:
                log.warning("job %s: lease of %s ended; queued again, its message due now", reaped.job_id, owner)
            elif reaped.outcome == ReapOutcome.FAILED:
                log.warning("job %s: lease of %s ended on its last attempt; failed (internal)", reaped.job_id, owner)
                if reaped.callback_token:
                    self.send_callback(reaped.job_id, reaped.callback_token)

    def drain(self) -> None:
        """Send what is due: job messages (then drop their entries, if still theirs) and callback deliveries."""
        taken = self.store.take_due(DUE, limit=DUE_BATCH)
        if taken:
            by_priority: dict[Priority, list[str]] = {}
            sent: list[tuple[str, int]] = []
            stale: list[tuple[str, int]] = []
            for item, (state, priority) in zip(taken, self._states([j for j, _ in taken]), strict=True):
                if state is JobState.QUEUED and priority is not None:
                    by_priority.setdefault(priority, []).append(item[0])
                    sent.append(item)
                else:
                    stale.append(item)
            for priority, job_ids in by_priority.items():
                self.send_jobs(job_ids, priority)
            self.store.sent_due(sent)
            self.store.done_due(DUE, stale)
            if sent:
                log.info("sent %d job messages that were due (retries, give-backs, reaped, unsent or lost)",
                         len(sent))
        for job_id, token in self.store.take_due(CALLBACKS_DUE, limit=DUE_BATCH, hold_s=CALLBACK_LEASE_S):
            self.send_callback(job_id, token)

    def _states(self, job_ids: Sequence[str]) -> list[tuple[JobState | None, Priority | None]]:
        jobs = self.store.get_many(job_ids)
        return [(job.state, job.priority) if job is not None else (None, None) for job in jobs]

    def _behind_empty_queues(self, candidates: Sequence[tuple[str, Priority]]) -> list[str]:
        """The candidates whose broker queue is empty: a job waiting behind others in its queue is not lost."""
        depths = self.queue_depths()
        return [job_id for job_id, priority in candidates if depths.get(priority, 0) == 0]

    def watch(self) -> int:
        """Owe again the messages the broker lost: jobs sent long ago, unclaimed, with their queue empty."""
        if not self.store.try_lock(WATCH_LOCK, self.worker_id, self.watch_every_s):
            return 0
        candidates = self.store.lost_candidates(older_than_s=self.lost_after_s)
        if not candidates:
            return 0
        lost = self._behind_empty_queues(candidates)
        resent = self.store.resend_lost(lost, older_than_s=self.lost_after_s)
        if resent:
            self.resent += resent
            log.warning("%d jobs' messages were lost by the broker (sent %g s ago, never claimed, their queue "
                        "empty); they are owed again", resent, self.lost_after_s)
        return resent

    def sweep(self) -> int:
        """Belt and braces: schedule jobs queued long ago with no message owed whose broker queue is empty."""
        if not self.store.try_lock(SWEEP_LOCK, self.worker_id, self.sweep_every_s):
            return 0
        candidates = self.store.sweep_candidates(older_than_s=self.sweep_after_s)
        if not candidates:
            return 0
        found = self.store.sweep(self._behind_empty_queues(candidates))
        if found:
            self.sweep_found += found
            log.error("sweep: %d queued jobs had no message and none owed; scheduled them again", found)
        return found

