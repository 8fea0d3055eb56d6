"""Jobs: the record, the state machine, and their home in Redis (`RedisJobStore`).

Redis layout (every key starts with STYLEQUEUE_KEY_PREFIX, default `sq:`):

    {p}job:{id}          hash, one field per Job attribute, each value JSON-encoded; TTL once finished
    {p}idem:{key}        string -> job id; no TTL while the job is unfinished, then the job's TTL
    {p}running           zset  job id -> lease expiry (unix s): what the reaper scans for lost workers
    {p}retry             zset  job id -> due time (unix s): transient failures waiting to be re-sent
    {p}callbacks:due     zset  job id -> due time: webhook retries waiting to be re-sent
    {p}runtimes          hash  "{style}|{worker}" -> JSON runtime choice a worker published at load
    {p}workers           hash  worker id -> JSON heartbeat
    {p}bulk:{run}        hash  a `stylequeue bulk` run: src_prefix, style, dst_prefix, created_at; job TTL
    {p}bulk:{run}:jobs   hash  source key (relative to SRC_PREFIX) -> id of its latest job; job TTL
    {p}bulk:{run}:lock   string  token of the live process of that run; expires unless renewed

Every state change is a Lua script: it compares the current state (and owner) and writes in one
step, so two workers racing on a job cannot both win.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from redis.exceptions import NoScriptError

from stylequeue.errors import ErrorCode, InvalidTransition, JobNotFound, RedisUnavailable

__all__ = [
    "ErrorCode",
    "Job",
    "JobState",
    "RedisJobStore",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "MAX_ATTEMPTS",
    "new_job_id",
    "iso_now",
]

JOB_KEY = "job:"
IDEMPOTENCY_KEY = "idem:"
RUNNING_KEY = "running"
RETRY_KEY = "retry"
CALLBACK_DUE_KEY = "callbacks:due"
RUNTIMES_KEY = "runtimes"
WORKERS_KEY = "workers"
BULK_KEY = "bulk:"

MAX_ATTEMPTS = 3


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# The whole state machine (SPEC section 4). running -> queued is a retry or a lost worker.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
_BASE32_PAIRS = [a + b for a in _BASE32 for b in _BASE32]  # 10 bits -> 2 characters


def new_job_id() -> str:
    """`j_` + 26 lower-case base32 characters (128 random bits): opaque and unguessable.

    The same text as base64.b32encode of the 16 bytes, lower-cased without padding, at a quarter of its
    cost (a bulk submit makes tens of thousands of these).
    """
    bits = int.from_bytes(secrets.token_bytes(16), "big") << 2  # 130 bits: 13 pairs of characters
    return "j_" + "".join([_BASE32_PAIRS[(bits >> shift) & 1023] for shift in range(120, -1, -10)])


def iso_now(at: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()  # 3.11 reads the trailing Z as UTC


_PLAIN_TEXT = re.compile(r'[^"\\\x00-\x1f\x7f-\uffff]*\Z')


def encode_value(value: Any) -> str:
    """JSON for one hash field; the common cases (None, plain text, ints) without the json module."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return f'"{value}"' if _PLAIN_TEXT.match(value) else json.dumps(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value)


def decode_value(raw: bytes) -> Any:
    """Inverse of encode_value (any JSON is accepted)."""
    if raw == b"null":
        return None
    if raw[:1] == b'"' and b"\\" not in raw:
        return raw[1:-1].decode()
    if raw.isdigit():
        return int(raw)
    return json.loads(raw)


# Order and names of the public JSON record (SPEC section 4); `output_url` is added when served.
PUBLIC_FIELDS = (
    "id", "state", "style", "input_uri", "output_uri", "output_url", "priority", "callback_url",
    "metadata", "created_at", "started_at", "finished_at", "attempts", "error", "width", "height",
    "model", "timings_ms", "callback",
)


