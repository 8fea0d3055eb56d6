"""The job record: its states and the transitions between them, its fields, and how it is encoded in Redis.

Pure data, no Redis: `store.py` keeps records, `scripts.py` changes them.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

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

# The whole state machine (docs/jobs.md). running -> queued is a retry, a give-back or a lost worker.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class Priority(StrEnum):
    """Interactive jobs are always served before bulk ones (docs/jobs.md)."""

    INTERACTIVE = "interactive"
    BULK = "bulk"

    @property
    def rank(self) -> int:
        """0 for interactive, 1 for bulk: lower is served first."""
        return 0 if self is Priority.INTERACTIVE else 1


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
    """`2026-11-24T08:00:00.000Z` for `at` (unix seconds; now by default)."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()  # 3.11 reads the trailing Z as UTC


_PLAIN_TEXT = re.compile(r'[^"\\\x00-\x1f\x7f-\uffff]*\Z')


def encode_value(value: Any) -> str:
    """JSON for one hash field; the common cases (None, plain text, ints) without the json module."""
    if value is None:
        return "null"
    if isinstance(value, StrEnum):
        value = value.value
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


# Order and names of the public JSON record (docs/jobs.md); `output_url` is added when served.
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
    priority: Priority = Priority.INTERACTIVE
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
    lease_until: int | None = None  # Redis time, unix milliseconds
    idem_key: str | None = None
    output_bytes: int | None = None
    tenant: str | None = None  # the HTTP gateway tenant that created the job
    deadline_ms: int | None = None  # Redis time by which the job must have started
    staged_uri: str | None = None  # an output written and fenced but not yet promoted to output_uri
    begun: int | None = None  # the attempt a worker reported it began (an unbegun lost attempt is given back)
    unbegun_losses: int | None = None  # how often a worker was lost before it began this job
    # attempts given back (unbegun losses, outage refunds, give-backs): attempt numbers were reused, so an
    # earlier attempt with this job's current number may have staged an output that must be looked for
    given_back: int | None = None

    def __post_init__(self) -> None:
        # A worker builds a Job per claimed job: the enum lookups only where a plain string was given.
        if type(self.state) is not JobState:
            self.state = JobState(self.state)
        if type(self.priority) is not Priority:
            self.priority = _PRIORITY_OF.get(self.priority) or Priority(self.priority)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self, output_url: str | None = None) -> dict[str, Any]:
        """The public record, as docs/jobs.md shows it."""
        data = {name: getattr(self, name) for name in PUBLIC_FIELDS if name != "output_url"}
        data["state"] = str(self.state)
        data["priority"] = str(self.priority)
        data["output_url"] = output_url
        return {name: data[name] for name in PUBLIC_FIELDS}

    def to_redis(self) -> dict[str, str]:
        """The fields of a new record. Unset ones (None, empty, zero attempts) are left out: `from_redis`
        and the Lua scripts read a missing field as its default, and a bulk submit writes a third as much."""
        return {name: encode_value(value) for name in JOB_FIELDS
                if (value := getattr(self, name)) is not None and value != {} and (name != "attempts" or value)}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> Job:
        values = {}
        for key, value in raw.items():
            name = key.decode()
            if name in JOB_FIELDS:
                values[name] = decode_value(value)
        return cls(**values)


JOB_FIELDS = frozenset(f.name for f in fields(Job))
_PRIORITY_OF: dict[Any, Priority] = {str(priority): priority for priority in Priority}

# The `callback` record a job owes from the moment it reaches a final state with a callback_url.
CALLBACK_PENDING: dict[str, Any] = {"state": "pending", "attempts": 0, "last_status": None, "next_attempt_at": None}
