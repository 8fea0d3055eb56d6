"""A stand-in for what S3 checks of a browser POST (POST Object with a SigV4 policy), in front of moto.

moto stores whatever is POSTed to a bucket and checks no policy, so the tests put this gate before it: it
does what AWS documents for POST Object ("Creating a POST policy", "Authenticating requests in browser-based
uploads using POST"): the SigV4 signature over the base64 policy, the expiration, every condition
(`{"field": value}` and `["eq", ...]` exact, `["starts-with", ...]`, `["content-length-range", min, max]`),
and that every form field but policy, x-amz-signature, file and x-ignore-* is named by a condition. What
passes is forwarded to moto unchanged; what fails gets S3's 403 AccessDenied or 400 EntityTooLarge/Small.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import hmac
import http.client
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from tests.workers import serve_http


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def parse_form(content_type: str, body: bytes) -> tuple[dict[str, str], bytes | None]:
    """(text fields by lower-case name, the file's bytes) of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, str] = {}
    data = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file":
            data = payload
        else:
            fields[str(name).lower()] = payload.decode()
    return fields, data


def _signing_key(secret: str, date: str, region: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def check_post(bucket: str, fields: dict[str, str], data: bytes | None, secret: str) -> None:
    """Raise Refused unless S3 would accept this POST Object form."""
    if data is None:
        raise Refused(400, "InvalidArgument", "POST requires exactly one file upload per request")
    credential = fields.get("x-amz-credential", "").split("/")
    if len(credential) != 5 or fields.get("x-amz-algorithm") != "AWS4-HMAC-SHA256":
        raise Refused(403, "AccessDenied", "missing or malformed x-amz-credential / x-amz-algorithm")
    expected = hmac.new(_signing_key(secret, credential[1], credential[2]), fields.get("policy", "").encode(),
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, fields.get("x-amz-signature", "")):
        raise Refused(403, "SignatureDoesNotMatch", "the policy's signature does not match")
    policy = json.loads(base64.b64decode(fields["policy"]))
    if datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00")).timestamp() < time.time():
        raise Refused(403, "AccessDenied", "Invalid according to Policy: Policy expired.")
    values = {**fields, "bucket": bucket}
    named = {"bucket"}
    for condition in policy["conditions"]:
        if isinstance(condition, dict):
            [(name, value)] = condition.items()
            condition = ["eq", f"${name}", value]
        operator, subject, *rest = condition
        if operator == "content-length-range":
            low, high = subject, rest[0]
            if len(data) > high:
                raise Refused(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
            if len(data) < low:
                raise Refused(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size")
            continue
        name = subject.removeprefix("$").lower()
        named.add(name)
        value = values.get(name, "")
        if (operator == "eq" and value != rest[0]) or (operator == "starts-with" and not value.startswith(rest[0])):
            raise Refused(403, "AccessDenied", f"Invalid according to Policy: Policy Condition failed: {condition}")
    unnamed = set(fields) - named - {"policy", "x-amz-signature"}
    unnamed = {name for name in unnamed if not name.startswith("x-ignore-")}
    if unnamed:
        raise Refused(403, "AccessDenied", f"Invalid according to Policy: Extra input fields: {sorted(unnamed)}")


@contextmanager
def post_policy_gate(moto_url: str, secret: str = "testing") -> Iterator[str]:
    """A gate on a free loopback port that checks POST Object forms and forwards them to `moto_url`."""
    upstream = urlsplit(moto_url)

    class Handler(BaseHTTPRequestHandler):
        def _forward(self, body: bytes | None) -> None:
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            connection.request(self.command, self.path, body=body, headers=headers)
            answer = connection.getresponse()
            payload = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            connection.close()

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            bucket = self.path.strip("/").split("?", 1)[0]
            try:
                fields, data = parse_form(self.headers.get("Content-Type", ""), body)
                check_post(bucket, fields, data, secret)
            except Refused as refused:
                xml = f"<Error><Code>{refused.code}</Code><Message>{refused}</Message></Error>".encode()
                self.send_response(refused.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()
                self.wfile.write(xml)
                return
            self._forward(body)

        def do_GET(self) -> None:  # noqa: N802
            self._forward(None)

        def do_OPTIONS(self) -> None:  # noqa: N802
            self._forward(None)

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler) as url:
        yield url
