"""`s3://bucket/key` objects through one boto3 client per process.

Keys are taken literally: `s3://bucket/a b.jpg` names the key `a b.jpg`. Error answers become typed job
errors: 5xx, throttling and timeouts StorageError(transient=True); on reads 404 InputNotFound and 403
InputForbidden; other refusals StorageError(transient=False). boto3 is imported on first use, so
producers that never touch S3 do not pay for it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from stylequeue.errors import InputForbidden, InputNotFound, InputTooLarge, JobError, StorageError
from stylequeue.pipeline.storage.uris import TEMP_SUFFIX, redact_uri, split_uri, staged_base, staged_tail

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

    from stylequeue.config.settings import Settings

log = logging.getLogger("stylequeue.pipeline.storage")

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_FORBIDDEN_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                              "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"})


def parse(uri: str, *, key_required: bool = True) -> tuple[str, str]:
    """(bucket, key) of an `s3://` URI; InputForbidden when the bucket (or a required key) is missing."""
    _scheme, rest = split_uri(uri)
    bucket, _, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise InputForbidden(f"{redact_uri(uri)!r} names no valid bucket: expected s3://bucket/key")
    if key_required and not key:
        raise InputForbidden(f"{redact_uri(uri)!r} names no key: expected s3://bucket/key")
    return bucket, key


def check_uri(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) an `s3://` URI that names no bucket and key; no I/O."""
    parse(uri)


def check_prefix(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) an `s3://` prefix that names no bucket; no I/O."""
    parse(uri, key_required=False)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _client_error(exc: ClientError, uri: str, *, reading: bool) -> JobError:
    """The typed error for an S3 error answer: its status and code, never the store's own text.

    A store's message may name internal hosts or buckets; it goes to this process's log instead.
    """
    code = _error_code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    text = f"S3 answered {status or '?'} {code or 'error'} for {redact_uri(uri)}"
    log.debug("%s: %s", text, exc)
    if code in _TRANSIENT_CODES or status in (408, 429) or status >= 500:
        return StorageError(text, transient=True)
    if reading and (code in _NOT_FOUND_CODES or status == 404):
        return InputNotFound(text)
    if reading and (code in _FORBIDDEN_CODES or status == 403):
        return InputForbidden(text)
    return StorageError(text, transient=False)


def _botocore_error(exc: Exception, uri: str) -> JobError:
    """The typed error for a botocore failure that is not an S3 answer (network, credentials, params).

    botocore's text names the endpoint URL (an internal host, often): callers get the kind of failure,
    this process's log the whole text.
    """
    from botocore.exceptions import NoCredentialsError, ParamValidationError, PartialCredentialsError

    shown = redact_uri(uri)
    log.info("S3 request for %s failed: %s", shown, exc)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"no S3 credentials for {shown}; set them as for any boto3 program", transient=False)
    if isinstance(exc, ParamValidationError):
        return InputForbidden(f"{shown} is not a bucket and key S3 accepts")
    return StorageError(f"S3 did not answer for {shown} ({type(exc).__name__})", transient=True)


@contextmanager
def _s3_errors(uri: str, *, reading: bool) -> Iterator[None]:
    """Turn botocore's exceptions inside the block into typed job errors."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        raise _client_error(exc, uri, reading=reading) from None
    except BotoCoreError as exc:
        raise _botocore_error(exc, uri) from None


