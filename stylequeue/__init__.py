"""stylequeue: restyle photos with CycleGAN generators, asynchronously, at scale.

    from stylequeue import Client
    job = Client().submit("s3://photos/a.jpg", style="ink")

Importing this package is light: no Paddle, no model, no GPU. `restyle` loads a
model when called; `Client` only talks to Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stylequeue.errors import (
    ConfigError,
    ErrorCode,
    InputForbidden,
    InputNotFound,
    InputTooLarge,
    InternalError,
    InvalidInput,
    JobError,
    JobNotFound,
    JobTimeout,
    RedisUnavailable,
    StorageError,
    StyleQueueError,
    UnknownStyle,
    WaitTimeout,
    WeightsError,
)
from stylequeue.jobs import Job, JobState

__version__ = "0.1.0"

if TYPE_CHECKING:
    from stylequeue.pipeline.restyle import restyle
    from stylequeue.producer.client import Client
    from stylequeue.webhooks import WebhookVerificationError, verify_webhook

_LAZY = {
    "Client": ("stylequeue.producer.client", "Client"),
    "restyle": ("stylequeue.pipeline.restyle", "restyle"),
    "verify_webhook": ("stylequeue.webhooks", "verify_webhook"),
    "WebhookVerificationError": ("stylequeue.webhooks", "WebhookVerificationError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stylequeue' has no attribute {name!r}")


__all__ = [
    "Client",
    "ConfigError",
    "ErrorCode",
    "InputForbidden",
    "InputNotFound",
    "InputTooLarge",
    "InternalError",
    "InvalidInput",
    "Job",
    "JobError",
    "JobNotFound",
    "JobState",
    "JobTimeout",
    "RedisUnavailable",
    "StorageError",
    "StyleQueueError",
    "UnknownStyle",
    "WaitTimeout",
    "WebhookVerificationError",
    "WeightsError",
    "__version__",
    "restyle",
    "verify_webhook",
]
