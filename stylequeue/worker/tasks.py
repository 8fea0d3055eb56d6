"""The Celery tasks: thin edges that hand job ids to this process's WorkerService.

Imported by a worker through the app's `include`; `celery -A stylequeue.worker.app worker` builds the
service from the environment on `worker_init`, `stylequeue worker` builds and installs it first.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import shared_task, signals

from stylequeue.worker.messages import BULK_TASK, CALLBACK_TASK, INTERACTIVE_TASK
from stylequeue.worker.service import WorkerOptions, WorkerService

log = logging.getLogger("stylequeue.worker")

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


@signals.worker_init.connect
def _start_service(sender: Any = None, **_: Any) -> None:
    """Load models and start the lease keeper before the consumer takes any message."""
    global _service
    with _lock:
        if _service is not None:
            return
        app = sender.app
        settings = app.conf.stylequeue_settings
        _service = WorkerService(settings, WorkerOptions(), app).start()


@signals.worker_ready.connect
def _consumer_ready(sender: Any = None, **_: Any) -> None:
    if _service is not None:
        _service.attach_consumer(sender)
        log.info("worker %s ready", _service.worker_id)


@signals.worker_shutdown.connect
def _stop_service(**_: Any) -> None:
    global _service
    with _lock:
        if _service is not None:
            _service.stop()
            _service = None


@shared_task(name=INTERACTIVE_TASK, ignore_result=True)
def interactive(job_id: str) -> int:
    """One interactive job: claimed here, run by the executor ahead of every bulk job."""
    return service().accept([job_id], "interactive")


@shared_task(name=BULK_TASK, ignore_result=True)
def bulk(job_ids: list[str]) -> int:
    """A chunk of bulk jobs; jobs already finished or held by a live worker are skipped."""
    return service().accept(list(job_ids), "bulk")


@shared_task(name=CALLBACK_TASK, ignore_result=True)
def callback(job_id: str) -> None:
    """One webhook delivery attempt; failures are rescheduled in Redis, not with a countdown."""
    service().deliver_callback(job_id)
