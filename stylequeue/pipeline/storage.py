"""Bytes by URI: read, write, presign, delete, test and list `file://`, `s3://` and (read-only) `http(s)://`.

URIs are taken literally (no percent-decoding): `s3://bucket/a b.jpg` names the key `a b.jpg`, and what
`Storage.list` yields reads back unchanged. Failures are typed (SPEC section 4):

- reads: InputNotFound, InputForbidden (outside STYLEQUEUE_INPUT_ROOTS, a refused address, S3 403, a
  scheme other than file/s3/http/https), InputTooLarge (over STYLEQUEUE_MAX_INPUT_BYTES, found before the
  body is read where the size is declared), StorageError(transient=True) for 5xx, throttling, timeouts
  and connection errors, StorageError(transient=False) for other refusals.
- writes: InputForbidden when the URI is one we never write (`file://` outside the storage root and the
  input roots, http(s)), StorageError(transient=False) for a store's permanent 4xx or a file permission
  error, StorageError(transient=True) for 5xx, connection errors and other OS errors.
"""

from __future__ import annotations

import functools
import glob
import http.client
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from stylequeue.config.settings import Settings, file_uri_str
from stylequeue.errors import InputForbidden, InputNotFound, InputTooLarge, JobError, StorageError
from stylequeue.pipeline import netguard

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

INPUT_SCHEMES = ("file", "s3", "http", "https")
OUTPUT_SCHEMES = ("file", "s3")
MAX_URI_CHARS = 4096
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 60.0
S3_MAX_ATTEMPTS = 3
HTTP_CONNECT_TIMEOUT_S = 5.0
HTTP_READ_TIMEOUT_S = 30.0
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_FORBIDDEN_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                              "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"})
_TEMP_SUFFIX = ".sqtmp"
_MANAGED = "the storage root and STYLEQUEUE_INPUT_ROOTS"


def _scheme(uri: str) -> tuple[str, str]:
    """(lower-case scheme, the rest after '://'); InputForbidden when there is no scheme."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not _SCHEME_RE.match(scheme):
        raise InputForbidden(f"{uri!r} is not a URI: expected file://, s3://, http:// or https://")
    return scheme.lower(), rest


def _s3_parts(rest: str, uri: str, *, key_required: bool = True) -> tuple[str, str]:
    bucket, _, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise InputForbidden(f"{uri!r} names no valid bucket: expected s3://bucket/key")
    if key_required and not key:
        raise InputForbidden(f"{uri!r} names no key: expected s3://bucket/key")
    return bucket, key


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _check_common(uri: str) -> tuple[str, str]:
    if len(uri) > MAX_URI_CHARS:
        raise InputForbidden(f"URI is {len(uri)} characters long, more than {MAX_URI_CHARS}")
    if _CONTROL_RE.search(uri):
        raise InputForbidden("URI contains control characters")
    return _scheme(uri)


def check_input_uri(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) an input URI a worker would refuse, without any I/O (for producers)."""
    scheme, rest = _check_common(uri)
    if scheme == "file":
        roots = [os.path.abspath(root) for root in settings.input_roots or []]
        if not roots:
            raise InputForbidden(_no_roots_message())
        if not _inside(file_uri_str(uri), roots):
            raise InputForbidden(f"{uri} is outside STYLEQUEUE_INPUT_ROOTS ({', '.join(roots)})")
    elif scheme == "s3":
        _s3_parts(rest, uri)
    elif scheme in ("http", "https"):
        netguard.check_literal_url(uri, allow_private=settings.allow_private_networks)
    else:
        raise InputForbidden(f"URI scheme {scheme!r} is not allowed for inputs: use {', '.join(INPUT_SCHEMES)}")


