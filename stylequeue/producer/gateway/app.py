"""`make_app`: the gateway's pieces wired into one FastAPI app, and how errors reach callers.

Errors are `{"error": {"code", "message"}}`. Status by cause: 401 no or unknown token; 403
`input_forbidden` (a URI or callback host the caller may not name); 404 `not_found` (unknown id, or
another tenant's job); 400 with the job error code (`unknown_style`, `invalid_input`, ...) or
`invalid_request`; 413 `too_large` / `input_too_large`; 422 a malformed body; 429 `rate_limited` or
`too_many_in_flight` with Retry-After; 503 `unavailable` (the job store or broker) or `storage_error`.
Messages say what to do; they never name server internals (Redis address, directories, worker ids): those
go to the gateway's log.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from starlette.exceptions import HTTPException

from stylequeue import broker
from stylequeue.config.settings import Settings
from stylequeue.config.tenants import Tenant, TenantBook
from stylequeue.errors import (
    ConfigError,
    InputForbidden,
    InputTooLarge,
    JobError,
    JobNotFound,
    RedisUnavailable,
    StorageError,
    StyleQueueError,
)
from stylequeue.jobs.tenants import TenantJobs
from stylequeue.pipeline.storage import Storage
from stylequeue.producer.client import Client
from stylequeue.producer.gateway.guard import Guard
from stylequeue.producer.gateway.longpoll import FinishedWatcher
from stylequeue.producer.gateway.tenancy import TooManyInFlight

log = logging.getLogger("stylequeue.gateway")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class _QueueDepths:
    """Queue depths read from the broker at each scrape."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("stylequeue_queue_depth", "Messages waiting in a broker queue", labels=["queue"])
        try:
            for queue, depth in broker.queue_depths(self.client.app).items():
                family.add_metric([queue], depth)
        except Exception:  # noqa: S110 - a scrape without the broker reports no depths, /healthz says why
            return
        yield family


@dataclass
class Gateway:
    """Everything the routes share: the client, the callers, per-tenant bookkeeping, storage, long polls."""

    client: Client
    book: TenantBook
    tenants: TenantJobs
    storage: Storage  # uploads (it may write under the tenants' file:// upload prefixes) and output bytes
    watcher: FinishedWatcher
    registry: CollectorRegistry
    requests: Counter

    @property
    def settings(self) -> Settings:
        return self.client.settings

    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()


def _upload_roots(tenants: Sequence[Tenant]) -> list[str]:
    return [tenant.uploads.removeprefix("file://") for tenant in tenants
            if tenant.uploads is not None and tenant.uploads.startswith("file://")]


def make_gateway(client: Client, book: TenantBook) -> Gateway:
    registry = CollectorRegistry()
    requests = Counter("stylequeue_api_requests_total", "Gateway requests", ["route", "status"], registry=registry)
    registry.register(_QueueDepths(client))
    watcher = FinishedWatcher(client.store)
    Gauge("stylequeue_api_waiting_requests", "Long polls waiting now", registry=registry).set_function(
        lambda: watcher.waiting)
    storage = Storage(client.settings, upload_roots=_upload_roots(book.tenants))
    return Gateway(client, book, TenantJobs(client.store), storage, watcher, registry, requests)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StyleQueueError)
    async def stylequeue_error(_: Request, exc: StyleQueueError) -> JSONResponse:
        return _error_for(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return error_response(exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail),
                              dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, "internal", "the gateway failed unexpectedly; the error is in its log")


def _error_for(exc: StyleQueueError) -> JSONResponse:
    """The one mapping of stylequeue's exceptions to HTTP answers."""
    if isinstance(exc, RedisUnavailable):
        log.warning("job store or broker unavailable: %s", exc)
        return error_response(503, "unavailable", "the job store is unavailable; nothing was changed; try again "
                                                  "shortly", {"Retry-After": "5"})
    if isinstance(exc, JobNotFound):
        return error_response(404, "not_found", str(exc))
    if isinstance(exc, TooManyInFlight):
        return error_response(429, "too_many_in_flight", str(exc), {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, InputForbidden):
        return error_response(403, str(exc.code), exc.message)
    if isinstance(exc, InputTooLarge):
        return error_response(413, str(exc.code), exc.message)
    if isinstance(exc, StorageError):
        log.warning("storage failed: %s", exc)
        return error_response(503 if exc.transient else 500, str(exc.code), exc.message)
    if isinstance(exc, JobError):
        return error_response(400, str(exc.code), exc.message)
    if isinstance(exc, ConfigError):
        return error_response(400, "invalid_request", str(exc))
    log.error("unmapped error: %r", exc)
    return error_response(500, "internal", "the gateway failed unexpectedly; the error is in its log")


def make_app(client: Client, tokens: Sequence[str] = (), *, tenants: Sequence[Tenant] = ()) -> FastAPI:
    """The gateway over `client` for the callers of a tenants file (`tenants`) and plain `tokens` (unscoped)."""
    from stylequeue.producer.gateway import page, routes, uploads

    book = TenantBook([*tenants, *(Tenant.unscoped(token) for token in dict.fromkeys(tokens))])
    if not book:
        raise ConfigError("the HTTP gateway needs STYLEQUEUE_API_TENANTS (a tenants file, docs/http.md) or "
                          "STYLEQUEUE_API_TOKENS (comma-separated bearer tokens)")
    gateway = make_gateway(client, book)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        gateway.watcher.stop()

    app = FastAPI(title="stylequeue", summary="Restyle photos with CycleGAN generators, asynchronously.",
                  lifespan=lifespan)
    app.state.gateway = gateway
    _install_error_handlers(app)
    app.include_router(routes.router(gateway))
    app.include_router(uploads.router(gateway))
    app.include_router(page.router(gateway))
    app.add_middleware(Guard, gateway=gateway)  # outermost of ours: nothing it refuses is read
    return app
