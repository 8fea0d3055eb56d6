"""Standard Webhooks signing and verification, and one delivery attempt against a local receiver."""

from __future__ import annotations

import email.utils
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stylequeue.errors import ConfigError
from stylequeue.webhooks import (
    BACKOFF_S,
    WebhookVerificationError,
    deliver,
    next_delay,
    sign,
    verify_webhook,
    webhook_headers,
)
from tests.workers import serve_http

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_c3R5bGVxdWV1ZS1yb3RhdGVkLXNlY3JldC0wMDE="
BODY = json.dumps({"id": "j_1", "state": "succeeded"}).encode()


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The vector published with the Standard Webhooks specification: any receiver library accepts us.
    body = b'{"test": 2432232314}'
    signature = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": signature}
    verify_webhook(SECRET, headers, body, now=1614265330)


def test_round_trip_with_any_header_case() -> None:
    headers = webhook_headers(SECRET, "j_1.succeeded", BODY)
    verify_webhook(SECRET, headers, BODY)
    verify_webhook(SECRET, {name.title(): value for name, value in headers.items()}, BODY.decode())


def test_tampered_body_wrong_secret_and_missing_signature_are_rejected() -> None:
    headers = webhook_headers(SECRET, "j_1.succeeded", BODY)
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify_webhook(SECRET, headers, BODY.replace(b"succeeded", b"failed"))
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify_webhook(OTHER_SECRET, headers, BODY)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify_webhook(SECRET, webhook_headers(None, "j_1.succeeded", BODY), BODY)
    forged = headers | {"webhook-id": "j_2.succeeded"}  # a signature does not carry over to another message
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, forged, BODY)


def test_unsigned_headers_when_there_is_no_secret() -> None:
    headers = webhook_headers(None, "j_1.succeeded", BODY, now=1000)
    assert headers == {"webhook-id": "j_1.succeeded", "webhook-timestamp": "1000"}


def test_rotated_secrets_either_one_verifies() -> None:
    headers = webhook_headers([SECRET, OTHER_SECRET], "j_1.succeeded", BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    verify_webhook(SECRET, headers, BODY)
    verify_webhook(OTHER_SECRET, headers, BODY)
    with pytest.raises(WebhookVerificationError):
        verify_webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQQ==", headers, BODY)


def test_stale_and_future_timestamps_are_rejected() -> None:
    headers = webhook_headers(SECRET, "j_1.succeeded", BODY, now=10_000)
    verify_webhook(SECRET, headers, BODY, now=10_000 + 299)
    with pytest.raises(WebhookVerificationError, match="old"):
        verify_webhook(SECRET, headers, BODY, now=10_000 + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify_webhook(SECRET, headers, BODY, now=10_000 - 301)


def test_a_secret_that_is_not_base64_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="whsec_"):
        webhook_headers("whsec_not base64!", "j_1", BODY)


# --- one delivery attempt ------------------------------------------------------------------------


class _Receiver(http.server.BaseHTTPRequestHandler):
    """POST /status/N answers N; /moved redirects to /status/200; /busy and /busy-date ask to retry later."""

    received: list[tuple[str, dict[str, str], bytes]] = []
    release = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.received.append((self.path, dict(self.headers.items()), body))
        headers: dict[str, str] = {}
        if self.path == "/slow":
            self.release.wait(10)
            status = 200
        elif self.path == "/moved":
            status, headers = 302, {"Location": "/status/200"}
        elif self.path == "/busy":
            status, headers = 429, {"Retry-After": "7"}
        elif self.path == "/busy-date":
            status, headers = 503, {"Retry-After": email.utils.formatdate(time.time() + 60, usegmt=True)}
        else:
            status = int(self.path.rsplit("/", 1)[1])
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # /slow: the sender gave up first, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    with serve_http(_Receiver) as url:
        yield url
        _Receiver.release.set()


def post(url: str, **kwargs: Any) -> Any:
    return deliver(url, BODY, webhook_headers(SECRET, "j_1.succeeded", BODY), allow_private=True, **kwargs)


def test_delivered_on_200_with_a_verifiable_signature(receiver: str) -> None:
    result = post(f"{receiver}/status/200")
    assert result.ok and result.status == 200 and result.error is None
    path, headers, body = _Receiver.received[-1]
    assert path == "/status/200" and body == BODY
    assert headers["Content-Type"] == "application/json"
    verify_webhook(SECRET, headers, body)


def test_500_is_retryable(receiver: str) -> None:
    result = post(f"{receiver}/status/500")
    assert (result.ok, result.status, result.permanent) == (False, 500, False)


def test_410_gone_is_permanent(receiver: str) -> None:
    result = post(f"{receiver}/status/410")
    assert (result.ok, result.status, result.permanent) == (False, 410, True)


def test_redirect_is_a_failure_and_not_followed(receiver: str) -> None:
    before = len(_Receiver.received)
    result = post(f"{receiver}/moved")
    assert (result.ok, result.status, result.permanent) == (False, 302, False)
    assert "redirect" in (result.error or "")
    assert [path for path, _, _ in _Receiver.received[before:]] == ["/moved"]


def test_retry_after_is_read_in_seconds_and_as_a_date(receiver: str) -> None:
    result = post(f"{receiver}/busy")
    assert (result.ok, result.status, result.retry_after_s) == (False, 429, 7.0)
    dated = post(f"{receiver}/busy-date")
    assert dated.status == 503 and dated.retry_after_s is not None and 50 <= dated.retry_after_s <= 61
    assert post(f"{receiver}/status/500").retry_after_s is None


def test_a_receiver_that_does_not_answer_in_time_is_retryable(receiver: str) -> None:
    result = post(f"{receiver}/slow", timeout_s=0.5)
    assert (result.ok, result.status, result.permanent) == (False, None, False)
    assert "no answer" in (result.error or "")


def test_refused_url_is_a_permanent_failure_without_traffic() -> None:
    # A 64-character label once raised UnicodeError out of deliver, leaving the callback pending forever.
    for url in ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:1/hook", "ftp://example.com/x",
                f"https://{'a' * 64}.example.com/hook"]:
        result = deliver(url, BODY, {}, allow_private=False)
        assert (result.ok, result.status, result.permanent) == (False, None, True)
        assert "refused" in (result.error or "")


def test_nobody_listening_is_retryable() -> None:
    from stylequeue.embedded import free_port

    result = deliver(f"http://127.0.0.1:{free_port()}/hook", BODY, {}, allow_private=True)
    assert (result.ok, result.permanent) == (False, False)


def test_backoff_schedule_then_give_up() -> None:
    for attempt, base in enumerate(BACKOFF_S, start=1):
        delay = next_delay(attempt, None)
        assert delay is not None and base * 0.9 <= delay <= base * 1.1
    assert next_delay(len(BACKOFF_S) + 1, None) is None
    honoured = next_delay(1, 7.0)
    assert honoured is not None and 7.0 <= honoured <= 7.7
    capped = next_delay(2, 10 * 86400.0)
    assert capped is not None and capped <= 3600 * 1.1


def test_a_receiver_importing_verify_webhook_loads_no_heavy_package() -> None:
    # The network guard moved into the storage package; importing it must not drag the backends' deps along.
    code = ("import sys; from stylequeue import verify_webhook; "
            "print(','.join(m for m in ('boto3', 'pydantic', 'celery', 'paddle') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