def check_output_uri(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) an output URI a worker would refuse to write, without any I/O."""
    scheme, rest = _check_common(uri)
    if scheme == "file":
        roots = [os.path.abspath(root) for root in _writable_roots(settings)]
        if not _inside(file_uri_str(uri), roots):
            raise InputForbidden(f"{uri} is outside {_MANAGED}")
    elif scheme == "s3":
        _s3_parts(rest, uri)
    else:
        raise InputForbidden(f"URI scheme {scheme!r} is not allowed for outputs: use {', '.join(OUTPUT_SCHEMES)}")


def check_output_prefix(prefix: str, settings: Settings) -> None:
    """Refuse (InputForbidden) an output prefix under which a worker would refuse to write, without any I/O."""
    check_output_uri(prefix.rstrip("/") + "/x", settings)


def join_uri(prefix: str, *parts: str) -> str:
    """`prefix` and `parts` joined by single slashes: join_uri("s3://b/out/", "ink", "j_1.jpg")."""
    scheme, rest = _scheme(prefix)
    absolute = scheme == "file" and rest.startswith("/")
    base = f"{scheme}://" + ("/" if absolute and not rest.strip("/") else "") + rest.rstrip("/")
    tail = "/".join(part.strip("/") for part in parts if part.strip("/"))
    if not tail:
        return base
    return base + tail if base.endswith("/") else f"{base}/{tail}"


def _no_roots_message() -> str:
    return ("file:// inputs are not allowed: no input roots are set; set STYLEQUEUE_INPUT_ROOTS to the "
            "comma-separated directories inputs may come from")


def _writable_roots(settings: Settings) -> list[str]:
    roots = [str(root) for root in settings.input_roots or []]
    if settings.storage_url.startswith("file://"):
        roots.append(file_uri_str(settings.storage_url))
    return roots


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new, empty, private temp file beside `name` in `directory`: (fd, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        temp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}{_TEMP_SUFFIX}")
        try:
            return os.open(temp, flags, 0o600), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {os.path.join(directory, name)}")


def _read_all(fd: int, size_hint: int, cap: int) -> bytes:
    """Read `fd` to its end, stopping once more than `cap` bytes came (the caller checks the length)."""
    chunks: list[bytes] = []
    total = 0
    want = min(size_hint, cap) + 1  # one read for a file that did not grow since fstat, one to see EOF
    while total <= cap:
        chunk = os.read(fd, max(want - total, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@functools.lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


_DIR_CACHE: dict[str, tuple[float, str]] = {}
_DIR_CACHE_TTL_S = 2.0


def _realpath(path: str) -> str:
    """os.path.realpath, with the parent directory's resolution cached for a moment.

    realpath lstat()s every component in Python; on a worker's hot path (every input and output)
    that was the largest single cost. A final component that is a symlink is still resolved in full.
    """
    directory, name = os.path.split(path)
    now = time.monotonic()
    hit = _DIR_CACHE.get(directory)
    if hit is None or now - hit[0] > _DIR_CACHE_TTL_S:
        if len(_DIR_CACHE) > 4096:
            _DIR_CACHE.clear()
        hit = (now, os.path.realpath(directory))
        _DIR_CACHE[directory] = hit
    candidate = os.path.join(hit[1], name)
    try:
        if stat.S_ISLNK(os.lstat(candidate).st_mode):
            return os.path.realpath(path)
    except OSError:
        pass
    return candidate


def _confine(path: str, roots: Sequence[str], uri: str, what: str) -> str:
    """`path` with symlinks resolved, if that lies inside one of `roots`; else InputForbidden."""
    real = _realpath(path)
    if not _inside(real, [_real_root(root) for root in roots]):
        raise InputForbidden(f"{uri} resolves outside {what}")
    return real


def _sweep_temps(final: str) -> None:
    """Remove the temp files that writers of `final` killed mid-write left beside it."""
    directory, name = os.path.split(final)
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*{_TEMP_SUFFIX}")):
        try:
            os.unlink(stale)
        except OSError:
            pass


def _client_error(exc: ClientError, uri: str, *, reading: bool) -> JobError:
    """The typed error for an S3 error answer."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    text = f"{uri}: S3 answered {status or '?'} {code} {error.get('Message', '')}".rstrip()
    if code in _TRANSIENT_CODES or status in (408, 429) or status >= 500:
        return StorageError(text, transient=True)
    if reading and (code in _NOT_FOUND_CODES or status == 404):
        return InputNotFound(text)
    if reading and (code in _FORBIDDEN_CODES or status == 403):
        return InputForbidden(text)
    return StorageError(text, transient=False)


