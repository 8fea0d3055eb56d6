"""What the HTTP gateway keeps per tenant in the job store's Redis: jobs in flight, rate windows, the job index.

- In flight (`{p}tenant:{t}:active`, keys.py): a submit is admitted only if the tenant's set has room for
  its jobs (TENANT_ADMIT adds reservations atomically, so concurrent submits on several gateways cannot
  pass `max_in_flight` together), then the reservations become the job ids. Members are never removed
  when a job finishes (the core's finishing scripts know nothing of tenants): a full set is cleaned by
  dropping jobs that are finished or gone, and reservations a dead gateway left (`RESERVATION_S`).
- Rate (`{p}tenant:{t}:quota`): requests and body bytes in a fixed one-minute window (TENANT_CHARGE), by
  Redis time, shared by every gateway process.
- Listing (`{p}tenant:{t}:jobs`, written by the job store at create): newest first, paged by an opaque
  cursor; ids whose record expired are skipped and removed from the index.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from stylequeue.errors import ConfigError
from stylequeue.jobs import scripts
from stylequeue.jobs.record import TERMINAL_STATES, Job, JobState
from stylequeue.jobs.store import RedisJobStore, redis_errors

RATE_WINDOW_S = 60
# A reservation older than this belongs to a gateway that died mid-submit (a submit takes milliseconds).
RESERVATION_S = 60
RESERVATION = "r:"
_FINISHED = frozenset(f'"{state}"'.encode() for state in TERMINAL_STATES)


@dataclass(frozen=True)
class Charge:
    """Outcome of `TenantJobs.charge`: whether the request fits the tenant's window, else when to retry."""

    ok: bool
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class Page:
    """One page of a tenant's jobs, newest first; `cursor` fetches the next page (None: that was the last)."""

    jobs: list[Job]
    cursor: str | None