@dataclass
class Job:
    """One restyling job. Fields after `callback` are internal bookkeeping, not part of the JSON."""

    id: str
    style: str
    input_uri: str
    output_uri: str
    state: JobState = JobState.QUEUED
    priority: str = "interactive"
    callback_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=iso_now)
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    error: dict[str, str] | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    callback: dict[str, Any] | None = None
    # internal
    owner: str | None = None
    lease_until: float | None = None
    idem_key: str | None = None
    output_bytes: int | None = None
    tenant: str | None = None  # the HTTP gateway token (its id) that created the job

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self, output_url: str | None = None) -> dict[str, Any]:
        """The public record, exactly SPEC section 4's shape."""
        data = {name: getattr(self, name) for name in PUBLIC_FIELDS if name != "output_url"}
        data["state"] = str(self.state)
        data["output_url"] = output_url
        return {name: data[name] for name in PUBLIC_FIELDS}

    def to_redis(self) -> dict[str, str]:
        """The fields of a new record. Unset ones (None, empty, zero attempts) are left out: `from_redis`
        and the Lua scripts read a missing field as its default, and a bulk submit writes a third as much."""
        return {name: encode_value(value) for name in _JOB_FIELDS
                if (value := getattr(self, name)) is not None and value != {} and (name != "attempts" or value)}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> Job:
        values = {}
        for key, value in raw.items():
            name = key.decode()
            if name in _JOB_FIELDS:
                values[name] = decode_value(value)
        values["state"] = JobState(values["state"])
        return cls(**values)


_JOB_FIELDS = frozenset(f.name for f in fields(Job))


# --- Lua scripts ------------------------------------------------------------------------------

# KEYS: job, idempotency key (or "" for none). ARGV: job id, then field/value pairs.
_CREATE = """
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return existing end
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return false
"""

# Both scripts below change many jobs in one call: the per-job work is a Lua function, run once per
# job key. KEYS: running zset, then one key per job. One call per bulk group instead of one per job
# spares the worker most of its Redis client work.

# Compare-and-set a job's state. Per job, ARGV holds a count n and then n arguments: job id, JSON list
# of allowed (JSON-encoded) from-states, JSON to-state, expected owner (JSON) or "", ttl seconds
# (0 = keep), lease score or "", extra zset key or "", its score, then field/value pairs.
# Returns one result per job: 1 on success, 0 wrong state, -1 no such job, -2 another owner.
_TRANSITION = """
local decoded = {}  -- allowed-state lists, decoded once per call
local function transition(key, running, A)
  local now = redis.call('HMGET', key, 'state', 'owner', 'idem_key')
  local state = now[1]
  if not state then return -1 end
  local allowed = decoded[A[2]]
  if not allowed then
    allowed = {}
    for _, s in ipairs(cjson.decode(A[2])) do allowed[s] = true end
    decoded[A[2]] = allowed
  end
  if not allowed[state] then return 0 end
  if A[4] ~= '' and now[2] ~= A[4] then return -2 end
  redis.call('HSET', key, 'state', A[3], unpack(A, 9))
  if A[6] ~= '' then
    redis.call('ZADD', running, A[6], A[1])
  else
    redis.call('ZREM', running, A[1])
  end
  if A[7] ~= '' then redis.call('ZADD', A[7], A[8], A[1]) end
  local ttl = tonumber(A[5])
  if ttl > 0 then
    redis.call('EXPIRE', key, ttl)
    if now[3] and now[3] ~= 'null' then redis.call('EXPIRE', cjson.decode(now[3]), ttl) end
    __OWE_CALLBACK__
  end
  return 1
end
local results, at = {}, 1
for i = 2, #KEYS do
  local n = tonumber(ARGV[at])
  results[i - 1] = transition(KEYS[i], KEYS[1], {unpack(ARGV, at + 1, at + n)})
  at = at + n + 1
end
return results
"""

# Start an attempt: queued -> running, or take over a running job whose lease expired. ARGV: worker
# (JSON), now, lease_until, max attempts, started_at (JSON), failure error (JSON), finished_at (JSON),
# ttl, then one id per job key. Returns per job {outcome, detail, ...}: claimed (detail: attempts, then
# the values of CLAIM_FIELDS, so the worker needs no second round trip) | busy | done | failed | missing.
_CLAIM = """
local running, now = KEYS[1], tonumber(ARGV[2])
local function claim(key, id)
  local current = redis.call('HMGET', key, 'state', 'lease_until', 'attempts')
  local state = current[1]
  if not state then return {'missing', ''} end
  if state == '"running"' then
    local lease = tonumber(current[2]) or 0
    if lease > now then return {'busy', state} end
  elseif state ~= '"queued"' then
    return {'done', state}
  end
  local attempts = tonumber(current[3]) or 0
  if attempts >= tonumber(ARGV[4]) then
    redis.call('HSET', key, 'state', '"failed"', 'error', ARGV[6], 'finished_at', ARGV[7],
               'owner', 'null', 'lease_until', 'null')
    redis.call('ZREM', running, id)
    redis.call('EXPIRE', key, tonumber(ARGV[8]))
    local idem = redis.call('HGET', key, 'idem_key')
    if idem and idem ~= 'null' then redis.call('EXPIRE', cjson.decode(idem), tonumber(ARGV[8])) end
    __OWE_CALLBACK__
    return {'failed', '"failed"'}
  end
  redis.call('HSET', key, 'state', '"running"', 'owner', ARGV[1], 'lease_until', ARGV[3],
             'started_at', ARGV[5], 'attempts', attempts + 1, 'error', 'null')
  redis.call('ZADD', running, ARGV[3], id)
  return {'claimed', tostring(attempts + 1), unpack(redis.call('HMGET', key, __CLAIM_FIELDS__))}
end
local results = {}
for i = 2, #KEYS do results[i - 1] = claim(KEYS[i], ARGV[7 + i]) end
return results
"""

