"""Jobs: the record and its state machine (record.py), its home in Redis (store.py, keys.py), every Lua script
(scripts.py), what workers publish (presence.py) and bulk runs' records (runs.py).

Everything a caller needs is importable from `stylequeue.jobs`.
"""

from stylequeue.errors import ErrorCode
from stylequeue.jobs.keys import CALLBACKS_DUE, DUE, QUEUED, RUNNING, SENT, Keys
from stylequeue.jobs.presence import Presence
from stylequeue.jobs.record import (
    CALLBACK_PENDING,
    JOB_FIELDS,
    MAX_ATTEMPTS,
    PUBLIC_FIELDS,
    TERMINAL_STATES,
    TRANSITIONS,
    Job,
    JobState,
    Priority,
    decode_value,
    encode_value,
    iso_now,
    new_job_id,
    parse_iso,
)
from stylequeue.jobs.runs import BulkRunRecord
from stylequeue.jobs.store import (
    CALLBACK_LEASE_S,
    DISPATCH_GRACE_S,
    DUE_HOLD_S,
    Change,
    Claim,
    ClaimOutcome,
    Created,
    Moved,
    Reaped,
    ReapOutcome,
    RedisJobStore,
    redis_errors,
)

__all__ = [
    "BulkRunRecord", "CALLBACK_LEASE_S", "CALLBACK_PENDING", "CALLBACKS_DUE", "Change", "Claim", "ClaimOutcome",
    "Created", "DISPATCH_GRACE_S", "DUE", "DUE_HOLD_S", "ErrorCode", "JOB_FIELDS", "Job", "JobState", "Keys",
    "MAX_ATTEMPTS", "Moved", "PUBLIC_FIELDS", "Presence", "Priority", "QUEUED", "RUNNING", "Reaped",
    "ReapOutcome", "RedisJobStore", "SENT", "TERMINAL_STATES", "TRANSITIONS", "decode_value", "encode_value", "iso_now",
    "new_job_id", "parse_iso", "redis_errors",
]
