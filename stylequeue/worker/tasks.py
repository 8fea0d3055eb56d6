"""The Celery tasks: thin edges that hand job ids (or a callback delivery) to this process's WorkerService.

Imported by a worker through the app's `include`; `celery -A stylequeue.worker.app worker` builds the
service from the environment on `worker_init`, `stylequeue worker` builds and installs it first.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import shared_task, signals
from celery.exceptions import Reject

from stylequeue.broker import BULK_TASK, CALLBACK_TASK, INTERACTIVE_TASK
from stylequeue.errors import RedisUnavailable
from stylequeue.jobs import Priority
from stylequeue.worker.service import WorkerOptions, WorkerService

log = logging.getLogger("stylequeue.worker")

# A message whose jobs could not be claimed (the job store away) goes back to its queue after this pause,
# so a broker that redelivers at once does not spin the worker.
REQUEUE_PAUSE_S = 1.0

_service: WorkerService | None = None
_lock = threading.Lock()


def install(started: WorkerService) -> None:
    """Use an already started service (the `stylequeue worker` command builds it before Celery starts)."""
    global _service
    _service = started


def service() -> WorkerService:
    if _service is None:
        raise RuntimeError("the stylequeue worker service has not started")
    return _service


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _start_service(sender: Any = None, **_: Any) -> None:
    """Load models and start the lease keeper before the consumer takes any message."""
    global _service
    with _lock:
        if _service is not None:
            return
        app = sender.app
        settings = app.conf.stylequeue_settings
        _service = WorkerService(settings, WorkerOptions(), app).start()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _consumer_ready(sender: Any = None, **_: Any) -> None:
    if _service is not None:
        _service.attach_consumer(sender)
        log.info("worker %s ready", _service.worker_id)


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_service(**_: Any) -> None:
    global _service
    with _lock:
        if _service is not None:
            _service.stop()
            _service = None


def _accept(job_ids: list[str], priority: Priority) -> int:
    try:
        return service().accept(job_ids, priority)
    except RedisUnavailable as exc:
        # Nothing was claimed: hand the message back rather than acknowledge its jobs away.
        log.warning("job store unreachable; message for %d job(s) returned to its queue: %s", len(job_ids), exc)
        time.sleep(REQUEUE_PAUSE_S)
        raise Reject(str(exc), requeue=True) from exc


@shared_task(name=INTERACTIVE_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def interactive(job_id: str) -> int:
    """One interactive job: claimed here, run by the executor ahead of every bulk job."""
    return _accept([job_id], Priority.INTERACTIVE)


@shared_task(name=BULK_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def bulk(job_ids: list[str]) -> int:
    """A chunk of bulk jobs; jobs already finished or held by a live worker are skipped."""
    return _accept(list(job_ids), Priority.BULK)


@shared_task(name=CALLBACK_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def callback(job_id: str, token: int | None = None) -> None:
    """One webhook delivery, queued on the worker's callback threads; its outbox entry keeps it owed."""
    if token is None:  # a message from before delivery tokens: the outbox sends a new one when due
        log.info("job %s: callback message without a delivery token ignored; the outbox resends it", job_id)
        return
    service().deliver_callback(job_id, token)
