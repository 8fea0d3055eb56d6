"""The Celery app, built from Settings.

`stylequeue worker` and `celery -A stylequeue.worker.app worker` both use it; producers use the same
factory only to send messages. Choices that matter for not losing jobs:
- JSON only (never pickle): a message is data, not code.
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged after its jobs are done;
  a worker killed mid-job leaves it unacknowledged, so the broker delivers it again.
- Redis `visibility_timeout` = STYLEQUEUE_VISIBILITY_TIMEOUT_S: an unacknowledged message of a dead
  worker comes back after that long (jobs come back sooner through leases: see worker/leases.py).
- `queue_order_strategy: priority`: a worker polls `stylequeue.interactive` before `stylequeue.bulk`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from stylequeue.config.settings import Settings, load_settings
from stylequeue.worker.messages import (
    BULK_QUEUE,
    BULK_TASK,
    CALLBACK_QUEUE,
    CALLBACK_TASK,
    INTERACTIVE_QUEUE,
    INTERACTIVE_TASK,
)


def make_celery_app(settings: Settings, *, prefetch_multiplier: int = 1) -> Celery:
    """A Celery app for the broker in `settings`; tasks register when a worker imports worker.tasks."""
    app = Celery("stylequeue", broker=settings.effective_broker_url, include=["stylequeue.worker.tasks"])
    transport: dict[str, Any] = {}
    if settings.effective_broker_url.startswith(("redis", "rediss", "unix", "sentinel")):
        transport = {
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
            # BRPOP times out this often (kombu's default is 1 s): a queue the worker resumes after
            # backpressure, or a newly added one, is listened to within 0.1 s instead of 1 s.
            "polling_interval": 0.1,
            "global_keyprefix": "",
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=prefetch_multiplier,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(INTERACTIVE_QUEUE), Queue(BULK_QUEUE), Queue(CALLBACK_QUEUE)],
        task_routes={
            INTERACTIVE_TASK: {"queue": INTERACTIVE_QUEUE},
            BULK_TASK: {"queue": BULK_QUEUE},
            CALLBACK_TASK: {"queue": CALLBACK_QUEUE},
        },
        task_default_queue=INTERACTIVE_QUEUE,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_pool_limit=32,
    )
    app.conf.stylequeue_settings = settings
    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    # `celery -A stylequeue.worker.app` reads `app`; build it on first access from the environment,
    # so importing this module (as producers do) reads no settings.
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = make_celery_app(load_settings())
        return _app
    raise AttributeError(name)
