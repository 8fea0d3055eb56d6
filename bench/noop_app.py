"""The baseline of bench/e2e.py: a plain Celery app with one no-op task (one message per job).

Configured like a careful Celery deployment: acks_late, prefetch 1, JSON, Redis result backend.
"""

import os

from celery import Celery

url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6380/5")
app = Celery("noop", broker=url, backend=url)
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_serializer="json",
                accept_content=["json"], result_serializer="json")


@app.task(name="bench.noop")
def noop() -> None:
    return None
