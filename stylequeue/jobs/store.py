"""`RedisJobStore`: where job records live, and every change to them (docs/jobs.md).

Each state change is one Lua script (scripts.py) run by `_run`: EVALSHA, loading the script once if Redis
lost its cache (a restart). The store never reads a caller's clock for leases or due times: the scripts
use Redis `TIME`.

The broker message is only a wake-up. Every move to `queued` puts the job on the `due` set in the same
script; whoever takes a due entry sends the message and removes the entry only if it is still the one it
took (`take_due` / `done_due`). A finished job that owes a callback is put on `callbacks:due` by the script
that finishes it. So a worker or producer that dies at any moment leaves what it owed due for another.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

import redis
from redis.exceptions import NoScriptError

from stylequeue.errors import ErrorCode, InvalidTransition, JobNotFound, RedisUnavailable
from stylequeue.jobs import scripts
from stylequeue.jobs.keys import OUTAGES, Keys
from stylequeue.jobs.record import (
    CALLBACK_PENDING,
    MAX_ATTEMPTS,
    TERMINAL_STATES,
    TRANSITIONS,
    Job,
    JobState,
    Priority,
    decode_value,
    encode_value,
)

# A producer sends a new job's message at once; only if it dies first does a worker send it, this much later.
DISPATCH_GRACE_S = 15.0
# How long a taker of a due entry may take to send its message before the entry is due again.
DUE_HOLD_S = 60.0
# A callback delivery's lease: longer than one attempt can last (15 s read + 5 s connect), with room.
CALLBACK_LEASE_S = 60.0
CREATE_CHUNK = 1024  # jobs per create_many script call


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"  # run it
    PROMOTE = "promote"  # a lost attempt fenced its output: promote it and finish the job
    BUSY = "busy"  # another worker holds it under a live lease
    DONE = "done"  # already finished
    FAILED = "failed"  # it had used every attempt: failed `internal` now
    EXPIRED = "expired"  # its deadline passed before it started: cancelled `expired` now
    MISSING = "missing"  # no such record (expired, or never created)


class ReapOutcome(StrEnum):
    REQUEUED = "requeued"
    FAILED = "failed"
    SKIP = "skip"


@dataclass(frozen=True)
class Claim:
    """Outcome of `claim_many` for one job. A claimed `job` carries what a worker needs (CLAIM_FIELDS, its
    state, attempt, owner and lease), not the whole record: read that with `get`."""

    outcome: ClaimOutcome
    attempts: int = 0
    state: JobState | None = None
    job: Job | None = None
    callback_token: int = 0  # FAILED/EXPIRED with a callback_url: send its delivery with this token


@dataclass(frozen=True)
class Moved:
    """Outcome of a transition: truthy when the job moved. `callback_token` is set when the move finished a
    job that owes a callback: the mover sends the delivery message with it."""

    ok: bool
    callback_token: int = 0

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Reaped:
    job_id: str
    outcome: ReapOutcome
    previous_owner: str | None
    callback_token: int = 0


@dataclass(frozen=True)
class Created:
    """Outcome of `create`: the job (the existing one for a known idempotency key), whether it is new, and
    the dispatch token to pass to `dispatched` once its message was sent."""

    job: Job
    created: bool
    token: int = 0


@dataclass
class Change:
    """One compare-and-set for `transition_many`: move `job_id` from `from_state` to `to_state`.

    `owner` and `attempt`, when set, must match the job's. A move to `queued` makes its message due after
    `delay_s`; `give_back` also returns the attempt. `values` are written with the move.
    """

    job_id: str
    from_state: JobState | tuple[JobState, ...]
    to_state: JobState
    owner: str | None = None
    attempt: int | None = None
    delay_s: float = 0.0
    give_back: bool = False
    values: dict[str, Any] = field(default_factory=dict)


def _ms(seconds: float) -> str:
    return str(int(round(seconds * 1000)))


class RedisJobStore:
    """Job records in Redis: create, read, compare-and-set transitions, leases, due sets, callbacks."""

    def __init__(self, client: redis.Redis, *, key_prefix: str = "sq:", job_ttl_s: int = 604800) -> None:
        self.redis = client
        self.keys = Keys(key_prefix)
        self.prefix = key_prefix
        self.job_ttl_s = job_ttl_s
        self.description: str | None = None  # where Redis is, without credentials; from_url knows it

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str = "sq:", job_ttl_s: int = 604800,
                 max_connections: int = 64, socket_timeout: float = 30) -> RedisJobStore:
        # Imported here: `stylequeue.config` brings pydantic, and a webhook receiver importing stylequeue must not.
        from stylequeue.config.redis_url import describe_redis_url, redis_client

        client = redis_client(url, blocking_pool=True, max_connections=max_connections, timeout=20,
                              socket_connect_timeout=5, socket_timeout=socket_timeout, health_check_interval=30)
        store = cls(client, key_prefix=key_prefix, job_ttl_s=job_ttl_s)
        store.description = describe_redis_url(url)
        return store

    def job_key(self, job_id: str) -> str:
        return self.keys.job(job_id)

    # --- running scripts ------------------------------------------------------------------------

    def _run(self, script: scripts.Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run a script by SHA; load it first if Redis does not know it (a restart empties the cache)."""
        with redis_errors(self):
            try:
                return self.redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                self.redis.script_load(script.source)
                return self.redis.evalsha(script.sha, len(keys), *keys, *args)

    def _finishing_keys(self) -> list[str]:
        return [self.keys.running, self.keys.queued, self.keys.due, self.keys.sent, self.keys.callbacks_due]

    def _finishing_args(self) -> list[str]:
        return [str(self.job_ttl_s), _ms(CALLBACK_LEASE_S), self.keys.finished_channel, _PENDING]

    # --- create -----------------------------------------------------------------------------------

    def create(self, job: Job, idempotency_key: str | None = None, *, deadline_s: float | None = None,
               dispatch_grace_s: float = DISPATCH_GRACE_S) -> Created:
        """Store a new job, on the `due` set `dispatch_grace_s` ahead (see `dispatched`).

        With an idempotency key seen within the job TTL, return that job instead (`created` False).
        `deadline_s`: the job must start within that many seconds, else it ends `cancelled`/`expired`.
        """
        idem = self.keys.idempotency(idempotency_key) if idempotency_key else ""
        job.idem_key = idem or None
        fields = job.to_redis()
        fields.pop("created_at", None)  # the script writes Redis time
        tenant_index = self.keys.tenant_jobs(job.tenant) if job.tenant else ""
        existing, created_at, token = self._run(
            scripts.CREATE, [self.job_key(job.id), idem, self.keys.queued, self.keys.due, tenant_index],
            [job.id, str(self.job_ttl_s), _ms(dispatch_grace_s), _ms(deadline_s) if deadline_s else "",
             *_flatten(fields)])
        if existing:
            return Created(self.get(existing.decode()), False)
        job.created_at = decode_value(created_at)
        return Created(job, True, int(token))

    def create_many(self, jobs: Sequence[Job], *, deadline_s: float | None = None,
                    dispatch_grace_s: float = DISPATCH_GRACE_S) -> int:
        """Store many new jobs (no idempotency keys), one script call per CREATE_CHUNK; returns the dispatch
        token for `dispatched` (one token for all of them)."""
        token = 0
        for start in range(0, len(jobs), CREATE_CHUNK):
            chunk = jobs[start:start + CREATE_CHUNK]
            tenants = {job.tenant for job in chunk}
            tenant = tenants.pop() if len(tenants) == 1 else None
            args: list[str] = [_ms(dispatch_grace_s), _ms(deadline_s) if deadline_s else ""]
            for job in chunk:
                fields = job.to_redis()
                fields.pop("created_at", None)
                args += [job.id, str(2 * len(fields)), *_flatten(fields)]
            created_at, token = self._run(
                scripts.CREATE_MANY,
                [self.keys.queued, self.keys.due, self.keys.tenant_jobs(tenant) if tenant else "",
                 *map(self.job_key, (job.id for job in chunk))], args)
            stamp = decode_value(created_at)
            for job in chunk:
                job.created_at = stamp
        return int(token)

    def dispatched(self, job_ids: Sequence[str], token: int) -> None:
        """Their messages were sent: the due entries `create`/`create_many` made (if still theirs) move to
        `sent`, where a message the broker loses is noticed (`lost_candidates`)."""
        for start in range(0, len(job_ids), CREATE_CHUNK):
            self._run(scripts.DISPATCHED, [self.keys.due, self.keys.sent],
                      [str(token), *job_ids[start:start + CREATE_CHUNK]])

    def discard_unsent(self, jobs: Sequence[Job]) -> int:
        """Undo a submit whose message could not be sent: delete each job no worker began. Returns how many."""
        if not jobs:
            return 0
        tenants = {job.tenant for job in jobs}
        tenant = tenants.pop() if len(tenants) == 1 else None
        keys = [self.keys.queued, self.keys.due, self.keys.sent, self.keys.tenant_jobs(tenant) if tenant else ""]
        for job in jobs:
            keys += [self.job_key(job.id), job.idem_key or ""]
        return int(self._run(scripts.DISCARD_UNSENT, keys, [job.id for job in jobs]))

    # --- read ---------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with redis_errors(self):
            raw: dict[bytes, bytes] = self.redis.hgetall(self.job_key(job_id))  # type: ignore[assignment]
        if not raw:
            raise JobNotFound(job_id)
        return Job.from_redis(raw)

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """Jobs in the order asked, None where a record does not exist."""
        with redis_errors(self):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hgetall(self.job_key(job_id))
            raws = pipe.execute()
        return [Job.from_redis(raw) if raw else None for raw in raws]

    def states(self, job_ids: Sequence[str], *, page: int = 1000
               ) -> list[tuple[JobState | None, dict[str, str] | None]]:
        """(state, error) of each job, (None, None) for a missing record; `page` HMGETs a round trip."""
        found: list[tuple[JobState | None, dict[str, str] | None]] = []
        for start in range(0, len(job_ids), page):
            with redis_errors(self):
                pipe = self.redis.pipeline(transaction=False)
                for job_id in job_ids[start:start + page]:
                    pipe.hmget(self.job_key(job_id), "state", "error")
                rows = pipe.execute()
            for state, error in rows:
                found.append((JobState(json.loads(state)) if state else None,
                              json.loads(error) if error else None))
        return found

    def exists(self, job_id: str) -> bool:
        with redis_errors(self):
            return bool(self.redis.exists(self.job_key(job_id)))

    # --- state changes ----------------------------------------------------------------------------

    def transition(self, job_id: str, from_state: JobState | Iterable[JobState], to_state: JobState, *,
                   owner: str | None = None, attempt: int | None = None, delay_s: float = 0.0,
                   give_back: bool = False, **values: Any) -> Moved:
        """Compare-and-set: move the job from `from_state` to `to_state` and write `values`.

        Returns a falsy Moved (writing nothing) when the job is not in `from_state`, or is held by another
        owner or attempt when those are given. Raises JobNotFound for an unknown id and InvalidTransition for
        a change the state table forbids. See `Change` for `delay_s` and `give_back`.
        """
        sources = (from_state,) if isinstance(from_state, JobState) else tuple(from_state)
        change = Change(job_id, sources, to_state, owner, attempt, delay_s, give_back, values)
        code, token = self._transition([change])[0]
        if code == -1:
            raise JobNotFound(job_id)
        return Moved(code == 1, token)

    def transition_many(self, changes: Sequence[Change]) -> list[Moved]:
        """Several compare-and-sets in one script call; a job whose record is gone counts as not moved."""
        return [Moved(code == 1, token) for code, token in self._transition(changes)] if changes else []

    def _transition(self, changes: Sequence[Change]) -> list[tuple[int, int]]:
        keys, args = self._finishing_keys(), self._finishing_args()
        for change in changes:
            sources = change.from_state if isinstance(change.from_state, tuple) else (change.from_state,)
            allowed, target = _transition_head(sources, change.to_state)
            item = [change.job_id, allowed, target, _json_text(change.owner) if change.owner is not None else "",
                    str(change.attempt) if change.attempt is not None else "",
                    _ms(change.delay_s) if change.to_state == JobState.QUEUED else "",
                    "1" if change.give_back else "", *_encode_fields(change.values)]
            keys.append(self.job_key(change.job_id))
            args += [str(len(item)), *item]
        return [(int(code), int(token)) for code, token in self._run(scripts.TRANSITION, keys, args)]

    def claim(self, job_id: str, worker_id: str, *, lease_s: float, max_attempts: int = MAX_ATTEMPTS) -> Claim:
        """Start an attempt: queued -> running, or take over a running job whose lease ended (see `claim_many`)."""
        return self.claim_many([job_id], worker_id, lease_s=lease_s, max_attempts=max_attempts)[0]

    def claim_many(self, job_ids: Sequence[str], worker_id: str, *, lease_s: float,
                   max_attempts: int = MAX_ATTEMPTS) -> list[Claim]:
        """`claim` for each job, in one script call (a bulk chunk).

        A job that already used `max_attempts` fails `internal` instead (its worker was lost); one whose
        deadline passed before it started ends `cancelled` with error `expired`.
        """
        if not job_ids:
            return []
        lost = json.dumps({"code": str(ErrorCode.INTERNAL),
                           "message": f"worker lost during the last of {max_attempts} attempts"})
        expired = json.dumps({"code": str(ErrorCode.EXPIRED),
                              "message": "its deadline passed before a worker could start it"})
        args = [*self._finishing_args(), json.dumps(worker_id), _ms(lease_s), str(max_attempts), lost, expired,
                *job_ids]
        results = self._run(scripts.CLAIM, [*self._finishing_keys(), *map(self.job_key, job_ids)], args)
        return [_claim_of(job_id, worker_id, result) for job_id, result in zip(job_ids, results, strict=True)]

    def fence_many(self, owner: str, items: Sequence[tuple[str, int, str, dict[str, Any]]], *,
                   lease_s: float) -> list[bool]:
        """The owner check before outputs are promoted: per (job id, attempt, staged URI, results), record the
        staged output and results only if this owner still holds the job in that attempt (FENCE)."""
        if not items:
            return []
        args: list[str] = [json.dumps(owner), _ms(lease_s)]
        for job_id, attempt, staged_uri, results in items:  # up to 128 per call: kept lean
            fields = _encode_fields(results)
            args += (str(3 + len(fields)), job_id, str(attempt), encode_value(staged_uri), *fields)
        keys = [self.keys.running, *(self.job_key(job_id) for job_id, *_ in items)]
        return [bool(result) for result in self._run(scripts.FENCE, keys, args)]

    def renew_leases(self, worker_id: str, held: Sequence[tuple[str, int] | tuple[str, int, bool]], *,
                     lease_s: float) -> list[str]:
        """Push the leases of the (job id, attempt[, begun]) this worker holds `lease_s` ahead, recording which
        attempts a job thread began (only those are charged if the worker is lost); returns the ids it no
        longer holds (cancelled, taken over, or given back)."""
        if not held:
            return []
        args: list[str] = [json.dumps(worker_id), _ms(lease_s)]
        for item in held:
            args += [item[0], str(item[1]), "1" if len(item) > 2 and item[2] else ""]
        lost = self._run(scripts.RENEW, [self.keys.running, *(self.job_key(item[0]) for item in held)], args)
        return [item.decode() for item in lost]

    def expired_leases(self, *, limit: int = 100) -> list[str]:
        return [i.decode() for i in self._run(scripts.EXPIRED_LEASES, [self.keys.running], [str(limit)])]

    def reap(self, job_ids: Sequence[str], *, max_attempts: int = MAX_ATTEMPTS) -> list[Reaped]:
        """Return jobs whose lease ended to `queued` (their message due now), or fail them after their last
        attempt. Jobs whose lease is alive again, or that no longer run, are skipped."""
        if not job_ids:
            return []
        lost = json.dumps({"code": str(ErrorCode.INTERNAL),
                           "message": f"worker lost during attempt {max_attempts} of {max_attempts}"})
        results = self._run(scripts.REAP, [*self._finishing_keys(), *map(self.job_key, job_ids)],
                            [*self._finishing_args(), str(max_attempts), lost, *job_ids])
        reaped = []
        for job_id, (outcome, owner, token) in zip(job_ids, results, strict=True):
            previous = json.loads(owner) if owner and owner != b"null" else None
            reaped.append(Reaped(job_id, ReapOutcome(outcome.decode()), previous, int(token)))
        return reaped

    def reschedule(self, job_id: str, delay_s: float) -> bool:
        """Make a queued job's message due within `delay_s` (unless sooner already); False if not queued."""
        return self.reschedule_many([job_id], delay_s) == 1

    def reschedule_many(self, job_ids: Sequence[str], delay_s: float) -> int:
        """`reschedule` for many jobs, CREATE_CHUNK a script call; returns how many were queued."""
        queued = 0
        for start in range(0, len(job_ids), CREATE_CHUNK):
            chunk = job_ids[start:start + CREATE_CHUNK]
            queued += int(self._run(scripts.RESCHEDULE, [self.keys.due, *map(self.job_key, chunk)],
                                    [_ms(delay_s), *chunk]))
        return queued

    def refund_attempts(self, job_ids: Sequence[str], code: ErrorCode) -> int:
        """Give back the attempt of each still-queued job whose last error is `code` (an outage's, not its own
        fault); returns how many."""
        if not job_ids:
            return 0
        return int(self._run(scripts.REFUND_ATTEMPT, list(map(self.job_key, job_ids)), [json.dumps(str(code))]))

    # --- due sets (never Celery countdown/eta) ------------------------------------------------------

    def take_due(self, name: str, *, limit: int = 100, hold_s: float = DUE_HOLD_S) -> list[tuple[str, int]]:
        """Due members of a schedule (`due` or `callbacks:due`) with the token this taker set; each is held
        `hold_s` ahead, so a taker that dies before it is done leaves it due again."""
        flat = self._run(scripts.TAKE_DUE, [self.keys.name(name)], [str(limit), _ms(hold_s)])
        return [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    def sent_due(self, taken: Sequence[tuple[str, int]]) -> int:
        """Messages `take_due(DUE)` gave were sent: their entries (each if still the one taken) move to `sent`."""
        if not taken:
            return 0
        args = [str(item) for pair in taken for item in pair]
        return int(self._run(scripts.SENT_DUE, [self.keys.due, self.keys.sent], args))

    def lost_candidates(self, *, older_than_s: float, limit: int = 500) -> list[tuple[str, Priority]]:
        """Jobs whose message went out more than `older_than_s` ago and that no worker claimed since, with
        their priorities (the watcher sends again those whose broker queue is empty: their message was lost)."""
        ids = [i.decode() for i in self._run(scripts.LOST_CANDIDATES, [self.keys.sent],
                                             [_ms(older_than_s), str(limit)])]
        return self._with_priorities(ids)

    def resend_lost(self, job_ids: Sequence[str], *, older_than_s: float) -> int:
        """Make each of these jobs' messages due again if still queued and sent longer ago than `older_than_s`
        (counted in stats `resent`); returns how many."""
        if not job_ids:
            return 0
        keys = [self.keys.due, self.keys.sent, self.keys.stats, *map(self.job_key, job_ids)]
        return int(self._run(scripts.RESEND_LOST, keys, [_ms(older_than_s), *job_ids]))

    def done_due(self, name: str, taken: Sequence[tuple[str, int]]) -> int:
        """Remove what `take_due` gave, each only if its entry is still the one taken; returns how many."""
        if not taken:
            return 0
        args = [str(item) for pair in taken for item in pair]
        return int(self._run(scripts.DONE_DUE, [self.keys.name(name)], args))

    def scheduled(self, name: str) -> dict[str, int]:
        """A schedule's entries: member -> score (Redis time, ms)."""
        with redis_errors(self):
            entries: list[tuple[bytes, float]] = self.redis.zrange(  # type: ignore[assignment]
                self.keys.name(name), 0, -1, withscores=True)
        return {member.decode(): int(score) for member, score in entries}

    def count(self, name: str) -> int:
        """How many entries a schedule or index (`running`, `queued`, `due`, `callbacks:due`) holds."""
        with redis_errors(self):
            return int(self.redis.zcard(self.keys.name(name)))

    # --- callbacks ------------------------------------------------------------------------------------

    def callback_begin(self, job_id: str, token: int, *, lease_s: float = CALLBACK_LEASE_S) -> int:
        """Start a delivery attempt if `token` still holds the job's callback entry; the new token, or 0."""
        return int(self._run(scripts.CALLBACK_BEGIN, [self.keys.callbacks_due], [job_id, str(token), _ms(lease_s)]))

    def callback_record(self, job_id: str, token: int, record: dict[str, Any], retry_in_s: float | None) -> bool:
        """Record an attempt's outcome (the `callback` field) and reschedule or remove the entry, if `token`
        still holds it. `record["next_attempt_at"]` is filled in from Redis time."""
        body = json.dumps({**record, "next_attempt_at": "__NEXT__"})
        args = [job_id, str(token), body, _ms(retry_in_s) if retry_in_s is not None else ""]
        return bool(self._run(scripts.CALLBACK_RECORD, [self.keys.callbacks_due, self.job_key(job_id)], args))

    # --- the sweep --------------------------------------------------------------------------------------

    def sweep_candidates(self, *, older_than_s: float, limit: int = 1000) -> list[tuple[str, Priority]]:
        """Jobs queued longer than `older_than_s` with no message owed, with their priorities."""
        ids = [i.decode() for i in self._run(scripts.SWEEP_CANDIDATES,
                                             [self.keys.queued, self.keys.due, self.keys.sent],
                                             [_ms(older_than_s), str(limit)])]
        return self._with_priorities(ids)

    def _with_priorities(self, ids: list[str]) -> list[tuple[str, Priority]]:
        if not ids:
            return []
        with redis_errors(self):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(self.job_key(job_id), "priority")
            priorities = pipe.execute()
        return [(job_id, Priority(decode_value(raw)) if raw else Priority.INTERACTIVE)
                for job_id, raw in zip(ids, priorities, strict=True)]

    def sweep(self, job_ids: Sequence[str]) -> int:
        """Schedule each job still queued with no message owed; returns how many (counted in `stats`)."""
        if not job_ids:
            return 0
        keys = [self.keys.queued, self.keys.due, self.keys.sent, self.keys.stats, *map(self.job_key, job_ids)]
        return int(self._run(scripts.SWEEP, keys, list(job_ids)))

    def try_lock(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take a named lock for `ttl_s` unless another holder has it (one sweeper at a time)."""
        with redis_errors(self):
            return bool(self.redis.set(self.keys.name(name), holder, nx=True, px=int(ttl_s * 1000)))

    def stats(self) -> dict[str, int]:
        with redis_errors(self):
            raw: dict[bytes, bytes] = self.redis.hgetall(self.keys.stats)  # type: ignore[assignment]
        return {name.decode(): int(value) for name, value in raw.items()}

    # --- dependencies found down (shared across workers) -------------------------------------------------

    def outage_begun(self, dependency: str, worker_id: str, at: float, *, stale_after_s: float) -> float:
        """Record that `dependency` is down (unless a worker recorded it less than `stale_after_s` ago); returns
        when it was first seen down, so every worker counts STYLEQUEUE_OUTAGE_S from the same moment."""
        key = self.keys.name(OUTAGES)
        with redis_errors(self):
            raw = self.redis.hget(key, dependency)
            if raw and at - float(json.loads(raw)["since"]) < stale_after_s:
                return float(json.loads(raw)["since"])
            self.redis.hset(key, dependency, json.dumps({"since": at, "by": worker_id}))
        return at

    def outage_ended(self, dependency: str) -> None:
        with redis_errors(self):
            self.redis.hdel(self.keys.name(OUTAGES), dependency)

    # --- the server -------------------------------------------------------------------------------------

    def ping(self) -> None:
        with redis_errors(self):
            self.redis.ping()

    def server_time(self) -> float:
        """Redis's clock, unix seconds."""
        with redis_errors(self):
            seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def persistence_warnings(self) -> list[str]:
        """Why this Redis might lose jobs (AOF on, noeviction: docs/deploy.md); [] when fine or unknown."""
        try:
            config = self.redis.config_get("appendonly") | self.redis.config_get("maxmemory-policy")
            saves = self.redis.config_get("save").get("save", "")
        except Exception:  # managed Redis often forbids CONFIG
            return []
        warnings = []
        if config.get("appendonly") != "yes" and not saves:
            warnings.append("Redis persists nothing (no AOF, no RDB saves): a Redis restart loses every job")
        if config.get("maxmemory-policy", "noeviction") != "noeviction":
            warnings.append(f"Redis maxmemory-policy is {config['maxmemory-policy']}: it may evict job records; "
                            "use noeviction")
        return warnings

    def subscribe_finished(self) -> Any:
        """A pub/sub connection subscribed to the channel of finished job ids (long polls)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        with redis_errors(self):
            pubsub.subscribe(self.keys.finished_channel)
        return pubsub

    def redis_description(self) -> str:
        """Where the store's Redis is, without credentials."""
        if self.description:
            return self.description
        kwargs = self.redis.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def close(self) -> None:
        self.redis.close()


_PENDING = json.dumps(CALLBACK_PENDING)


_OUTCOME_OF = {str(outcome).encode(): outcome for outcome in ClaimOutcome}


def _claim_of(job_id: str, worker_id: str, result: list[Any]) -> Claim:
    outcome = _OUTCOME_OF[result[0]]
    if outcome in (ClaimOutcome.CLAIMED, ClaimOutcome.PROMOTE):
        attempts, lease, started = int(result[1]), int(result[2]), decode_value(result[3])
        values = {name: decode_value(raw) for name, raw in zip(scripts.CLAIM_FIELDS, result[4:], strict=False)
                  if raw is not None}
        staged = decode_value(result[4 + len(scripts.CLAIM_FIELDS)]) if outcome == ClaimOutcome.PROMOTE else None
        job = Job(id=job_id, state=JobState.RUNNING, attempts=attempts, started_at=started, owner=worker_id,
                  lease_until=lease, staged_uri=staged, **values)
        return Claim(outcome, attempts=attempts, state=JobState.RUNNING, job=job)
    if outcome == ClaimOutcome.DONE:
        return Claim(outcome, state=JobState(json.loads(result[1])))
    if outcome in (ClaimOutcome.FAILED, ClaimOutcome.EXPIRED):
        state = JobState.FAILED if outcome == ClaimOutcome.FAILED else JobState.CANCELLED
        return Claim(outcome, state=state, callback_token=int(result[1]))
    return Claim(outcome)


def _flatten(mapping: dict[str, str]) -> Iterator[str]:
    for key, value in mapping.items():
        yield key
        yield value


def _encode_fields(values: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in values.items():
        flat += [name, encode_value(value)]
    return flat


@lru_cache(maxsize=64)
def _json_text(text: str) -> str:
    return json.dumps(text)


@lru_cache(maxsize=64)
def _transition_head(sources: tuple[JobState, ...], to_state: JobState) -> tuple[str, str]:
    """(allowed from-states, to-state) as the transition script reads them; InvalidTransition if forbidden."""
    for source in sources:
        if to_state not in TRANSITIONS[source]:
            raise InvalidTransition(f"{source} -> {to_state} is not an allowed job transition")
    return json.dumps([json.dumps(str(s)) for s in sources]), json.dumps(str(to_state))


@contextmanager
def redis_errors(store: RedisJobStore) -> Iterator[None]:
    """Turn connection failures (and writes refused by a demoted primary) into RedisUnavailable naming the server."""
    try:
        yield
    # ReadOnlyError: a primary that failover demoted to a replica refuses writes until clients move on.
    except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {store.redis_description()}: {exc}; "
            "check STYLEQUEUE_REDIS_URL and that the server is running"
        ) from exc


__all__ = ["Change", "Claim", "ClaimOutcome", "Created", "Moved", "Reaped", "ReapOutcome", "RedisJobStore",
           "TERMINAL_STATES", "redis_errors"]