# What a claim returns of a job besides its id and attempt: what a worker needs to run it and report it.
CLAIM_FIELDS = ("style", "input_uri", "output_uri", "priority", "callback_url", "created_at")

# Renew leases. KEYS: running zset. ARGV: key prefix of jobs, owner (JSON), lease_until, job ids...
# Returns the ids this owner no longer holds.
_RENEW = """
local lost = {}
for i = 4, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local state = redis.call('HGET', key, 'state')
  if state == '"running"' and redis.call('HGET', key, 'owner') == ARGV[2] then
    redis.call('HSET', key, 'lease_until', ARGV[3])
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# Reap one job whose lease expired. KEYS: job, running zset. ARGV: job id, now, max attempts,
# error (JSON), finished_at (JSON), ttl. Returns 'requeued', 'failed' or 'skip'.
_REAP = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= '"running"' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 'skip'
end
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until')) or 0
if lease > tonumber(ARGV[2]) then return 'skip' end
redis.call('ZREM', KEYS[2], ARGV[1])
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts')) or 0
if attempts >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', '"failed"', 'error', ARGV[4], 'finished_at', ARGV[5],
             'owner', 'null', 'lease_until', 'null')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
  local idem = redis.call('HGET', KEYS[1], 'idem_key')
  if idem and idem ~= 'null' then redis.call('EXPIRE', cjson.decode(idem), tonumber(ARGV[6])) end
  __OWE_CALLBACK__
  return 'failed'
end
redis.call('HSET', KEYS[1], 'state', '"queued"', 'owner', 'null', 'lease_until', 'null')
return 'requeued'
"""

# The `callback` record a job owes from the moment it reaches a final state with a callback_url.
CALLBACK_PENDING: dict[str, Any] = {"state": "pending", "attempts": 0, "last_status": None, "next_attempt_at": None}
# Set in the same script as the final state, so nobody polling ever sees a finished job that has a
# callback_url but no `callback` record yet; the delivery message is sent afterwards.
_OWE_CALLBACK = """local cb_url = redis.call('HGET', KEYS[1], 'callback_url')
  if cb_url and cb_url ~= 'null' then
    local cb = redis.call('HGET', KEYS[1], 'callback')
    if (not cb) or cb == 'null' then redis.call('HSET', KEYS[1], 'callback', [[__PENDING__]]) end
  end""".replace("__PENDING__", json.dumps(CALLBACK_PENDING))
_TRANSITION, _CLAIM = (script.replace("__OWE_CALLBACK__", _OWE_CALLBACK.replace("KEYS[1]", "key"))
                       for script in (_TRANSITION, _CLAIM))
_CLAIM = _CLAIM.replace("__CLAIM_FIELDS__", ", ".join(f"'{name}'" for name in CLAIM_FIELDS))
_REAP = _REAP.replace("__OWE_CALLBACK__", _OWE_CALLBACK)

