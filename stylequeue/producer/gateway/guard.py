"""What every request meets before FastAPI reads a byte of its body: the token, the size cap, the tenant's rate.

A pure ASGI middleware, outermost, so nothing it refuses is ever read (issue 14.4: three parallel 204 MB
unauthenticated bodies grew a gateway to 1.5 GB before each got its 401):

1. `/v1/...` needs `Authorization: Bearer <token>` of a known tenant, else 401 at once.
2. A declared `Content-Length` over the route's cap is 413 at once; a chunked body is counted as it
   streams and cut off (413) once past the cap, so at most the cap is ever buffered.
3. The tenant's per-minute window of requests and body bytes (jobs/tenants.py, shared by every gateway
   process through Redis) must have room, else 429 with Retry-After.

Caps: a multipart submit may carry one photo (STYLEQUEUE_MAX_INPUT_BYTES) plus its form fields; any other
body is JSON and at most MAX_JSON_BODY_BYTES. The caller's Tenant is left in the ASGI scope for the routes.
Responses are counted per route and status here too (Prometheus).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from stylequeue.errors import StyleQueueError

if TYPE_CHECKING:
    from stylequeue.config.tenants import Tenant
    from stylequeue.producer.gateway.app import Gateway

log = logging.getLogger("stylequeue.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TENANT_SCOPE_KEY = "stylequeue.tenant"
# A 1,000-job batch of ordinary submits is about 300 KB; this leaves room for long URIs and metadata.
MAX_JSON_BODY_BYTES = 4 * 1024 * 1024
# A multipart submit's form fields (metadata is at most 16 KB of JSON) and boundaries beside the photo.
FORM_OVERHEAD_BYTES = 64 * 1024


class BodyTooLarge(HTTPException):
    """A body that streamed past its cap: FastAPI re-raises it from the body read, and it answers 413."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, f"the request body is larger than {cap} bytes")


def tenant_of(scope: Scope) -> Tenant | None:
    return scope.get(TENANT_SCOPE_KEY)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def body_cap(scope: Scope, max_input_bytes: int) -> int:
    """The largest body this request may have."""
    content_type = (_header(scope, b"content-type") or "").lower()
    if scope.get("method") == "POST" and scope.get("path") == "/v1/jobs" and content_type.startswith(
            "multipart/form-data"):
        return max_input_bytes + FORM_OVERHEAD_BYTES
    return MAX_JSON_BODY_BYTES


async def _answer(send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]  # the unread body stays unread: this connection is done
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send)
        finally:
            route = scope.get("route")
            self.gateway.count_request(getattr(route, "path", "unmatched"), status[0] or 500)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        tenant = None
        if scope["path"].startswith("/v1/") or scope["path"] == "/v1":
            tenant = self.gateway.book.find(_bearer(scope))
            if tenant is None:
                await _answer(send, 401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required",
                              {"WWW-Authenticate": "Bearer"})
                return
            scope[TENANT_SCOPE_KEY] = tenant
        cap = body_cap(scope, self.gateway.settings.max_input_bytes)
        declared = _header(scope, b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and length is None:
            await _answer(send, 400, "invalid_request", "Content-Length is not a number")
            return
        if length is not None and length > cap:
            await _answer(send, 413, "too_large", f"the request body is {length} bytes; at most {cap} are accepted")
            return
        if tenant is not None and not await self._charge(tenant, length or 0, send):
            return
        await self.app(scope, self._capped(receive, cap, tenant, chunked=length is None), send)

    async def _charge(self, tenant: Tenant, length: int, send: Send) -> bool:
        """Count the request in the tenant's window; False after answering 413/429/503 when it does not fit."""
        if length > tenant.bytes_per_minute:
            await _answer(send, 413, "too_large", f"the request body is {length} bytes, more than this token may "
                                                  f"send in a minute ({tenant.bytes_per_minute})")
            return False
        try:
            charge = await run_in_threadpool(
                self.gateway.tenants.charge, tenant.name, requests=1, body_bytes=length,
                max_requests=tenant.requests_per_minute, max_bytes=tenant.bytes_per_minute)
        except StyleQueueError as exc:
            log.warning("rate limit check failed: %s", exc)
            await _answer(send, 503, "unavailable", "the job store is unavailable; try again shortly",
                          {"Retry-After": "5"})
            return False
        if not charge.ok:
            await _answer(send, 429, "rate_limited", "this token sent too many requests or bytes this minute; "
                                                     "retry after the Retry-After seconds",
                          {"Retry-After": str(max(1, math.ceil(charge.retry_after_s)))})
            return False
        return True

    def _capped(self, receive: Receive, cap: int, tenant: Tenant | None, *, chunked: bool) -> Receive:
        """`receive` that raises BodyTooLarge once more than `cap` body bytes came; a chunked body's bytes are
        charged to the tenant's window when it ends."""
        seen = [0]

        async def capped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > cap:
                    raise BodyTooLarge(cap)
                if chunked and tenant is not None and seen[0] and not message.get("more_body", False):
                    await self._charge_read(tenant, seen[0])
            return message

        return capped

    async def _charge_read(self, tenant: Tenant, body_bytes: int) -> None:
        try:
            await run_in_threadpool(self.gateway.tenants.charge, tenant.name, requests=0, body_bytes=body_bytes,
                                    max_requests=tenant.requests_per_minute, max_bytes=tenant.bytes_per_minute,
                                    force=True)
        except StyleQueueError as exc:  # the request itself will meet the outage and say so
            log.warning("could not count %d body bytes: %s", body_bytes, exc)


def _bearer(scope: Scope) -> str:
    scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
