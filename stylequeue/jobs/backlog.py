"""How many jobs wait, by priority and style: what autoscaling reads (worker metrics; deploy/k8s).

Every queued job is on the `queued` index and its priority and style are in its record. Reading every waiting
record would cost as much as the backlog is long, so above SAMPLE waiting jobs the split is estimated from SAMPLE
random members (ZRANDMEMBER) scaled to the exact total: one ZCARD, then one round trip of ZRANDMEMBER and one
of SAMPLE pipelined HMGETs, whatever the backlog. The total is exact; each share's standard error is at most
0.5 / sqrt(SAMPLE) of the total (about 3% at 256). Nothing is kept or maintained for it, so a job's own
scripts pay nothing; a worker reads it for its metrics every BACKLOG_EVERY_S (worker/service.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import cast

from stylequeue.jobs.record import Priority, decode_value
from stylequeue.jobs.store import RedisJobStore, redis_errors

SAMPLE = 256


@dataclass(frozen=True)
class Backlog:
    """Jobs waiting (`queued`) and running now; `waiting` splits the waiting ones by (priority, style)."""

    total: int
    running: int
    waiting: dict[tuple[Priority, str], float]
    exact: bool


def read_backlog(store: RedisJobStore, *, sample: int = SAMPLE) -> Backlog:
    """The store's backlog now: exact up to `sample` waiting jobs, estimated by sampling above."""
    with redis_errors(store):
        pipe = store.redis.pipeline(transaction=False)
        pipe.zcard(store.keys.queued)
        pipe.zcard(store.keys.running)
        total, running = (int(n) for n in pipe.execute())
        if total == 0:
            return Backlog(0, running, {}, True)
        exact = total <= sample
        ids = cast(list[bytes], store.redis.zrange(store.keys.queued, 0, -1) if exact
                   else store.redis.zrandmember(store.keys.queued, sample))
        pipe = store.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(store.keys.job(job_id.decode()), "priority", "style")
        rows = pipe.execute()
    seen: Counter[tuple[Priority, str]] = Counter()
    for priority, style in rows:
        if priority is not None and style is not None:  # a record that finished and expired meanwhile
            seen[(Priority(decode_value(priority)), str(decode_value(style)))] += 1
    counted = sum(seen.values())
    scale = total / counted if counted and not exact else 1.0
    return Backlog(total, running, {key: count * scale for key, count in seen.items()}, exact)
