"""The HTTP gateway (docs/http.md): the job API for callers that do not speak Redis.

`stylequeue api` serves `make_app` with uvicorn. Every route but /healthz and /metrics needs
`Authorization: Bearer <token>` with one of STYLEQUEUE_API_TOKENS. A job belongs to the token that
created it: with any other token it does not exist (404, the same answer as for an unknown id), and
idempotency keys are per token too. Errors are `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from stylequeue import broker
from stylequeue.errors import ConfigError, JobNotFound, RedisUnavailable, StyleQueueError
from stylequeue.jobs import Job
from stylequeue.producer.client import Client

MAX_BATCH_JOBS = 1000


class SubmitBody(BaseModel):
    """The arguments of `Client.submit`."""

    model_config = ConfigDict(extra="forbid")

    input_uri: str = Field(max_length=4096)
    style: str = Field(max_length=200)
    callback_url: str | None = Field(None, max_length=4096)
    output_uri: str | None = Field(None, max_length=4096)
    priority: Literal["interactive", "bulk"] = "interactive"
    idempotency_key: str | None = Field(None, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    deadline_s: float | None = Field(None, gt=0, le=604800)


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[SubmitBody] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


def token_id(token: str) -> str:
    """What a job records of the token that created it: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


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


def make_app(client: Client, tokens: Sequence[str]) -> FastAPI:
    """The gateway over `client`; `tokens` are the accepted bearer tokens (at least one)."""
    if not tokens:
        raise ConfigError("the HTTP gateway needs STYLEQUEUE_API_TOKENS (comma-separated bearer tokens)")
    known = {token_id(token): token for token in tokens}
    registry = CollectorRegistry()
    requests = Counter("stylequeue_api_requests_total", "Gateway requests", ["route", "status"], registry=registry)
    registry.register(_QueueDepths(client))
    app = FastAPI(title="stylequeue", summary="Restyle photos with CycleGAN generators, asynchronously.")

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.exception_handler(StyleQueueError)
    async def stylequeue_error(_: Request, exc: StyleQueueError) -> JSONResponse:
        if isinstance(exc, RedisUnavailable):
            return _error(503, "unavailable", str(exc))
        if isinstance(exc, JobNotFound):
            return _error(404, "not_found", str(exc))
        return _error(400, str(getattr(exc, "code", "invalid_request")), str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        codes = {401: "unauthorized", 404: "not_found"}
        response = _error(exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    def caller(authorization: str | None = Header(None)) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        expected = known.get(token_id(token)) if scheme.lower() == "bearer" and token else None
        if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
            raise HTTPException(401, "a valid 'Authorization: Bearer <token>' header is required",
                                headers={"WWW-Authenticate": "Bearer"})
        return token_id(token)

    def owned(job_id: str, tenant: str) -> Job:
        try:
            job = client.get(job_id)
        except JobNotFound:
            job = None
        if job is None or job.tenant != tenant:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def submit_one(body: SubmitBody, tenant: str) -> Job:
        return client.submit(body.input_uri, body.style, callback_url=body.callback_url, output_uri=body.output_uri,
                             priority=body.priority, metadata=body.metadata, tenant=tenant,
                             deadline_s=body.deadline_s,
                             idempotency_key=f"{tenant}:{body.idempotency_key}" if body.idempotency_key else None)

    @app.post("/v1/jobs", status_code=202)
    def submit(body: SubmitBody, tenant: str = Depends(caller)) -> dict[str, Any]:
        """Create one job (`Client.submit`); 202 with the job's record."""
        return client.to_json(submit_one(body, tenant))

    @app.post("/v1/jobs:batch", status_code=202)
    def submit_batch(body: BatchBody, tenant: str = Depends(caller)) -> dict[str, Any]:
        """Create up to 1,000 jobs; each is checked before any is created, so a bad one creates none."""
        for item in body.jobs:
            client.check_submit(item.input_uri, item.style, callback_url=item.callback_url,
                                output_uri=item.output_uri, priority=item.priority, metadata=item.metadata,
                                deadline_s=item.deadline_s)
        return {"jobs": [client.to_json(submit_one(item, tenant)) for item in body.jobs]}

    @app.get("/v1/jobs/{job_id}")
    def get(job_id: str, tenant: str = Depends(caller)) -> dict[str, Any]:
        return client.to_json(owned(job_id, tenant))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, tenant: str = Depends(caller)) -> dict[str, Any]:
        """Cancel a queued or running job; a finished job is returned unchanged."""
        owned(job_id, tenant)
        return client.to_json(client.cancel(job_id))

    @app.get("/v1/styles")
    def styles(_: str = Depends(caller)) -> dict[str, Any]:
        return {"styles": client.styles()}

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            client.store.ping()
        except StyleQueueError as exc:
            return _error(503, "unavailable", str(exc))
        return JSONResponse({"ok": True})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app
