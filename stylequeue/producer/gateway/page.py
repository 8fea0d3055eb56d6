"""`GET /`: a page to try a style from a phone or a browser (page.html: plain HTML and JavaScript, no build step).

The page asks for a token and keeps it in sessionStorage only; it uploads the photo through
`POST /v1/uploads` (falling back to a multipart `POST /v1/jobs` where uploads are not in an object store),
waits with long polls, and shows before and after side by side. It is static: the token, not the page,
decides what a visitor may do.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

if TYPE_CHECKING:
    from stylequeue.producer.gateway.app import Gateway

# The page runs only its own inline script and styles (allowed by hash), talks to this origin and, for
# uploads and results, to object stores over http(s).
_CSP = ("default-src 'none'; script-src {script}; style-src {style}; img-src 'self' blob: data: https: http:; "
        "connect-src 'self' https: http:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@cache
def page() -> tuple[str, str]:
    """(the page, its Content-Security-Policy)."""
    html = files("stylequeue.producer.gateway").joinpath("page.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.DOTALL)
    style = re.search(r"<style>(.*?)</style>", html, re.DOTALL)
    assert script is not None and style is not None
    return html, _CSP.format(script=_digest(script.group(1)), style=_digest(style.group(1)))


def router(_: Gateway) -> APIRouter:
    api = APIRouter()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        html, csp = page()
        return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache",
                                           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    return api
