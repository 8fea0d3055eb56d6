"""A `stylequeue bulk` run's record in Redis: its identity, source -> job id, and the lock of its live process.

Keys (keys.py): `{p}bulk:{run}` (src_prefix, style, dst_prefix, created_at, updated_at), `{p}bulk:{run}:jobs`
(source key -> id of its latest job) and `{p}bulk:{run}:lock` (the live process's token). The first two
expire with the jobs (STYLEQUEUE_JOB_TTL_S after the last change); the lock expires unless renewed.
"""

from __future__ import annotations

import os
import secrets
import socket

from stylequeue.errors import ConfigError
from stylequeue.jobs import scripts
from stylequeue.jobs.record import iso_now
from stylequeue.jobs.store import RedisJobStore, redis_errors

LOCK_TTL_S = 30


class BulkRunRecord:
    """One run's keys; `acquire` makes this process the run's one live process."""

    def __init__(self, store: RedisJobStore, run: str) -> None:
        self.store = store
        self._redis = store.redis
        self.meta_key = store.keys.bulk_run(run)
        self.jobs_key = self.meta_key + ":jobs"
        self.lock_key = self.meta_key + ":lock"
        self.token = f"pid {os.getpid()} on {socket.gethostname()} ({secrets.token_hex(4)})"

    def acquire(self) -> None:
        """Become the run's one live process; ConfigError while another holds it."""
        with redis_errors(self.store):
            if self._redis.set(self.lock_key, self.token, nx=True, ex=LOCK_TTL_S):
                return
            holder, ttl = self._redis.get(self.lock_key), self._redis.ttl(self.lock_key)
        who = holder.decode() if isinstance(holder, bytes) else "another process"
        raise ConfigError(f"this bulk run is already running ({who}); wait for it or stop it "
                          f"(if it died, its claim lapses in {max(int(ttl), 1)} s)")

    def renew(self) -> None:
        """Keep the lock (ConfigError if another process took it over) and the run's keys alive."""
        held = self.store._run(scripts.RENEW_LOCK, [self.lock_key], [self.token, str(LOCK_TTL_S)])
        with redis_errors(self.store):
            pipe = self._redis.pipeline(transaction=False)
            pipe.expire(self.meta_key, self.store.job_ttl_s)
            pipe.expire(self.jobs_key, self.store.job_ttl_s)
            pipe.execute()
        if not held:
            raise ConfigError("another `stylequeue bulk` took this run over while this one stalled; stopping")

    def release(self) -> None:
        self.store._run(scripts.RELEASE_LOCK, [self.lock_key], [self.token])

    def describe(self) -> str | None:
        """'started ..., N inputs recorded' when the run exists, else None."""
        with redis_errors(self.store):
            created, count = self._redis.hget(self.meta_key, "created_at"), self._redis.hlen(self.jobs_key)
        if not isinstance(created, bytes):
            return None
        return f"started {created.decode()}, {count} inputs recorded"

    def create(self, src_prefix: str, style: str, dst_prefix: str) -> None:
        with redis_errors(self.store):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hsetnx(self.meta_key, "created_at", iso_now())
            pipe.hset(self.meta_key, mapping={"src_prefix": src_prefix, "style": style, "dst_prefix": dst_prefix,
                                              "updated_at": iso_now()})
            pipe.expire(self.meta_key, self.store.job_ttl_s)
            pipe.execute()

    def load(self, *, page: int = 1000) -> dict[str, str]:
        """Source key -> id of its latest job."""
        with redis_errors(self.store):
            return {k.decode(): v.decode() for k, v in self._redis.hscan_iter(self.jobs_key, count=page)}

    def add(self, job_ids: dict[str, str]) -> None:
        """Record source -> job id: done *before* the jobs are created, so a crash leaves nothing unrecorded."""
        with redis_errors(self.store):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(self.jobs_key, items=[item for pair in job_ids.items() for item in pair])
            pipe.expire(self.jobs_key, self.store.job_ttl_s)
            pipe.hset(self.meta_key, "updated_at", iso_now())
            pipe.expire(self.meta_key, self.store.job_ttl_s)
            pipe.execute()
