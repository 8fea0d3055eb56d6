"""The lazy Celery `app` that `celery -A stylequeue.worker.app worker` reads.

The app itself is built by `stylequeue.broker.make_celery_app` (producers use the same factory to send);
this module only builds it from the environment on first access, so importing it reads no settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stylequeue.broker import make_celery_app

if TYPE_CHECKING:
    from celery import Celery

_app: Celery | None = None


def __getattr__(name: str) -> Any:
    global _app
    if name in ("app", "celery"):
        if _app is None:
            from stylequeue.config.settings import load_settings

            _app = make_celery_app(load_settings())
        return _app
    raise AttributeError(name)


__all__ = ["make_celery_app"]
