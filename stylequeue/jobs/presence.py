"""What workers publish about themselves in the job store's Redis: heartbeats and the runtime each chose.

`stylequeue styles`, `Client.styles()`, the gateway and `wait`'s "no worker is consuming" read these.
"""

from __future__ import annotations

import json
import time
from typing import Any

from stylequeue.jobs.keys import RUNTIMES, WORKERS
from stylequeue.jobs.store import RedisJobStore, redis_errors


class Presence:
    """Heartbeats (`{p}workers`) and published runtime choices (`{p}runtimes`) in one store's Redis."""

    def __init__(self, store: RedisJobStore) -> None:
        self._store = store
        self._redis = store.redis
        self._workers = store.keys.name(WORKERS)
        self._runtimes = store.keys.name(RUNTIMES)

    def heartbeat(self, worker_id: str, info: dict[str, Any]) -> None:
        with redis_errors(self._store):
            self._redis.hset(self._workers, worker_id, json.dumps(info | {"seen": time.time()}))

    def workers(self, *, max_age_s: float = 60) -> dict[str, dict[str, Any]]:
        """Workers that sent a heartbeat in the last `max_age_s` seconds."""
        with redis_errors(self._store):
            raw = self._redis.hgetall(self._workers)
        now = time.time()
        live = {_text(k): json.loads(v) for k, v in raw.items()}
        return {k: v for k, v in live.items() if now - v.get("seen", 0) <= max_age_s}

    def forget_worker(self, worker_id: str) -> None:
        with redis_errors(self._store):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hdel(self._workers, worker_id)
            for field_name in self._redis.hkeys(self._runtimes):
                if _text(field_name).endswith(f"|{worker_id}"):
                    pipe.hdel(self._runtimes, field_name)
            pipe.execute()

    def publish_runtime(self, style: str, worker_id: str, info: dict[str, Any]) -> None:
        with redis_errors(self._store):
            self._redis.hset(self._runtimes, f"{style}|{worker_id}", json.dumps(info))

    def runtimes(self) -> dict[str, dict[str, dict[str, Any]]]:
        """style -> worker id -> the runtime choice that worker published."""
        with redis_errors(self._store):
            raw = self._redis.hgetall(self._runtimes)
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for key, value in raw.items():
            style, _, worker = _text(key).partition("|")
            out.setdefault(style, {})[worker] = json.loads(value)
        return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
