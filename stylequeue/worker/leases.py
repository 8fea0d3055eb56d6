"""Keeping jobs alive and bringing lost ones back (SPEC section 4, "Ownership").

One `LeaseKeeper` thread per worker process, every `tick_s` seconds:
- renews the leases of the jobs this worker holds, and drops those it no longer owns (cancelled,
  taken over after a stall);
- ends attempts that ran past STYLEQUEUE_JOB_TIMEOUT_S;
- reaps jobs of any worker whose lease expired: back to `queued` and sent again (a killed worker's
  jobs finish elsewhere whether or not the broker redelivers their messages);
- sends again jobs whose retry is due, and webhook deliveries whose retry is due.
Schedules hand each due item to one worker (`take_due` is atomic) and keep it until it was sent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from stylequeue.errors import StyleQueueError
from stylequeue.jobs import CALLBACK_DUE_KEY, RETRY_KEY, JobState, RedisJobStore
from stylequeue.worker.execution import JobExecutor

log = logging.getLogger("stylequeue.worker.leases")


class LeaseKeeper:
    """Background thread doing the periodic duties above.

    Args:
        send_job: send a job's message again: (job_id, priority).
        send_callback: put a webhook delivery on the callbacks queue: (job_id).
        heartbeat: JSON-able info published with each heartbeat.
    """

    def __init__(self, *, store: RedisJobStore, executor: JobExecutor | None, worker_id: str, lease_s: float,
                 send_job: Callable[[str, str], None], send_callback: Callable[[str], None],
                 heartbeat: Callable[[], dict[str, Any]], tick_s: float | None = None) -> None:
        self.store = store
        self.executor = executor
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.send_job = send_job
        self.send_callback = send_callback
        self.heartbeat = heartbeat
        self.tick_s = tick_s if tick_s is not None else max(0.2, min(5.0, lease_s / 3))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except StyleQueueError as exc:  # Redis away for a moment: try again next tick
                log.warning("lease keeper: %s", exc)
            except Exception:
                log.exception("lease keeper: unexpected error")

    def tick(self, now: float | None = None) -> None:
        """One round of duties (public so tests can drive it deterministically)."""
        self.store.heartbeat(self.worker_id, self.heartbeat())
        if self.executor is not None:
            lost = self.store.renew_leases(self.worker_id, self.executor.running_ids(), lease_s=self.lease_s)
            if lost:
                log.info("no longer holding %s (cancelled or taken over)", ", ".join(lost))
                self.executor.abandon(lost)
            for job_id in self.executor.timed_out():
                self.executor.expire(job_id)
        self.reap(now)
        self.send_due(now)

    def reap(self, now: float | None = None) -> None:
        for job_id in self.store.expired_leases(now=now):
            outcome = self.store.reap(job_id, now=now)
            if outcome == "requeued":
                job = self.store.get(job_id)
                log.warning("job %s: lease of %s expired; requeued and sent again", job_id, job.owner or "a worker")
                self.send_job(job_id, job.priority)
            elif outcome == "failed":
                log.warning("job %s: lease expired on its last attempt; failed (internal)", job_id)
                if self.store.get(job_id).callback_url:  # the reaping script recorded it as pending
                    self.send_callback(job_id)

    def send_due(self, now: float | None = None) -> None:
        due_jobs = self.store.take_due(RETRY_KEY, now=now)
        sent = []
        for job_id in due_jobs:
            try:
                job = self.store.get(job_id)
            except StyleQueueError:
                sent.append(job_id)  # expired or unknown: nothing to send
                continue
            if job.state == JobState.QUEUED:
                self.send_job(job_id, job.priority)
            sent.append(job_id)
        self.store.done_due(RETRY_KEY, sent)
        due_callbacks = self.store.take_due(CALLBACK_DUE_KEY, now=now)
        for job_id in due_callbacks:
            self.send_callback(job_id)
        self.store.done_due(CALLBACK_DUE_KEY, due_callbacks)