class S3Backend:
    """Objects in S3-compatible stores. Thread-safe; holds the process's boto3 clients.

    `max_pool_connections` sizes the connection pool; keep it at least the worker's concurrency.
    """

    def __init__(self, settings: Settings, *, max_pool_connections: int = 32) -> None:
        self.settings = settings
        self._max_pool_connections = max_pool_connections
        self._lock = threading.Lock()
        self._client: Any = None
        self._public_client: Any = None

    # --- clients -----------------------------------------------------------------------------------

    def _make_client(self, endpoint_url: str | None) -> Any:
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            "max_pool_connections": self._max_pool_connections,
            "s3": {"addressing_style": self.settings.s3_addressing_style},
            "signature_version": "s3v4",
        }
        if self.settings.s3_endpoint_url:
            # Many S3-compatible stores reject the CRC headers boto3 >= 1.36 adds by default (docs/deploy.md).
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        # A private session: boto3's default session is not thread-safe.
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint_url, region_name=self.settings.s3_region,
                              config=Config(**options))

    def client(self) -> Any:
        """The process's boto3 S3 client, made on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client(self.settings.s3_endpoint_url)
        return self._client

    def _presign_client(self) -> Any:
        public = self.settings.s3_public_endpoint_url
        if not public or public == self.settings.s3_endpoint_url:
            return self.client()
        if self._public_client is None:
            with self._lock:
                if self._public_client is None:
                    # Signing only: SigV4 covers the Host header, so the URL must be signed for the public host.
                    self._public_client = self._make_client(public)
        return self._public_client

    def close(self) -> None:
        """Close the clients' connection pools (a later call makes new ones)."""
        with self._lock:
            for client in (self._client, self._public_client):
                if client is not None:
                    client.close()
            self._client = self._public_client = None

    # --- objects -----------------------------------------------------------------------------------

    def _too_large(self, uri: str, size: int | None) -> InputTooLarge:
        cap = self.settings.max_input_bytes
        amount = f"{size} bytes" if size is not None else "larger"
        return InputTooLarge(f"{redact_uri(uri)} is {amount}, more than STYLEQUEUE_MAX_INPUT_BYTES={cap}")

    def read(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        bucket, key = parse(uri)
        cap = self.settings.max_input_bytes
        with _s3_errors(uri, reading=True):
            answer = self.client().get_object(Bucket=bucket, Key=key)
        body = answer["Body"]
        try:
            length = answer.get("ContentLength")
            if length is not None and length > cap:
                raise self._too_large(uri, length)
            data: bytes = body.read(cap + 1)
        except (BotoCoreError, OSError) as exc:
            log.info("reading %s from S3 failed: %s", redact_uri(uri), exc)
            raise StorageError(f"reading {redact_uri(uri)} from S3 failed ({type(exc).__name__})",
                               transient=True) from None
        finally:
            body.close()
        if len(data) > cap:
            raise self._too_large(uri, None)
        return data

    def write(self, uri: str, data: bytes, content_type: str, *, sweep: bool = False) -> None:
        # One PUT is atomic: a reader sees the old object or the new one, and a killed writer leaves nothing.
        bucket, key = parse(uri)
        with _s3_errors(uri, reading=False):
            self.client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def stage(self, uri: str, data: bytes, content_type: str, *, tag: str) -> str:
        """PUT `data` as `{key}.{tag}.{random}.sqtmp` with `content_type`; returns that object's URI."""
        bucket, key = parse(uri)
        staged = f"{key}{staged_tail(tag)}"
        with _s3_errors(uri, reading=False):
            self.client().put_object(Bucket=bucket, Key=staged, Body=data, ContentType=content_type)
        return f"s3://{bucket}/{staged}"

    def promote(self, staged_uri: str, uri: str) -> None:
        """Copy a staged object onto `uri` (keeping its ContentType), then delete it; idempotent.

        When the staged object is gone and `uri` exists, an earlier promote finished: nothing to do.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = parse(uri)
        staged_bucket, staged = parse(staged_uri)
        if staged_bucket != bucket or staged_base(staged) != key:
            raise ValueError(f"{redact_uri(staged_uri)} is not a staged copy of {redact_uri(uri)}")
        try:
            # COPY keeps the staged object's metadata, ContentType included: it was PUT with the right one.
            self.client().copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": staged},
                                      MetadataDirective="COPY")
        except ClientError as exc:
            if _error_code(exc) != "NoSuchKey":
                raise _client_error(exc, uri, reading=False) from None
            if not self.exists(uri):
                raise StorageError(f"cannot promote {redact_uri(staged_uri)}: it is gone and {redact_uri(uri)} "
                                   "does not exist", transient=False) from None
            return
        except BotoCoreError as exc:
            raise _botocore_error(exc, uri) from None
        self.discard(staged_uri)

    def discard(self, staged_uri: str) -> None:
        """Delete a staged object; nothing happens when it is already gone."""
        _bucket, staged = parse(staged_uri)
        if staged_base(staged) is None:
            raise ValueError(f"{redact_uri(staged_uri)} is not a staged object")
        self.delete(staged_uri)

    def probe(self, uri: str) -> bool:
        """Whether the store behind `uri` answers at all: any answer but a 5xx (the outage guard's probe)."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _ = parse(uri, key_required=False)
        try:
            self.client().head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return 0 < status < 500
        except BotoCoreError:
            return False
        return True

    def exists(self, uri: str) -> bool:
        bucket, key = parse(uri)
        try:
            with _s3_errors(uri, reading=True):
                self.client().head_object(Bucket=bucket, Key=key)
        except InputNotFound:
            return False
        return True

    def delete(self, uri: str) -> None:
        bucket, key = parse(uri)
        with _s3_errors(uri, reading=False):
            self.client().delete_object(Bucket=bucket, Key=key)

    def presign(self, uri: str, ttl_s: int) -> str | None:
        bucket, key = parse(uri)
        url: str = self._presign_client().generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(ttl_s))
        return url

    def presign_post(self, uri: str, *, max_bytes: int, ttl_s: int, content_type: str) -> dict[str, Any]:
        """A presigned POST (S3's POST Object form, which OSS and COS accept too) that can store only `uri`.

        The policy fixes the bucket and key, allows 1..`max_bytes` bytes and a `Content-Type` starting
        `image/`, and expires after `ttl_s`; it names the public endpoint when one is set. Returns
        {"url", "fields"}: post `fields` then the file (last, in a field named `file`) to `url`.
        """
        bucket, key = parse(uri)
        post = self._presign_client().generate_presigned_post(
            bucket, key, Fields={"Content-Type": content_type},
            # boto3 adds the exact {"bucket"} and {"key"} conditions itself.
            Conditions=[["content-length-range", 1, int(max_bytes)], ["starts-with", "$Content-Type", "image/"]],
            ExpiresIn=int(ttl_s))
        return {"url": post["url"], "fields": dict(post["fields"])}

    def staged_copies(self, uri: str) -> list[str]:
        """The staged objects of `uri` that exist (every attempt's: `{key}.{tag}.{random}.sqtmp`)."""
        bucket, key = parse(uri)
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{key}."}
        found: list[str] = []
        while True:
            with _s3_errors(uri, reading=True):
                page = self.client().list_objects_v2(**request)
            found += [f"s3://{bucket}/{entry['Key']}" for entry in page.get("Contents", [])
                      if staged_base(entry["Key"]) == key]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found
            request["ContinuationToken"] = token

    def list(self, prefix_uri: str, *, page_size: int = 1000) -> Iterator[str]:
        bucket, prefix = parse(prefix_uri, key_required=False)
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        while True:
            with _s3_errors(prefix_uri, reading=True):
                page = self.client().list_objects_v2(**request)
            for entry in page.get("Contents", []):
                # "Folder" placeholder objects are not files; staged copies are not results (yet).
                if not entry["Key"].endswith(("/", TEMP_SUFFIX)):
                    yield f"s3://{bucket}/{entry['Key']}"
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            request["ContinuationToken"] = token
