"""A tenant's submit: its URIs confined to its prefixes, its defaults, its `max_in_flight`, all before any job exists.

`submit_jobs` is the one way the gateway creates jobs (single, batch, multipart): every body is scoped and
checked first (403 `input_forbidden` for a URI outside the tenant's prefixes or a callback host it may not
name, 400 for what `Client` refuses), then room is reserved for all of them in the tenant's in-flight set
(429 when full), then they are created. A batch is all-or-nothing up to the broker: a broker that fails
midway leaves the jobs created before it (each a whole job), as `Client.submit` does one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stylequeue.errors import InputForbidden, StyleQueueError, UnknownStyle
from stylequeue.jobs import Job
from stylequeue.pipeline.storage.scope import confine, url_host

if TYPE_CHECKING:
    from stylequeue.config.tenants import Tenant
    from stylequeue.producer.gateway.app import Gateway

MAX_BATCH_JOBS = 1000
# A full tenant is told to come back after this long: jobs finish in seconds, not minutes.
IN_FLIGHT_RETRY_AFTER_S = 2


class SubmitBody(BaseModel):
    """The arguments of `Client.submit` (docs/python.md)."""

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


class TooManyInFlight(StyleQueueError):
    """The tenant has `max_in_flight` jobs queued or running (HTTP 429)."""

    retry_after_s = IN_FLIGHT_RETRY_AFTER_S


@dataclass(frozen=True)
class Scoped:
    """A submit body after the tenant's rules: the keyword arguments of `Client.submit`."""

    kwargs: dict[str, Any]


def scope_submit(tenant: Tenant, body: SubmitBody) -> Scoped:
    """The body's submit arguments under `tenant`'s rules; InputForbidden for anything outside its scope."""
    kwargs: dict[str, Any] = {
        "input_uri": body.input_uri, "style": body.style, "callback_url": body.callback_url,
        "output_uri": body.output_uri, "priority": body.priority, "metadata": body.metadata,
        "deadline_s": body.deadline_s, "tenant": tenant.name,
        "idempotency_key": f"{tenant.name}:{body.idempotency_key}" if body.idempotency_key else None,
    }
    if not tenant.scoped:
        return Scoped(kwargs)
    kwargs["input_uri"] = confine(body.input_uri, tenant.inputs, "input_uri")
    if body.output_uri is not None:
        assert tenant.outputs is not None
        kwargs["output_uri"] = confine(body.output_uri, (tenant.outputs,), "output_uri")
    else:
        kwargs["output_prefix"] = f"{tenant.outputs}{body.style}/"
    if body.callback_url is not None and tenant.callback_hosts is not None:
        host = url_host(body.callback_url)
        if host not in tenant.callback_hosts:
            raise InputForbidden(f"callback_url host {host!r} is not one this token may name (callback_hosts)")
    return Scoped(kwargs)


def _check(gateway: Gateway, scoped: Scoped) -> None:
    args = dict(scoped.kwargs)
    for name in ("tenant", "idempotency_key", "output_prefix"):
        args.pop(name, None)
    try:
        gateway.client.check_submit(**args)
    except UnknownStyle:  # the catalog's own message names the registry files: server paths, not for callers
        known = ", ".join(sorted(gateway.client.catalog.all())) or "none"
        raise UnknownStyle(f"unknown style {args['style']!r}; registered styles: {known}") from None


def submit_jobs(gateway: Gateway, tenant: Tenant, bodies: list[SubmitBody],
                before_create: Any = None) -> list[Job]:
    """Scope, check, admit and create the jobs of `bodies` (see the module docstring).

    `before_create()`, when given, runs once everything is checked and room is reserved: a multipart submit
    stores its photo there, so nothing is written for a submit that would be refused.
    """
    scoped = [scope_submit(tenant, body) for body in bodies]
    for item in scoped:
        _check(gateway, item)
    reservation = None
    if tenant.max_in_flight is not None:
        reservation = gateway.tenants.admit(tenant.name, len(scoped), tenant.max_in_flight)
        if reservation is None:
            raise TooManyInFlight(f"this token has {tenant.max_in_flight} jobs queued or running, its "
                                  "max_in_flight; retry when some have finished")
    created: list[str] = []
    try:
        if before_create is not None:
            before_create()
        jobs = []
        for item in scoped:
            job = gateway.client.submit(**item.kwargs)
            created.append(job.id)
            jobs.append(job)
        return jobs
    finally:
        if reservation is not None:
            gateway.tenants.settle(tenant.name, reservation, len(scoped), created)
