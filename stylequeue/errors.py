"""Every exception stylequeue raises, and the job error codes they map to.

Inside the code, failures are typed exceptions; at the task boundary a `JobError` becomes the job's
`{"code": ..., "message": ...}` once (worker/tasks.py). Exceptions that are not `JobError`s describe
the caller's mistake (unknown job, bad configuration) and map to CLI exit codes instead.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The `error.code` of a failed job (docs/jobs.md)."""

    INVALID_INPUT = "invalid_input"
    INPUT_TOO_LARGE = "input_too_large"
    INPUT_NOT_FOUND = "input_not_found"
    INPUT_FORBIDDEN = "input_forbidden"
    UNKNOWN_STYLE = "unknown_style"
    STORAGE_ERROR = "storage_error"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    INTERNAL = "internal"


class StyleQueueError(Exception):
    """Base class of every stylequeue exception."""


# --- the caller's mistakes (CLI exit codes 2, 3, 4, 5) -------------------------------------------


class ConfigError(StyleQueueError):
    """Invalid settings, registry or command-line usage (CLI exit 2)."""


class JobNotFound(StyleQueueError, KeyError):
    """No job with that id (never existed, or its record expired) (CLI exit 3)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id} not found (unknown id, or its record expired)"


class RedisUnavailable(StyleQueueError):
    """The job store's Redis cannot be reached (CLI exit 4)."""


class BrokerUnavailable(RedisUnavailable):
    """The broker refused a message (CLI exit 4, HTTP 503): the submit was undone, nothing was created."""


class WaitTimeout(StyleQueueError, TimeoutError):
    """`Client.wait` gave up before the job finished (CLI exit 5)."""


class InvalidTransition(StyleQueueError, ValueError):
    """A state change the job state machine does not allow (a programming error)."""


class WeightsError(ConfigError):
    """A weights file does not fit the generator its style declares."""


# --- errors that fail a job (they carry an ErrorCode) -----------------------------------------


class JobError(StyleQueueError):
    """An error that ends a job attempt. `transient` ones are retried (at most 3 attempts)."""

    code: ErrorCode = ErrorCode.INTERNAL
    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if transient is not None:
            self.transient = transient

    def to_error(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}


class InvalidInput(JobError):
    code = ErrorCode.INVALID_INPUT


class InputTooLarge(JobError):
    code = ErrorCode.INPUT_TOO_LARGE


class InputNotFound(JobError):
    code = ErrorCode.INPUT_NOT_FOUND


class InputForbidden(JobError):
    code = ErrorCode.INPUT_FORBIDDEN


class UnknownStyle(JobError, ConfigError):
    """The style is not in the registry: a job error in a worker, a usage error (exit 2) in the CLI."""

    code = ErrorCode.UNKNOWN_STYLE


class StorageError(JobError):
    """Reading or writing object storage failed; transient for 5xx and connection errors."""

    code = ErrorCode.STORAGE_ERROR


class JobTimeout(JobError):
    code = ErrorCode.TIMEOUT
    transient = True


class InternalError(JobError):
    code = ErrorCode.INTERNAL


class PaddleMissing(ConfigError):
    """A model operation was asked of an install that has no Paddle (the light producer install)."""

    def __init__(self) -> None:
        super().__init__(
            "PaddlePaddle is not installed: for a CPU worker run `pip install 'stylequeue[cpu]'`; "
            "for a GPU worker install paddlepaddle-gpu 3.x from Paddle's package index, then "
            "`pip install 'stylequeue[gpu]'`"
        )
