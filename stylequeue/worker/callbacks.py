"""Where a job is reported: webhook delivery as its own task on `stylequeue.callbacks` (SPEC section 7).

A finished job with a `callback_url` gets `callback = {"state": "pending", ...}` in the same Lua
script that finishes it (jobs.py), then a message on the callbacks queue. Each delivery is one
signed POST (stylequeue/webhooks.py). A failed attempt is scheduled again in the `callbacks:due`
sorted set (5 s, 30 s, 2 min, 10 min, 30 min, or the receiver's Retry-After) and moved back onto
the queue by a worker's lease keeper when due — never a Celery countdown, which over Redis would
outlive the visibility timeout and be delivered twice.
Delivery never changes the job's state.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from stylequeue.errors import JobNotFound
from stylequeue.jobs import CALLBACK_DUE_KEY, Job, RedisJobStore, iso_now

log = logging.getLogger("stylequeue.worker.callbacks")


def message_id(job: Job) -> str:
    """`webhook-id`: unique per job and event, the same on every retry (receivers deduplicate on it)."""
    return f"msg_{job.id}_{job.state}"


def deliver_callback(store: RedisJobStore, job_id: str, *, secret: str | None, allow_private: bool,
                     render: Callable[[Job], dict[str, Any]], timeout_s: float = 15.0) -> dict[str, Any] | None:
    """One delivery attempt for a finished job; updates and returns the job's `callback` field.

    `render` turns the job into its public JSON (with a fresh `output_url`). A redelivered message for
    a callback already delivered or given up is a no-op (returns None).
    """
    from stylequeue.webhooks import deliver, next_delay, webhook_headers

    try:
        job = store.get(job_id)
    except JobNotFound:
        log.warning("job %s: record expired before its callback could be sent", job_id)
        return None
    if not job.finished or not job.callback_url:
        return None
    state = job.callback or {"state": "pending", "attempts": 0}
    if state.get("state") in ("delivered", "failed"):
        return None
    body = json.dumps(render(job), separators=(",", ":")).encode()
    headers = webhook_headers(secret, message_id(job), body)
    result = deliver(job.callback_url, body, headers, allow_private=allow_private, timeout_s=timeout_s)
    attempts = int(state.get("attempts", 0)) + 1
    record: dict[str, Any] = {"state": "pending", "attempts": attempts, "last_status": result.status,
                              "next_attempt_at": None}
    if result.ok:
        record["state"] = "delivered"
        log.info("job %s: callback delivered (HTTP %s, attempt %d)", job_id, result.status, attempts)
    else:
        delay = None if result.permanent else next_delay(attempts, result.retry_after_s)
        if delay is None:
            record["state"] = "failed"
            log.warning("job %s: callback failed for good after %d attempts: %s", job_id, attempts, result.error)
        else:
            due = time.time() + delay
            record["next_attempt_at"] = iso_now(due)
            store.schedule(CALLBACK_DUE_KEY, job_id, due)
            log.info("job %s: callback attempt %d failed (%s); next in %.0f s", job_id, attempts, result.error, delay)
    store.update(job_id, callback=record)
    return record
