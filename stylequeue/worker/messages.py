"""What travels over the broker: queue names, task names, and the functions that send them.

Producers and workers both import this module; it must stay light (Celery's app only, no worker).
A message carries job ids only: the job itself lives in the job store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

INTERACTIVE_QUEUE = "stylequeue.interactive"
BULK_QUEUE = "stylequeue.bulk"
CALLBACK_QUEUE = "stylequeue.callbacks"
# Queue order is priority order for a worker consuming several of them.
JOB_QUEUES = (INTERACTIVE_QUEUE, BULK_QUEUE)

# One task name per queue, so `celery inspect` and Flower read like the architecture.
INTERACTIVE_TASK = "stylequeue.interactive"
BULK_TASK = "stylequeue.bulk"
CALLBACK_TASK = "stylequeue.callback"

# Bulk jobs travel several to a message: Celery's per-message cost (~1.8 ms, PERF.md) is paid per chunk,
# and a busy worker's event loop, sharing the GIL with its job threads, takes messages in slowly enough
# to starve it between chunks. 64 rather than 32, then 128 rather than 64, each gained ~10% on the
# null-model bulk path (bench/e2e.py, 2-core machines). Claims and leases are per job anyway.
BULK_CHUNK_SIZE = 128


def send_job(app: Celery, job_id: str, priority: str) -> None:
    """One job: interactive jobs one per message, a bulk job as a chunk of one."""
    if priority == "bulk":
        send_chunk(app, [job_id])
    else:
        app.send_task(INTERACTIVE_TASK, args=[job_id], queue=INTERACTIVE_QUEUE)


def _chunk_repr(job_ids: Sequence[str]) -> str:
    """What Flower and task events show as a chunk's args. Celery would otherwise build a safe repr of
    the whole id list for every message: a tenth of a bulk submit's CPU."""
    return f"[[{job_ids[0]!r}, ... {len(job_ids)} job ids]]" if job_ids else "[[]]"


def send_chunk(app: Celery, job_ids: Sequence[str]) -> None:
    app.send_task(BULK_TASK, args=[list(job_ids)], queue=BULK_QUEUE, argsrepr=_chunk_repr(job_ids))


def send_chunks(app: Celery, job_ids: Sequence[str], chunk_size: int = BULK_CHUNK_SIZE) -> int:
    """Send bulk jobs `chunk_size` to a message over one broker connection; returns messages sent."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for start in range(0, len(job_ids), chunk_size):
            chunk = list(job_ids[start:start + chunk_size])
            app.send_task(BULK_TASK, args=[chunk], queue=BULK_QUEUE, producer=producer, argsrepr=_chunk_repr(chunk))
            sent += 1
    return sent


def send_callback(app: Celery, job_id: str) -> None:
    app.send_task(CALLBACK_TASK, args=[job_id], queue=CALLBACK_QUEUE)