def _botocore_error(exc: Exception, uri: str) -> JobError:
    """The typed error for a botocore failure that is not an S3 answer (network, credentials, params)."""
    from botocore.exceptions import NoCredentialsError, ParamValidationError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"{uri}: no S3 credentials ({exc}); set them as for any boto3 program",
                            transient=False)
    if isinstance(exc, ParamValidationError):
        return InputForbidden(f"{uri}: {exc}")
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}", transient=True)


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


def _os_error(exc: OSError, uri: str) -> JobError:
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: permission denied ({exc.strerror})", transient=False)
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri} names a directory", transient=False)
    return StorageError(f"{uri}: {exc}", transient=True)


class Storage:
    """Reads and writes by URI. Make one per process: it is thread-safe and holds one boto3 client.

    `max_pool_connections` sizes the S3 connection pool; keep it at least the worker's concurrency.
    `ssl_context` verifies https inputs (default: the system's trust store).
    """

    def __init__(self, settings: Settings, *, max_pool_connections: int = 32,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self._max_pool_connections = max_pool_connections
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._writable_roots = _writable_roots(settings)
        # Output directories this process made and confined lately: parent path -> (when, real path).
        self._ready_dirs: dict[str, tuple[float, str]] = {}
        self._client: Any = None
        self._public_client: Any = None

    # --- S3 clients --------------------------------------------------------------------------------

    def _make_client(self, endpoint_url: str | None) -> Any:
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "read_timeout": S3_READ_TIMEOUT_S,
            "retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
            "max_pool_connections": self._max_pool_connections,
            "s3": {"addressing_style": self.settings.s3_addressing_style},
            "signature_version": "s3v4",
        }
        if self.settings.s3_endpoint_url:
            # Many S3-compatible stores reject the CRC headers boto3 >= 1.36 adds by default (SPEC section 2).
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        # A private session: boto3's default session is not thread-safe.
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint_url, region_name=self.settings.s3_region,
                              config=Config(**options))

    def s3_client(self) -> Any:
        """The process's boto3 S3 client, made on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client(self.settings.s3_endpoint_url)
        return self._client

    def _presign_client(self) -> Any:
        public = self.settings.s3_public_endpoint_url
        if not public or public == self.settings.s3_endpoint_url:
            return self.s3_client()
        if self._public_client is None:
            with self._lock:
                if self._public_client is None:
                    # Signing only: SigV4 covers the Host header, so the URL must be signed for the public host.
                    self._public_client = self._make_client(public)
        return self._public_client

    def close(self) -> None:
        """Close the S3 clients' connection pools (a later call makes new ones)."""
        with self._lock:
            for client in (self._client, self._public_client):
                if client is not None:
                    client.close()
            self._client = self._public_client = None

    # --- reads -----------------------------------------------------------------------------------

    def read(self, uri: str) -> bytes:
        """The bytes at `uri` (file://, s3://, http(s)://), at most STYLEQUEUE_MAX_INPUT_BYTES."""
        scheme, rest = _check_common(uri)
        if scheme == "file":
            return self._read_file(uri)
        if scheme == "s3":
            return self._read_s3(uri, *_s3_parts(rest, uri))
        if scheme in ("http", "https"):
            return self._read_http(uri)
        raise InputForbidden(f"URI scheme {scheme!r} is not allowed for inputs: use {', '.join(INPUT_SCHEMES)}")

    def _too_large(self, uri: str, size: int | None) -> InputTooLarge:
        cap = self.settings.max_input_bytes
        amount = f"{size} bytes" if size is not None else "larger"
        return InputTooLarge(f"{uri} is {amount}, more than STYLEQUEUE_MAX_INPUT_BYTES={cap}")

    def _read_file(self, uri: str) -> bytes:
        roots = [str(root) for root in self.settings.input_roots or []]
        if not roots:
            raise InputForbidden(_no_roots_message())
        real = _confine(file_uri_str(uri), roots, uri, "STYLEQUEUE_INPUT_ROOTS")
        cap = self.settings.max_input_bytes
        try:
            # O_NOFOLLOW: a symlink swapped in after the check above fails instead of being followed.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise InputNotFound(f"{uri} does not exist") from None
        except PermissionError:
            raise InputForbidden(f"{uri} is not readable by the worker") from None
        except OSError as exc:
            raise _os_error(exc, uri) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
            os.close(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InputNotFound(f"{uri} is not a regular file")
            raise self._too_large(uri, info.st_size)
        try:
            data = _read_all(fd, info.st_size, cap)
        except OSError as exc:
            raise _os_error(exc, uri) from None
        finally:
            os.close(fd)
        if len(data) > cap:
            raise self._too_large(uri, None)
        return data

    def _read_s3(self, uri: str, bucket: str, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        cap = self.settings.max_input_bytes
        with _s3_errors(uri, reading=True):
            answer = self.s3_client().get_object(Bucket=bucket, Key=key)
        body = answer["Body"]
        try:
            length = answer.get("ContentLength")
            if length is not None and length > cap:
                raise self._too_large(uri, length)
            data: bytes = body.read(cap + 1)
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"{uri}: reading the object failed: {exc}", transient=True) from None
        finally:
            body.close()
        if len(data) > cap:
            raise self._too_large(uri, None)
        return data

    def _read_http(self, uri: str) -> bytes:
        try:
            with netguard.request(
                "GET", uri, allow_private=self.settings.allow_private_networks,
                headers={"Accept-Encoding": "identity"}, max_redirects=netguard.MAX_REDIRECTS,
                connect_timeout_s=HTTP_CONNECT_TIMEOUT_S, read_timeout_s=HTTP_READ_TIMEOUT_S,
                total_timeout_s=self.settings.job_timeout_s, ssl_context=self._ssl_context,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return response.read_all(self.settings.max_input_bytes)
        except ssl.SSLCertVerificationError as exc:
            raise StorageError(f"{uri}: TLS certificate not trusted: {exc.verify_message}", transient=False) from None
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise InputNotFound(f"{uri}: host not found") from None
            raise StorageError(f"{uri}: name resolution failed: {exc}", transient=True) from None
        except TimeoutError as exc:
            raise StorageError(f"{uri}: timed out ({exc})", transient=True) from None
        except (OSError, http.client.HTTPException) as exc:
            raise StorageError(f"{uri}: {type(exc).__name__}: {exc}", transient=True) from None
        text = f"{uri}: the server answered {status}"
        if status in (401, 403):
            raise InputForbidden(text)
        if status in (408, 425, 429) or status >= 500:
            raise StorageError(text, transient=True)
        raise InputNotFound(text)

    def exists(self, uri: str) -> bool:
        """Whether an object or regular file is at `uri` (file:// under the storage root or input roots)."""
        scheme, rest = _check_common(uri)
        if scheme == "file":
            return os.path.isfile(self._managed_path(uri))
        if scheme != "s3":
            raise InputForbidden(f"exists() takes file:// or s3:// URIs, not {scheme}://")
        bucket, key = _s3_parts(rest, uri)
        try:
            with _s3_errors(uri, reading=True):
                self.s3_client().head_object(Bucket=bucket, Key=key)
        except InputNotFound:
            return False
        return True

    def presign(self, uri: str, ttl_s: int) -> str | None:
        """A presigned GET URL for an `s3://` URI, valid `ttl_s` seconds, naming the public endpoint; else None."""
        scheme, rest = _check_common(uri)
        if scheme != "s3":
            return None
        bucket, key = _s3_parts(rest, uri)
        url: str = self._presign_client().generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(ttl_s))
        return url

    # --- writes ----------------------------------------------------------------------------------

    def write(self, uri: str, data: bytes, content_type: str, *, sweep: bool = False) -> None:
        """Store `data` at `uri`: file:// atomically (temp file + rename), s3:// in one PUT with `content_type`.

        `sweep` (a retried job): also remove the temp files an earlier writer of `uri` left behind when
        it was killed mid-write. It lists the directory, so first attempts skip it.
        """
        scheme, rest = _check_common(uri)
        if scheme == "file":
            final = self._write_file(uri, data)
            if sweep:
                _sweep_temps(final)
            return
        if scheme != "s3":
            raise InputForbidden(f"cannot write to {scheme}:// URIs: outputs go to file:// or s3://")
        bucket, key = _s3_parts(rest, uri)
        with _s3_errors(uri, reading=False):
            self.s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    # --- fenced writes: stage, then promote after the owner check (provisional; see the storage branch) ----

    def stage(self, uri: str, data: bytes, content_type: str, *, tag: str) -> str:
        """Write `data` to a new attempt-specific temporary object beside `uri`; returns its URI."""
        scheme, rest = _check_common(uri)
        if scheme == "file":
            final = self._writable_path(uri)
            directory, name = os.path.split(final)
            fd, temp = _create_temp(directory, f"{name}.{tag}")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, 0o644)
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)
                os.unlink(temp)
                raise _os_error(exc, uri) from None
            os.close(fd)
            return "file://" + temp
        if scheme != "s3":
            raise InputForbidden(f"cannot write to {scheme}:// URIs: outputs go to file:// or s3://")
        bucket, key = _s3_parts(rest, uri)
        staged_key = f"{key}.{tag}.{os.urandom(6).hex()}{_TEMP_SUFFIX}"
        with _s3_errors(uri, reading=False):
            self.s3_client().put_object(Bucket=bucket, Key=staged_key, Body=data, ContentType=content_type)
        return f"s3://{bucket}/{staged_key}"

    def promote(self, staged_uri: str, uri: str) -> None:
        """Move a staged object to `uri`; idempotent (already moved and `uri` present: nothing to do)."""
        scheme, rest = _check_common(uri)
        if scheme == "file":
            final = self._writable_path(uri)
            try:
                os.replace(self._managed_path(staged_uri), final)
            except FileNotFoundError:
                if not os.path.exists(final):
                    raise StorageError(f"{uri}: its staged output is gone and nothing is there",
                                       transient=False) from None
            except OSError as exc:
                raise _os_error(exc, uri) from None
            return
        bucket, key = _s3_parts(rest, uri)
        _, staged_rest = _check_common(staged_uri)
        staged_bucket, staged_key = _s3_parts(staged_rest, staged_uri)
        client = self.s3_client()
        try:
            with _s3_errors(uri, reading=True):
                client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": staged_bucket, "Key": staged_key})
        except InputNotFound:
            if not self.exists(uri):
                raise StorageError(f"{uri}: its staged output is gone and nothing is there", transient=False) from None
            return
        with _s3_errors(uri, reading=False):
            client.delete_object(Bucket=staged_bucket, Key=staged_key)

    def discard(self, staged_uri: str) -> None:
        """Delete a staged object; nothing happens when it is gone."""
        self.delete(staged_uri)

    def _managed_path(self, uri: str) -> str:
        """The real path of a file:// URI under the storage root or the input roots (else InputForbidden)."""
        return _confine(file_uri_str(uri), self._writable_roots, uri, _MANAGED)

    def _writable_path(self, uri: str) -> str:
        path = file_uri_str(uri)
        parent, name = os.path.split(path)
        if uri.endswith("/") or not name:
            raise InputForbidden(f"{uri} names a directory, not a file")
        roots = self._writable_roots
        _confine(path, roots, uri, _MANAGED)
        now = time.monotonic()
        ready = self._ready_dirs.get(parent)
        if ready is not None and now - ready[0] <= _DIR_CACHE_TTL_S:
            return os.path.join(ready[1], name)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, uri) from None
        # Checked again now that the directories exist: one of them may be a symlink.
        real_parent = _confine(parent, roots, uri, _MANAGED)
        if len(self._ready_dirs) > 4096:
            self._ready_dirs.clear()
        self._ready_dirs[parent] = (now, real_parent)
        return os.path.join(real_parent, name)

    def _write_file(self, uri: str, data: bytes, *, retry: bool = True) -> str:
        """Write atomically; returns the real path written."""
        final = self._writable_path(uri)
        temp: str | None = None
        try:
            fd, temp = _create_temp(*os.path.split(final))
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, 0o644)
                # The job is marked succeeded after this returns, so its output must survive a crash.
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
            temp = None
        except FileNotFoundError as exc:
            if not retry or not self._ready_dirs:
                raise _os_error(exc, uri) from None
            # A directory this process made went away since (a cleanup): forget them all, make it again.
            self._ready_dirs.clear()
            return self._write_file(uri, data, retry=False)
        except OSError as exc:
            raise _os_error(exc, uri) from None
        finally:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass
        return final

    def delete(self, uri: str) -> None:
        """Remove the object or file at `uri`; nothing happens when it does not exist."""
        scheme, rest = _check_common(uri)
        if scheme == "file":
            try:
                os.unlink(self._managed_path(uri))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _os_error(exc, uri) from None
            return
        if scheme != "s3":
            raise InputForbidden(f"delete() takes file:// or s3:// URIs, not {scheme}://")
        bucket, key = _s3_parts(rest, uri)
        with _s3_errors(uri, reading=False):
            self.s3_client().delete_object(Bucket=bucket, Key=key)

    # --- listing (last: the method name shadows the builtin inside the class body) -----------------

    def _list_s3(self, prefix_uri: str, rest: str, page_size: int) -> Iterator[str]:
        bucket, prefix = _s3_parts(rest, prefix_uri, key_required=False)
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        while True:
            with _s3_errors(prefix_uri, reading=True):
                page = self.s3_client().list_objects_v2(**request)
            for entry in page.get("Contents", []):
                if not entry["Key"].endswith("/"):  # "folder" placeholder objects are not files
                    yield f"s3://{bucket}/{entry['Key']}"
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            request["ContinuationToken"] = token

    def _list_files(self, prefix_uri: str) -> Iterator[str]:
        roots = self._writable_roots
        prefix = file_uri_str(prefix_uri)
        if prefix_uri.endswith("/") or os.path.isdir(prefix):
            top, name_prefix = _confine(prefix, roots, prefix_uri, _MANAGED), ""
        else:
            # Like S3, a prefix that is not a directory matches names that start with it.
            top = _confine(os.path.dirname(prefix), roots, prefix_uri, _MANAGED)
            name_prefix = os.path.join(top, os.path.basename(prefix))
        real_roots = [os.path.realpath(root) for root in roots]
        for directory, subdirs, files in os.walk(top):
            subdirs[:] = sorted(d for d in subdirs if os.path.join(directory, d).startswith(name_prefix))
            for name in sorted(files):
                path = os.path.join(directory, name)
                if name.endswith(_TEMP_SUFFIX) or not path.startswith(name_prefix):
                    continue
                if os.path.islink(path) and not _inside(os.path.realpath(path), real_roots):
                    continue  # a symlink out of the roots would be refused when read
                yield "file://" + path

    def list(self, prefix_uri: str, *, page_size: int = 1000) -> Iterator[str]:
        """URIs of every object (s3://, `page_size` keys a request) or file (file://, recursive) under a prefix.

        Yields lazily, in key order for S3 and sorted per directory for files.
        """
        scheme, rest = _check_common(prefix_uri)
        if scheme == "s3":
            return self._list_s3(prefix_uri, rest, page_size)
        if scheme == "file":
            return self._list_files(prefix_uri)
        raise InputForbidden(f"list() takes file:// or s3:// prefixes, not {scheme}://")
