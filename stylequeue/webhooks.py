"""Webhooks as the Standard Webhooks spec has them: signing, verifying, and one delivery attempt.

Receivers call `verify_webhook(secret, headers, body)` (exported as `stylequeue.verify_webhook`); the
worker's callback task calls `webhook_headers`, `deliver` and `next_delay`. Stdlib only (plus the network
guard, itself stdlib), so a receiver importing this pays for no boto3, Celery or Paddle.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import http.client
import random
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stylequeue.errors import ConfigError, InputForbidden, StyleQueueError
from stylequeue.pipeline.storage import netguard
from stylequeue.pipeline.storage.uris import redact_uri

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
DEFAULT_TIMEOUT_S = 15.0
BACKOFF_S = (5, 30, 120, 600, 1800)
JITTER = 0.1
MAX_RETRY_AFTER_S = 3600.0
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"


class WebhookVerificationError(StyleQueueError):
    """A webhook's signature is missing or wrong, or its timestamp is too far from now."""


def _secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("a webhook secret must be 'whsec_' followed by base64 (STYLEQUEUE_WEBHOOK_SECRET)") from None


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">`, keyed by the secret's decoded bytes."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def webhook_headers(secret: str | Sequence[str] | None, msg_id: str, body: bytes,
                    now: float | None = None) -> dict[str, str]:
    """The webhook-id/-timestamp/-signature headers; no signature when `secret` is None.

    Several secrets (while rotating) give several space-separated signatures.
    """
    timestamp = int(time.time() if now is None else now)
    headers = {HEADER_ID: msg_id, HEADER_TIMESTAMP: str(timestamp)}
    if secret is not None:
        secrets = [secret] if isinstance(secret, str) else list(secret)
        headers[HEADER_SIGNATURE] = " ".join(sign(one, msg_id, timestamp, body) for one in secrets)
    return headers


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str, *,
                   tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> None:
    """Check a received webhook; raise WebhookVerificationError unless it is authentic and fresh.

    `headers` may use any letter case; any one of several space-separated signatures may match.
    """
    lowered = {str(name).lower(): str(value) for name, value in headers.items()}
    msg_id = lowered.get(HEADER_ID)
    stamp = lowered.get(HEADER_TIMESTAMP)
    signatures = lowered.get(HEADER_SIGNATURE)
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not unix seconds") from None
    skew = (time.time() if now is None else now) - timestamp
    if abs(skew) > tolerance_s:
        direction = "old" if skew > 0 else "far in the future"
        raise WebhookVerificationError(f"webhook-timestamp is {abs(skew):.0f} s {direction} (limit {tolerance_s} s)")
    payload = body.encode() if isinstance(body, str) else body
    expected = sign(secret, msg_id, timestamp, payload).encode()
    matched = False
    for candidate in signatures.split():
        # Every candidate is compared, in constant time, so timing reveals nothing of which one matched.
        matched |= hmac.compare_digest(expected, candidate.encode())
    if not matched:
        raise WebhookVerificationError("no webhook-signature matches this body and secret")


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one POST: `ok` on 2xx; `permanent` failures (410, refused URL) are never retried."""

    ok: bool
    status: int | None
    permanent: bool = False
    retry_after_s: float | None = None
    error: str | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def deliver(url: str, body: bytes, headers: Mapping[str, str], *, allow_private: bool,
            timeout_s: float = DEFAULT_TIMEOUT_S, connect_timeout_s: float | None = None,
            ssl_context: ssl.SSLContext | None = None) -> DeliveryResult:
    """POST `body` (JSON) to `url` once, through the network guard, never following a redirect.

    `connect_timeout_s` (default: a third of `timeout_s`, at most 5 s) is kept well under the read timeout,
    so a receiver host that does not answer at all costs seconds, not the whole attempt.
    """
    sent = {name: value for name, value in headers.items() if name.lower() != "content-type"}
    sent["Content-Type"] = "application/json"
    try:
        with netguard.request("POST", url, allow_private=allow_private, headers=sent, body=body, max_redirects=0,
                              connect_timeout_s=connect_timeout_s or min(5.0, timeout_s / 3), read_timeout_s=timeout_s,
                              total_timeout_s=timeout_s, ssl_context=ssl_context) as response:
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            location = response.headers.get("Location")
    except InputForbidden as exc:
        return DeliveryResult(ok=False, status=None, permanent=True, error=f"callback URL refused: {exc}")
    except TimeoutError:
        return DeliveryResult(ok=False, status=None, error=f"no answer within {timeout_s} s")
    except ssl.SSLCertVerificationError as exc:
        return DeliveryResult(ok=False, status=None, error=f"TLS certificate not trusted: {exc.verify_message}")
    except socket.gaierror as exc:
        return DeliveryResult(ok=False, status=None, error=f"cannot resolve the callback host: {exc}")
    except (OSError, http.client.HTTPException) as exc:
        return DeliveryResult(ok=False, status=None, error=f"{type(exc).__name__}: {exc}")
    if 200 <= status < 300:
        return DeliveryResult(ok=True, status=status)
    if 300 <= status < 400:
        return DeliveryResult(ok=False, status=status,
                              error=f"answered {status} redirect to {redact_uri(location or '')!r}; callbacks do not "
                                    "follow redirects")
    if status == 410:
        return DeliveryResult(ok=False, status=status, permanent=True, error="answered 410 Gone: retries stopped")
    honoured = retry_after if status in (429, 503) else None
    return DeliveryResult(ok=False, status=status, retry_after_s=honoured, error=f"answered {status}")


def next_delay(attempt: int, retry_after_s: float | None = None) -> float | None:
    """Seconds to wait after failed attempt number `attempt` (1-based), or None to give up.

    A receiver's Retry-After replaces the schedule's delay (capped at an hour); either gets a little jitter.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if attempt > len(BACKOFF_S):
        return None
    base = min(retry_after_s, MAX_RETRY_AFTER_S) if retry_after_s is not None else float(BACKOFF_S[attempt - 1])
    # Jitter spreads the retries of many callbacks that failed together (a receiver's outage).
    return base * (1.0 + random.uniform(0.0 if retry_after_s is not None else -JITTER, JITTER))
