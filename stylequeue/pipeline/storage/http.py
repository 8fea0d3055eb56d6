"""`http(s)://` inputs: read-only, through the network guard, at most STYLEQUEUE_MAX_INPUT_BYTES.

Failures: InputForbidden (a refused address or redirect, 401/403), InputNotFound (an unknown host,
other 4xx), InputTooLarge, StorageError(transient=True) for 5xx, 408/425/429, timeouts and
connection errors, StorageError(transient=False) for an untrusted TLS certificate.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from stylequeue.errors import InputForbidden, InputNotFound, StorageError, StyleQueueError
from stylequeue.pipeline.storage import netguard
from stylequeue.pipeline.storage.uris import redact_uri

if TYPE_CHECKING:
    from stylequeue.config.settings import Settings

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0


def check_uri(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) what the worker would refuse without DNS: shape and literal private hosts."""
    netguard.check_literal_url(uri, allow_private=settings.allow_private_networks)


class HttpReader:
    """Reads http(s) inputs; `ssl_context` verifies https (default: the system's trust store)."""

    def __init__(self, settings: Settings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self._ssl_context = ssl_context

    def read(self, uri: str) -> bytes:
        shown = redact_uri(uri)  # presigned URLs carry their signature in the query
        try:
            with netguard.request(
                "GET", uri, allow_private=self.settings.allow_private_networks,
                headers={"Accept-Encoding": "identity"}, max_redirects=netguard.MAX_REDIRECTS,
                connect_timeout_s=CONNECT_TIMEOUT_S, read_timeout_s=READ_TIMEOUT_S,
                total_timeout_s=self.settings.job_timeout_s, ssl_context=self._ssl_context,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return response.read_all(self.settings.max_input_bytes)
        except UnicodeError as exc:  # the IDNA codec, should a host name get past netguard's own check
            raise InputForbidden(f"{shown}: the host name cannot be encoded for DNS ({exc})") from None
        except ssl.SSLCertVerificationError as exc:
            raise StorageError(f"{shown}: TLS certificate not trusted: {exc.verify_message}", transient=False) from None
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise InputNotFound(f"{shown}: host not found") from None
            raise StorageError(f"{shown}: name resolution failed: {exc}", transient=True) from None
        except TimeoutError as exc:
            raise StorageError(f"{shown}: timed out ({exc})", transient=True) from None
        except (OSError, http.client.HTTPException) as exc:
            raise StorageError(f"{shown}: {type(exc).__name__}: {exc}", transient=True) from None
        text = f"{shown}: the server answered {status}"
        if status in (401, 403):
            raise InputForbidden(text)
        if status in (408, 425, 429) or status >= 500:
            raise StorageError(text, transient=True)
        raise InputNotFound(text)

    def probe(self, uri: str) -> bool:
        """Whether the host of `uri` answers at all: any answer but a 5xx to a HEAD of its root."""
        parts = urlsplit(uri)
        try:
            with netguard.request(
                "HEAD", f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/",
                allow_private=self.settings.allow_private_networks, headers={}, max_redirects=0,
                connect_timeout_s=CONNECT_TIMEOUT_S, read_timeout_s=CONNECT_TIMEOUT_S,
                total_timeout_s=2 * CONNECT_TIMEOUT_S, ssl_context=self._ssl_context,
            ) as response:
                return response.status < 500
        except (OSError, ValueError, http.client.HTTPException, StyleQueueError):
            return False
