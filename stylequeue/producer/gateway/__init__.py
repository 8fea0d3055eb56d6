"""The HTTP gateway (docs/http.md): the job API for callers that do not speak Redis, and a page to try it.

`stylequeue api` serves `make_app` with uvicorn. The package, by concept:

    app.py       make_app: the pieces wired together; errors as `{"error": {"code", "message"}}`
    guard.py     before any body is read: the bearer token, the body size cap, the tenant's rate
    tenancy.py   a tenant's submit: URIs within its prefixes, default outputs, max_in_flight
    routes.py    the job routes, /v1/styles, /healthz, /metrics
    uploads.py   POST /v1/uploads (presigned POST) and the multipart submit of a photo
    longpoll.py  GET /v1/jobs/{id}?wait=S: one subscriber per process, waiting requests as futures
    page.py      GET /: page.html, plain HTML and JavaScript

Callers are the tenants of STYLEQUEUE_API_TENANTS (config/tenants.py) and, unscoped, the tokens of
STYLEQUEUE_API_TOKENS. Light: no Paddle, no model, nothing from the worker package.
"""

from stylequeue.config.tenants import token_id
from stylequeue.producer.gateway.app import make_app

__all__ = ["make_app", "token_id"]