class TenantJobs:
    """Per-tenant bookkeeping of the gateway over one job store."""

    def __init__(self, store: RedisJobStore) -> None:
        self.store = store
        self.redis: Any = store.redis  # redis-py's reply types are unions mypy cannot narrow
        self.keys = store.keys

    # --- jobs in flight ---------------------------------------------------------------------------

    def admit(self, tenant: str, count: int, max_in_flight: int) -> str | None:
        """Reserve room for `count` new jobs; the reservation to `settle` or `release`, or None when full."""
        reservation = f"{RESERVATION}{os.urandom(8).hex()}"
        key = self.keys.tenant_active(tenant)
        args = [str(max_in_flight), str(count), reservation]
        if self.store._run(scripts.TENANT_ADMIT, [key], args):
            return reservation
        self.clean(tenant)
        return reservation if self.store._run(scripts.TENANT_ADMIT, [key], args) else None

    def settle(self, tenant: str, reservation: str, count: int, job_ids: Sequence[str]) -> None:
        """The reserved submit created `job_ids`: they take the reservation's places."""
        key = self.keys.tenant_active(tenant)
        with redis_errors(self.store):
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(key, *_members(reservation, count))
            if job_ids:
                pipe.zadd(key, dict.fromkeys(job_ids, 0))
            pipe.execute()

    def release(self, tenant: str, reservation: str, count: int) -> None:
        """The reserved submit created nothing: free its places."""
        with redis_errors(self.store):
            self.redis.zrem(self.keys.tenant_active(tenant), *_members(reservation, count))

    def clean(self, tenant: str) -> int:
        """Drop finished or vanished jobs and stale reservations from the tenant's set; returns how many."""
        key = self.keys.tenant_active(tenant)
        now_ms = self.store.server_time() * 1000
        with redis_errors(self.store):
            members = [(m.decode(), score) for m, score in self.redis.zrange(key, 0, -1, withscores=True)]
            jobs = [m for m, _ in members if not m.startswith(RESERVATION)]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in jobs:
                pipe.hget(self.keys.job(job_id), "state")
            states = pipe.execute()
            gone = [job_id for job_id, state in zip(jobs, states, strict=True) if state is None or state in _FINISHED]
            gone += [m for m, score in members if m.startswith(RESERVATION) and score < now_ms - RESERVATION_S * 1000]
            if gone:
                self.redis.zrem(key, *gone)
        return len(gone)

    def in_flight(self, tenant: str) -> int:
        """How many of the tenant's jobs are queued or running (or being submitted) now."""
        self.clean(tenant)
        with redis_errors(self.store):
            return int(self.redis.zcard(self.keys.tenant_active(tenant)))

    # --- request rate ---------------------------------------------------------------------------------

    def charge(self, tenant: str, *, requests: int, body_bytes: int, max_requests: int, max_bytes: int,
               force: bool = False) -> Charge:
        """Count a request and its body bytes in the tenant's window unless that passes a limit (`force`: count)."""
        result = self.store._run(scripts.TENANT_CHARGE, [self.keys.tenant_quota(tenant)],
                                 [str(RATE_WINDOW_S * 1000), str(max_requests), str(max_bytes), str(requests),
                                  str(body_bytes), "1" if force else ""])
        return Charge(bool(result[0]), int(result[1]) / 1000)

    # --- listing --------------------------------------------------------------------------------------

    def page(self, tenant: str, *, limit: int, cursor: str | None = None, state: JobState | None = None,
             max_scan: int = 2000) -> Page:
        """Up to `limit` of the tenant's jobs (in `state`, when given), newest first, after `cursor`.

        At most `max_scan` index entries are read per page, so a rare state costs bounded work: such a page
        may hold fewer than `limit` jobs and still have a cursor. Expired ids met are removed from the index.
        """
        key = self.keys.tenant_jobs(tenant)
        found: list[Job] = []
        expired: list[str] = []
        last: tuple[int, str] | None = None
        entries = self._newest_first(key, decode_cursor(cursor) if cursor else None, batch=max(limit, 50))
        scanned = 0
        more = False
        for chunk in _chunks(entries, max(limit, 50)):
            records = self.store.get_many([job_id for _, job_id in chunk])
            for (score, job_id), job in zip(chunk, records, strict=True):
                if len(found) >= limit or scanned >= max_scan:
                    more = True
                    break
                scanned += 1
                last = (score, job_id)
                if job is None:
                    expired.append(job_id)
                elif state is None or job.state == state:
                    found.append(job)
            if more:
                break
        if expired:
            with redis_errors(self.store):
                self.redis.zrem(key, *expired)
        return Page(found, encode_cursor(*last) if more and last is not None else None)

    def _newest_first(self, key: str, after: tuple[int, str] | None, *, batch: int) -> Iterator[tuple[int, str]]:
        """(score, id) of the index's entries, newest first, strictly after `after` in that order."""
        with redis_errors(self.store):
            if after is None:
                top = self.redis.zrevrange(key, 0, 0, withscores=True)
                if not top:
                    return
                upper = str(int(top[0][1]))  # fixed now: entries added meanwhile shift no offsets
            else:
                score, member = after
                # Same-millisecond entries (a batch) come in descending byte order of their ids.
                same = self.redis.zrevrangebyscore(key, score, score)
                yield from ((score, m.decode()) for m in same if m.decode() < member)
                upper = f"({score}"
        offset = 0
        while True:
            with redis_errors(self.store):
                rows = self.redis.zrevrangebyscore(key, upper, "-inf", start=offset, num=batch, withscores=True)
            yield from ((int(score), member.decode()) for member, score in rows)
            if len(rows) < batch:
                return
            offset += batch


def _members(reservation: str, count: int) -> list[str]:
    return [f"{reservation}:{i}" for i in range(1, count + 1)]


def _chunks(entries: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_cursor(score: int, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score}:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(score, job id) of a cursor `page` gave; ConfigError for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, _, job_id = text.partition(":")
        if not job_id or not job_id.isascii():
            raise ValueError(text)
        return int(score), job_id
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ConfigError("invalid cursor: pass the `next_cursor` of the previous page unchanged") from None


__all__ = ["Charge", "Page", "RATE_WINDOW_S", "RESERVATION_S", "TenantJobs", "decode_cursor", "encode_cursor"]
