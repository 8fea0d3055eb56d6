"""Where a job is reported: webhook deliveries from the callbacks outbox (docs/webhooks.md), on their own threads.

The script that finishes a job with a `callback_url` records `callback = {"state": "pending", ...}` and puts
the job on `callbacks:due` with a delivery token (jobs/scripts.py `finish`). Whoever holds a token sends a
message on `stylequeue.callbacks` carrying it (the finishing worker at once; any worker's lease keeper once an
entry comes due again). The callback task hands the delivery to this process's `CallbackDispatcher` and
returns: deliveries never take a Celery or job thread, so a receiver that never answers stalls no job.

One attempt (`deliver_one`): begin (the token must still hold the entry; a fresh lease for this attempt),
POST the signed record (stylequeue/webhooks.py), record the outcome: delivered, failed for good (410, refused,
or the schedule ran out), or a retry at 5 s, 30 s, 2 min, 10 min, 30 min (or the receiver's Retry-After),
which puts the entry back on `callbacks:due` at that time. A deliverer that dies mid-attempt leaves the entry
due when its lease ends. Delivery never changes the job's own state.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from stylequeue.errors import JobNotFound, StyleQueueError
from stylequeue.jobs import Job, RedisJobStore

log = logging.getLogger("stylequeue.worker.callbacks")

# Threads delivering callbacks in one worker process, and how many of them may wait on one host at once:
# a slow receiver gets a share of the pool, never all of it.
DELIVERY_THREADS = 16
PER_HOST = 4
# Deliveries waiting here for a host's turn, at most; beyond that a delivery is left to come due again.
MAX_WAITING_PER_HOST = 256
CONNECT_TIMEOUT_S = 3.0


def message_id(job: Job) -> str:
    """`webhook-id`: unique per job and event, the same on every retry (receivers deduplicate on it)."""
    return f"msg_{job.id}_{job.state}"


@dataclass(frozen=True)
class Delivery:
    """A callback to deliver: the job and the token that holds its entry on `callbacks:due`."""

    job_id: str
    token: int


def deliver_one(store: RedisJobStore, delivery: Delivery, *, secret_for: Callable[[Job], str | list[str] | None],
                allow_private: bool, render: Callable[[Job], dict[str, Any]],
                timeout_s: float = 15.0) -> dict[str, Any] | None:
    """One delivery attempt; returns the `callback` record written, or None when there was nothing to do
    (delivered or given up already, another deliverer holds it, or the record expired).

    `secret_for(job)` gives the secret(s) that sign the job's callback (its tenant's, or the worker's).
    """
    from stylequeue.webhooks import deliver, next_delay, webhook_headers

    token = store.callback_begin(delivery.job_id, delivery.token)
    if not token:
        log.debug("job %s: callback held elsewhere or done; nothing to send", delivery.job_id)
        return None
    try:
        job = store.get(delivery.job_id)
    except JobNotFound:
        store.callback_record(delivery.job_id, token, {"state": "failed"}, None)
        log.warning("job %s: record expired before its callback could be sent", delivery.job_id)
        return None
    state = job.callback or {"state": "pending", "attempts": 0}
    if not job.finished or not job.callback_url or state.get("state") in ("delivered", "failed"):
        store.callback_record(delivery.job_id, token, state, None)
        return None
    body = json.dumps(render(job), separators=(",", ":")).encode()
    headers = webhook_headers(secret_for(job), message_id(job), body)
    result = deliver(job.callback_url, body, headers, allow_private=allow_private, timeout_s=timeout_s,
                     connect_timeout_s=CONNECT_TIMEOUT_S)
    attempts = int(state.get("attempts", 0)) + 1
    record: dict[str, Any] = {"state": "pending", "attempts": attempts, "last_status": result.status,
                              "next_attempt_at": None}
    retry_in: float | None = None
    if result.ok:
        record["state"] = "delivered"
        log.info("job %s: callback delivered (HTTP %s, attempt %d)", job.id, result.status, attempts)
    else:
        record["last_error"] = result.error
        retry_in = None if result.permanent else next_delay(attempts, result.retry_after_s)
        if retry_in is None:
            record["state"] = "failed"
            log.warning("job %s: callback failed for good after %d attempts: %s", job.id, attempts, result.error)
        else:
            log.info("job %s: callback attempt %d failed (%s); next in %.0f s", job.id, attempts, result.error,
                     retry_in)
    if not store.callback_record(job.id, token, record, retry_in):
        log.warning("job %s: callback attempt %d outlived its lease; its outcome was not recorded", job.id, attempts)
        return None
    return record


class CallbackDispatcher:
    """A bounded pool of delivery threads, at most PER_HOST of them on one receiver host at a time.

    `submit` never blocks: a delivery waits here for its host's turn (up to MAX_WAITING_PER_HOST per host;
    past that it is dropped, and its entry comes due again when its lease ends).
    """

    def __init__(self, deliver: Callable[[Delivery], Any], *, threads: int = DELIVERY_THREADS,
                 per_host: int = PER_HOST) -> None:
        self._deliver = deliver
        self._per_host = per_host
        self._lock = threading.Condition()
        self._waiting: dict[str, deque[Delivery]] = {}
        self._busy: dict[str, int] = {}
        self._ready: deque[str] = deque()  # hosts with waiting deliveries and a free slot
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"callback-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, delivery: Delivery, host: str) -> bool:
        """Queue a delivery for `host` (the callback URL's host); False if it was dropped."""
        with self._lock:
            waiting = self._waiting.setdefault(host, deque())
            if len(waiting) >= MAX_WAITING_PER_HOST:
                return False
            waiting.append(delivery)
            if self._busy.get(host, 0) < self._per_host and host not in self._ready:
                self._ready.append(host)
                self._lock.notify()
            return True

    def pending(self) -> int:
        with self._lock:
            return sum(len(waiting) for waiting in self._waiting.values()) + sum(self._busy.values())

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout / max(1, len(self._threads)))

    def _take(self) -> tuple[str, Delivery] | None:
        with self._lock:
            while not self._ready:
                if self._closed:
                    return None
                self._lock.wait()
            host = self._ready.popleft()
            waiting = self._waiting[host]
            delivery = waiting.popleft()
            self._busy[host] = self._busy.get(host, 0) + 1
            if waiting and self._busy[host] < self._per_host:
                self._ready.append(host)
                self._lock.notify()  # another thread may take this host's next delivery
            elif not waiting:
                del self._waiting[host]
            return host, delivery

    def _done(self, host: str) -> None:
        with self._lock:
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]
            if self._waiting.get(host) and host not in self._ready:
                self._ready.append(host)
                self._lock.notify()

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            host, delivery = taken
            try:
                self._deliver(delivery)
            except StyleQueueError as exc:  # the job store away for a moment: the entry comes due again
                log.warning("job %s: callback attempt not made: %s", delivery.job_id, exc)
            except Exception:
                log.exception("job %s: callback delivery failed unexpectedly", delivery.job_id)
            finally:
                self._done(host)


def host_of(url: str | None) -> str:
    """The host a callback URL names (the unit of PER_HOST), '' when it has none."""
    try:
        return (urlsplit(url or "").hostname or "").lower()
    except ValueError:
        return ""
