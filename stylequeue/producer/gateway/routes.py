"""The job routes (docs/http.md): submit (JSON or a photo), batch, get and long poll, list, cancel, output,
styles, and the unauthenticated /healthz and /metrics.

A job belongs to the tenant that created it: to any other caller it does not exist (404, the same answer as
for an unknown id).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from stylequeue.errors import JobNotFound, StyleQueueError
from stylequeue.jobs import Job, JobState
from stylequeue.producer.gateway.guard import tenant_of
from stylequeue.producer.gateway.longpoll import MAX_WAIT_S
from stylequeue.producer.gateway.tenancy import BatchBody, SubmitBody, submit_jobs

if TYPE_CHECKING:
    from stylequeue.config.tenants import Tenant
    from stylequeue.producer.gateway.app import Gateway

log = logging.getLogger("stylequeue.gateway")

MAX_PAGE = 100
_MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# POST /v1/jobs takes JSON or a multipart form; FastAPI cannot say so from one signature, so OpenAPI is told.
_SUBMIT_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/SubmitBody"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "style"], "properties": {
        "image": {"type": "string", "format": "binary"}, "style": {"type": "string"},
        "callback_url": {"type": "string"}, "output_uri": {"type": "string"},
        "priority": {"type": "string", "enum": ["interactive", "bulk"]}, "idempotency_key": {"type": "string"},
        "metadata": {"type": "string", "description": "a JSON object"}, "deadline_s": {"type": "number"}}}},
}}}


def caller(request: Request) -> Tenant:
    """The tenant the guard found for this request's bearer token."""
    tenant = tenant_of(request.scope)
    if tenant is None:  # the guard answers 401 first; this is a route mounted outside /v1
        raise HTTPException(401, "a valid 'Authorization: Bearer <token>' header is required",
                            headers={"WWW-Authenticate": "Bearer"})
    return tenant


def owned(gateway: Gateway, job_id: str, tenant: Tenant) -> Job:
    """The tenant's job `job_id`; JobNotFound for an unknown id and for another tenant's job alike."""
    return belongs(gateway.client.get(job_id), tenant)


def belongs(job: Job, tenant: Tenant) -> Job:
    if job.tenant != tenant.name:
        raise JobNotFound(job.id)
    return job


def public_styles(gateway: Gateway) -> list[dict[str, Any]]:
    """The styles as callers see them: no weight paths, no worker ids, only what they can use."""
    styles = []
    for entry in gateway.client.styles():
        runtimes = sorted({f"{info.get('runtime')}/{info.get('precision')}" for info in entry["workers"].values()
                           if info.get("runtime")})
        styles.append({"name": entry["name"], "description": entry["description"], "output": entry["output"],
                       "max_side": entry["max_side"], "model": entry["model"], "runtimes": runtimes})
    return styles


def router(gateway: Gateway) -> APIRouter:
    api = APIRouter()
    client = gateway.client

    @api.post("/v1/jobs", status_code=202, openapi_extra=_SUBMIT_OPENAPI)
    async def submit(request: Request, tenant: Tenant = Depends(caller)) -> dict[str, Any]:
        """Create one job from JSON (`Client.submit`), or from a photo sent as `multipart/form-data`
        in field `image` with the same fields; 202 with the job's record."""
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            from stylequeue.producer.gateway.uploads import submit_photo

            job = await submit_photo(gateway, request, tenant)
        else:
            try:
                body = SubmitBody.model_validate_json(await request.body())
            except ValidationError as exc:
                raise RequestValidationError(exc.errors(include_url=False)) from None
            job = (await run_in_threadpool(submit_jobs, gateway, tenant, [body]))[0]
        return client.to_json(job)

    @api.post("/v1/jobs:batch", status_code=202)
    def submit_batch(body: BatchBody, tenant: Tenant = Depends(caller)) -> dict[str, Any]:
        """Create up to 1,000 jobs; each is checked before any is created, so a bad one creates none."""
        return {"jobs": [client.to_json(job) for job in submit_jobs(gateway, tenant, body.jobs)]}

    @api.get("/v1/jobs")
    def list_jobs(state: JobState | None = None, limit: int = Query(20, ge=1, le=MAX_PAGE),
                  cursor: str | None = Query(None, max_length=200),
                  tenant: Tenant = Depends(caller)) -> dict[str, Any]:
        """The caller's own jobs, newest first; pass `next_cursor` back as `cursor` for the next page."""
        page = gateway.tenants.page(tenant.name, limit=limit, cursor=cursor, state=state)
        return {"jobs": [client.to_json(job) for job in page.jobs], "next_cursor": page.cursor}

    @api.get("/v1/jobs/{job_id}")
    async def get(job_id: str, wait: float | None = Query(None, gt=0, le=MAX_WAIT_S),
                  tenant: Tenant = Depends(caller)) -> JSONResponse:
        """The job's record. With `wait=S` (0 < S <= 30) the answer comes as soon as the job is finished, or
        after S seconds with the record as it is then."""
        read = partial(owned, gateway, job_id, tenant)
        if wait:
            job = await gateway.watcher.wait(job_id, wait, read, partial(belongs, tenant=tenant))
        else:
            job = await run_in_threadpool(read)
        return JSONResponse(client.to_json(job))  # already plain JSON types: no encoder pass needed

    @api.get("/v1/jobs/{job_id}/output", response_class=Response)
    def output(job_id: str, tenant: Tenant = Depends(caller)) -> Response:
        """The result's bytes, for callers that cannot open `output_url` (file:// storage has none)."""
        job = owned(gateway, job_id, tenant)
        if job.state != JobState.SUCCEEDED:
            raise HTTPException(409, f"job {job_id} is {job.state}: only a succeeded job has an output")
        data = gateway.storage.read_output(job.output_uri)
        extension = job.output_uri.rsplit(".", 1)[-1].lower()
        return Response(data, media_type=_MEDIA_TYPES.get(extension, "application/octet-stream"),
                        headers={"Cache-Control": "private, max-age=300"})

    @api.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, tenant: Tenant = Depends(caller)) -> dict[str, Any]:
        """Cancel a queued or running job; a finished job is returned unchanged."""
        owned(gateway, job_id, tenant)
        return client.to_json(client.cancel(job_id))

    @api.get("/v1/styles")
    def styles(_: Tenant = Depends(caller)) -> dict[str, Any]:
        """The registered styles: name, description, output format, size, model label, runtimes in use."""
        return {"styles": public_styles(gateway)}

    @api.get("/healthz")
    def healthz() -> JSONResponse:
        """200 when the job store answers, else 503; it says nothing else (no token needed)."""
        try:
            client.store.ping()
        except StyleQueueError as exc:
            log.warning("health check: %s", exc)
            return JSONResponse({"ok": False}, status_code=503)
        return JSONResponse({"ok": True})

    @api.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(gateway.registry), media_type="text/plain; version=0.0.4")

    return api