# Take due members of a schedule zset, pushing their score `claim_s` ahead so a worker that dies
# before sending them leaves them due again rather than lost. KEYS: zset. ARGV: now, limit, claim_s.
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), member)
end
return due
"""

# Set fields on a job only if its record still exists (never resurrect an expired record).
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


@dataclass(frozen=True)
class Claim:
    """Outcome of `RedisJobStore.claim`: `claimed` (run it), `busy`, `done`, `failed` or `missing`.

    A claimed `job` carries what a worker needs (CLAIM_FIELDS, its state, attempt and owner), not the
    whole record: read that with `get`.
    """

    outcome: str
    attempts: int = 0
    state: JobState | None = None
    job: Job | None = None


def _encode_fields(values: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in values.items():
        flat += [name, encode_value(value.value if isinstance(value, JobState) else value)]
    return flat


@functools.lru_cache(maxsize=64)
def _json_text(text: str) -> str:
    return json.dumps(text)


@functools.lru_cache(maxsize=64)
def _transition_head(sources: tuple[JobState, ...], to_state: JobState) -> tuple[str, str]:
    """(allowed from-states, to-state) as the transition script reads them; InvalidTransition if forbidden."""
    for source in sources:
        if to_state not in TRANSITIONS[source]:
            raise InvalidTransition(f"{source} -> {to_state} is not an allowed job transition")
    return json.dumps([json.dumps(str(s)) for s in sources]), json.dumps(str(to_state))


class RedisJobStore:
    """Job records in Redis: create, get, compare-and-set transitions, leases, schedules."""

    def __init__(self, client: redis.Redis, *, key_prefix: str = "sq:", job_ttl_s: int = 604800) -> None:
        self.redis = client
        self.prefix = key_prefix
        self.job_ttl_s = job_ttl_s
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._reap = client.register_script(_REAP)
        self._take_due = client.register_script(_TAKE_DUE)
        self._update = client.register_script(_UPDATE)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str = "sq:", job_ttl_s: int = 604800,
                 max_connections: int = 64) -> RedisJobStore:
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=20, socket_connect_timeout=5, socket_timeout=30,
            health_check_interval=30,
        )
        return cls(redis.Redis(connection_pool=pool), key_prefix=key_prefix, job_ttl_s=job_ttl_s)

    # --- keys -----------------------------------------------------------------------------------

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}{JOB_KEY}{job_id}"

    def idempotency_key(self, key: str) -> str:
        return f"{self.prefix}{IDEMPOTENCY_KEY}{key}"

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    # --- create / read ----------------------------------------------------------------------------

    def create(self, job: Job, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Store a new job; with an idempotency key seen before, return (that job, False) instead."""
        idem = self.idempotency_key(idempotency_key) if idempotency_key else ""
        job.idem_key = idem or None
        with redis_errors(self):
            existing = self._create(keys=[self.job_key(job.id), idem], args=[job.id, *_flatten(job.to_redis())])
        if existing is not None:
            return self.get(existing.decode()), False
        return job, True

    def create_many(self, jobs: Sequence[Job]) -> None:
        """Store many new jobs in one pipelined round trip (no idempotency keys)."""
        with redis_errors(self):
            pipe = self.redis.pipeline(transaction=False)
            for job in jobs:
                pipe.hset(self.job_key(job.id), mapping=job.to_redis())
            pipe.execute()

    def get(self, job_id: str) -> Job:
        with redis_errors(self):
            raw = self.redis.hgetall(self.job_key(job_id))
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

    def exists(self, job_id: str) -> bool:
        with redis_errors(self):
            return bool(self.redis.exists(self.job_key(job_id)))

    # --- state changes ----------------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        from_state: JobState | Iterable[JobState],
        to_state: JobState,
        *,
        owner: str | None = None,
        schedule: tuple[str, float] | None = None,
        **values: Any,
    ) -> bool:
        """Compare-and-set: move the job from `from_state` to `to_state` and write `values`.

        Returns False (writing nothing) when the job is not in `from_state` or, with `owner`, is held
        by another owner. `schedule=(zset name, score)` also adds the job to that zset atomically.
        Raises JobNotFound for an unknown id and InvalidTransition for a change the table forbids.
        """
        args = self._transition_args(job_id, from_state, to_state, owner, schedule, values)
        with redis_errors(self):
            result = self._call(self._transition, [self.key(RUNNING_KEY), self.job_key(job_id)],
                                [str(len(args)), *args])[0]
        if result == -1:
            raise JobNotFound(job_id)
        return bool(result == 1)

    def transition_many(
        self, changes: Sequence[tuple[str, JobState, JobState, str | None, dict[str, Any]]]
    ) -> list[bool]:
        """Several `transition(job_id, from, to, owner=owner, **values)` in one script call.

        Each is its own compare-and-set; a job whose record is gone counts as not moved.
        """
        if not changes:
            return []
        keys, argv = [self.key(RUNNING_KEY)], []
        finished_at = iso_now()
        for job_id, from_state, to_state, owner, values in changes:
            args = self._transition_args(job_id, from_state, to_state, owner, None, dict(values), finished_at)
            keys.append(self.job_key(job_id))
            argv += [str(len(args)), *args]
        with redis_errors(self):
            return [result == 1 for result in self._call(self._transition, keys, argv)]

    def _call(self, script: Any, keys: list[str], args: list[str]) -> Any:
        """Run a Lua script by SHA; load it first if Redis lost its script cache (a restart).

        redis-py's own Script object costs a SCRIPT EXISTS round trip in pipelines; this never pipelines.
        """
        try:
            return self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.redis.script_load(script.script)
            return self.redis.evalsha(script.sha, len(keys), *keys, *args)

    def _transition_args(self, job_id: str, from_state: JobState | Iterable[JobState], to_state: JobState,
                         owner: str | None, schedule: tuple[str, float] | None, values: dict[str, Any],
                         finished_at: str | None = None) -> list[str]:
        sources = (from_state,) if isinstance(from_state, JobState) else tuple(from_state)
        allowed, target = _transition_head(sources, to_state)
        if to_state in TERMINAL_STATES:
            values.setdefault("finished_at", finished_at or iso_now())
        if to_state != JobState.RUNNING:
            values.setdefault("owner", None)
            values.setdefault("lease_until", None)
        lease = values.get("lease_until") if to_state == JobState.RUNNING else None
        return [
            job_id,
            allowed,
            target,
            _json_text(owner) if owner is not None else "",
            str(self.job_ttl_s if to_state in TERMINAL_STATES else 0),
            repr(lease) if lease is not None else "",
            self.key(schedule[0]) if schedule else "",
            repr(schedule[1]) if schedule else "0",
            *_encode_fields(values),
        ]

    def claim(self, job_id: str, worker_id: str, *, lease_s: float, now: float | None = None,
              max_attempts: int = MAX_ATTEMPTS) -> Claim:
        """Start an attempt: queued -> running, or take over a running job whose lease expired.

        A job that already used `max_attempts` fails with `internal` instead (its worker was lost).
        """
        return self.claim_many([job_id], worker_id, lease_s=lease_s, now=now, max_attempts=max_attempts)[0]

    def claim_many(self, job_ids: Sequence[str], worker_id: str, *, lease_s: float, now: float | None = None,
                   max_attempts: int = MAX_ATTEMPTS) -> list[Claim]:
        """`claim` for each job, in one pipelined round trip (a bulk chunk)."""
        now = time.time() if now is None else now
        error = json.dumps({"code": str(ErrorCode.INTERNAL),
                            "message": f"worker lost during the last of {max_attempts} attempts"})
        started_at = iso_now(now)
        stamp = json.dumps(started_at)
        common = [json.dumps(worker_id), repr(now), repr(now + lease_s), str(max_attempts), stamp, error, stamp,
                  str(self.job_ttl_s)]
        keys = [self.key(RUNNING_KEY), *map(self.job_key, job_ids)]
        with redis_errors(self):
            results = self._call(self._claim, keys, [*common, *job_ids]) if job_ids else []
        claims = []
        for job_id, result in zip(job_ids, results, strict=True):
            outcome, detail = result[0].decode(), result[1].decode()
            if outcome == "claimed":
                values = {name: decode_value(raw) for name, raw in zip(CLAIM_FIELDS, result[2:], strict=True)
                          if raw is not None}
                job = Job(id=job_id, state=JobState.RUNNING, attempts=int(detail), started_at=started_at,
                          owner=worker_id, **values)
                claims.append(Claim("claimed", attempts=int(detail), state=JobState.RUNNING, job=job))
            else:
                claims.append(Claim(outcome, state=JobState(json.loads(detail)) if detail else None))
        return claims

    def renew_leases(self, worker_id: str, job_ids: Sequence[str], *, lease_s: float) -> list[str]:
        """Push the leases of jobs this worker runs `lease_s` ahead; returns the ids it no longer holds."""
        if not job_ids:
            return []
        args = [self.prefix + JOB_KEY, json.dumps(worker_id), repr(time.time() + lease_s), *job_ids]
        with redis_errors(self):
            lost = self._renew(keys=[self.key(RUNNING_KEY)], args=args)
        return [item.decode() for item in lost]

    def expired_leases(self, *, now: float | None = None, limit: int = 100) -> list[str]:
        now = time.time() if now is None else now
        with redis_errors(self):
            ids = self.redis.zrangebyscore(self.key(RUNNING_KEY), "-inf", now, start=0, num=limit)
        return [i.decode() for i in ids]

    def reap(self, job_id: str, *, now: float | None = None, max_attempts: int = MAX_ATTEMPTS) -> str:
        """Return a job with an expired lease to `queued` (or fail it after its last attempt).

        Returns 'requeued' (the caller must send it again), 'failed' or 'skip' (lease alive / not running).
        """
        now = time.time() if now is None else now
        error = {"code": str(ErrorCode.INTERNAL), "message": f"worker lost during attempt {max_attempts} of "
                 f"{max_attempts}"}
        args = [job_id, repr(now), str(max_attempts), json.dumps(error), json.dumps(iso_now(now)),
                str(self.job_ttl_s)]
        with redis_errors(self):
            result = self._reap(keys=[self.job_key(job_id), self.key(RUNNING_KEY)], args=args)
        return str(result.decode())

    def update(self, job_id: str, **values: Any) -> bool:
        """Write fields that are not the state (e.g. `callback`) if the record still exists."""
        with redis_errors(self):
            return bool(self._update(keys=[self.job_key(job_id)], args=_encode_fields(values)))

    # --- schedules (retries and callback retries; never Celery countdown/eta) -----------------------

    def schedule(self, name: str, job_id: str, due: float) -> None:
        with redis_errors(self):
            self.redis.zadd(self.key(name), {job_id: due})

    def take_due(self, name: str, *, now: float | None = None, limit: int = 100, claim_s: float = 60) -> list[str]:
        """Due members of a schedule, pushed `claim_s` ahead until `done_due` removes them."""
        now = time.time() if now is None else now
        with redis_errors(self):
            due = self._take_due(keys=[self.key(name)], args=[repr(now), str(limit), repr(claim_s)])
        return [d.decode() for d in due]

    def done_due(self, name: str, job_ids: Sequence[str]) -> None:
        if job_ids:
            with redis_errors(self):
                self.redis.zrem(self.key(name), *job_ids)

    def scheduled(self, name: str) -> dict[str, float]:
        with redis_errors(self):
            return {k.decode(): v for k, v in self.redis.zrange(self.key(name), 0, -1, withscores=True)}

    # --- what workers publish -----------------------------------------------------------------------

    def publish_runtime(self, style: str, worker_id: str, info: dict[str, Any]) -> None:
        with redis_errors(self):
            self.redis.hset(self.key(RUNTIMES_KEY), f"{style}|{worker_id}", json.dumps(info))

    def runtimes(self) -> dict[str, dict[str, dict[str, Any]]]:
        """style -> worker id -> the runtime choice that worker published."""
        with redis_errors(self):
            raw = self.redis.hgetall(self.key(RUNTIMES_KEY))
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for key, value in raw.items():
            style, _, worker = key.decode().partition("|")
            out.setdefault(style, {})[worker] = json.loads(value)
        return out

    def heartbeat(self, worker_id: str, info: dict[str, Any]) -> None:
        with redis_errors(self):
            self.redis.hset(self.key(WORKERS_KEY), worker_id, json.dumps(info | {"seen": time.time()}))

    def workers(self, *, max_age_s: float = 60) -> dict[str, dict[str, Any]]:
        """Workers that sent a heartbeat in the last `max_age_s` seconds."""
        with redis_errors(self):
            raw = self.redis.hgetall(self.key(WORKERS_KEY))
        now = time.time()
        live = {k.decode(): json.loads(v) for k, v in raw.items()}
        return {k: v for k, v in live.items() if now - v.get("seen", 0) <= max_age_s}

    def forget_worker(self, worker_id: str) -> None:
        with redis_errors(self):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(self.key(WORKERS_KEY), worker_id)
            for field_name in self.redis.hkeys(self.key(RUNTIMES_KEY)):
                if field_name.decode().endswith(f"|{worker_id}"):
                    pipe.hdel(self.key(RUNTIMES_KEY), field_name)
            pipe.execute()

    def ping(self) -> None:
        with redis_errors(self):
            self.redis.ping()

    def redis_description(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def _flatten(mapping: dict[str, str]) -> Iterator[str]:
    for key, value in mapping.items():
        yield key
        yield value


@contextmanager
def redis_errors(store: RedisJobStore) -> Iterator[None]:
    """Turn connection failures into RedisUnavailable naming the server."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {store.redis_description()}: {exc}; "
            "check STYLEQUEUE_REDIS_URL and that the server is running"
        ) from exc
