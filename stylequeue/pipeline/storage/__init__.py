"""Bytes by URI: read, write, presign, delete, test and list `file://`, `s3://` and (read-only) `http(s)://`.

`Storage` looks a URI's scheme up once in a table of backends (`files.py`, `s3.py`, `http.py`); each
backend states its own rules. URIs are taken literally (no percent-decoding): `s3://bucket/a b.jpg`
names the key `a b.jpg`, and what `Storage.list` yields reads back unchanged. Failures are typed
(job error codes: docs/jobs.md):

- reads: InputNotFound, InputForbidden (outside STYLEQUEUE_INPUT_ROOTS, a refused address, S3 403, a
  scheme other than file/s3/http/https), InputTooLarge (over STYLEQUEUE_MAX_INPUT_BYTES, found before the
  body is read where the size is declared), StorageError(transient=True) for 5xx, throttling, timeouts
  and connection errors, StorageError(transient=False) for other refusals.
- writes: InputForbidden when the URI is one we never write (`file://` anywhere but under
  `{STYLEQUEUE_STORAGE_URL}/outputs/` or the gateway's `upload_roots`, a symbolic link on the way,
  http(s)), StorageError(transient=False) for a store's permanent 4xx or a file permission error,
  StorageError(transient=True) for 5xx, connection errors and other OS errors.

`check_input_uri`, `check_output_uri` and `check_output_prefix` refuse, without I/O, what a worker would
refuse (for producers); their rules are the backends' own, so the two sides agree.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from stylequeue.errors import InputForbidden
from stylequeue.pipeline.storage import files, http, s3
from stylequeue.pipeline.storage.uris import (
    INPUT_SCHEMES,
    MAX_URI_CHARS,
    OUTPUT_SCHEMES,
    TEMP_SUFFIX,
    join_uri,
    redact_uri,
    split_uri,
)

if TYPE_CHECKING:
    from stylequeue.config.settings import Settings

# The timeouts under the names they had before the split by scheme.
S3_CONNECT_TIMEOUT_S = s3.CONNECT_TIMEOUT_S
S3_READ_TIMEOUT_S = s3.READ_TIMEOUT_S
S3_MAX_ATTEMPTS = s3.MAX_ATTEMPTS
HTTP_CONNECT_TIMEOUT_S = http.CONNECT_TIMEOUT_S
HTTP_READ_TIMEOUT_S = http.READ_TIMEOUT_S


class Reader(Protocol):
    """What every scheme supports: the bytes at a URI."""

    def read(self, uri: str) -> bytes: ...


class Backend(Reader, Protocol):
    """A scheme that can also be written (file://, s3://)."""

    def write(self, uri: str, data: bytes, content_type: str, *, sweep: bool = False) -> None: ...

    def exists(self, uri: str) -> bool: ...

    def delete(self, uri: str) -> None: ...

    def presign(self, uri: str, ttl_s: int) -> str | None: ...

    def staged_copies(self, uri: str) -> list[str]: ...

    def list(self, prefix_uri: str, *, page_size: int = 1000) -> Iterator[str]: ...

    def stage(self, uri: str, data: bytes, content_type: str, *, tag: str) -> str: ...

    def promote(self, staged_uri: str, uri: str) -> None: ...

    def discard(self, staged_uri: str) -> None: ...


Check = Callable[[str, "Settings"], None]
_INPUT_CHECKS: dict[str, Check] = {"file": files.check_input, "s3": s3.check_uri, "http": http.check_uri,
                                   "https": http.check_uri}
_OUTPUT_CHECKS: dict[str, Check] = {"file": files.check_output, "s3": s3.check_uri}
_OUTPUT_PREFIX_CHECKS: dict[str, Check] = {"file": files.check_output_prefix, "s3": s3.check_prefix}


def check_input_uri(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) an input URI a worker would refuse, without any I/O (for producers)."""
    scheme, _ = split_uri(uri)
    check = _INPUT_CHECKS.get(scheme)
    if check is None:
        raise InputForbidden(f"URI scheme {scheme!r} is not allowed for inputs: use {', '.join(INPUT_SCHEMES)}")
    check(uri, settings)


def check_output_uri(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) an output URI a worker would refuse to write, without any I/O."""
    _output_check(uri, _OUTPUT_CHECKS)(uri, settings)


def check_output_prefix(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) a prefix (`s3://out/run1/`) under which no output could be written; no I/O."""
    _output_check(uri, _OUTPUT_PREFIX_CHECKS)(uri, settings)


def _output_check(uri: str, checks: dict[str, Check]) -> Check:
    scheme, _ = split_uri(uri)
    check = checks.get(scheme)
    if check is None:
        raise InputForbidden(f"URI scheme {scheme!r} is not allowed for outputs: use {', '.join(OUTPUT_SCHEMES)}")
    return check


class Storage:
    """Reads and writes by URI. Make one per process: it is thread-safe and holds one boto3 client.

    `max_pool_connections` sizes the S3 connection pool; keep it at least the worker's concurrency.
    `ssl_context` verifies https inputs (default: the system's trust store).
    """

    def __init__(self, settings: Settings, *, max_pool_connections: int = 32,
                 ssl_context: ssl.SSLContext | None = None, upload_roots: Sequence[str] = ()) -> None:
        self.settings = settings
        self._s3 = s3.S3Backend(settings, max_pool_connections=max_pool_connections)
        self._files = files.FileBackend(settings, upload_roots=upload_roots)
        web = http.HttpReader(settings, ssl_context=ssl_context)
        self._backends: dict[str, Backend] = {"file": self._files, "s3": self._s3}
        self._readers: dict[str, Reader] = {**self._backends, "http": web, "https": web}

    def s3_client(self) -> Any:
        """The process's boto3 S3 client, made on first use."""
        return self._s3.client()

    def close(self) -> None:
        """Close the S3 clients' connection pools (a later call makes new ones)."""
        self._s3.close()

    def batch(self) -> AbstractContextManager[None]:
        """A scope in which this thread's file:// `stage`, `write` and `promote` calls walk each output directory
        once instead of once per call; every directory fd it held closes when it ends (FileBackend.batch says
        what it changes). Meant for a group's writes into one directory; other threads and other schemes
        (s3://) are not affected, so it is harmless around anything.
        """
        return self._files.batch()

    def _backend(self, uri: str, doing: str) -> Backend:
        scheme, _ = split_uri(uri)
        backend = self._backends.get(scheme)
        if backend is None:
            raise InputForbidden(f"cannot {doing} {scheme}:// URIs: only file:// and s3://")
        return backend

    def read(self, uri: str) -> bytes:
        """The bytes at `uri` (file://, s3://, http(s)://), at most STYLEQUEUE_MAX_INPUT_BYTES."""
        scheme, _ = split_uri(uri)
        reader = self._readers.get(scheme)
        if reader is None:
            raise InputForbidden(f"URI scheme {scheme!r} is not allowed for inputs: use {', '.join(INPUT_SCHEMES)}")
        return reader.read(uri)

    def write(self, uri: str, data: bytes, content_type: str, *, sweep: bool = False) -> None:
        """Store `data` at `uri`: file:// atomically (temp file + rename), s3:// in one PUT with `content_type`.

        `sweep` (a retried job): also remove the temp files an earlier writer of `uri` left behind when
        it was killed mid-write. It lists the directory, so first attempts skip it.
        """
        self._backend(uri, "write to").write(uri, data, content_type, sweep=sweep)

    def stage(self, uri: str, data: bytes, content_type: str, *, tag: str) -> str:
        """Write `data` to a new object beside `uri` that only attempt `tag` knows of; returns its URI.

        The staged object (`.{name}.{tag}.{random}.sqtmp` in the file's directory, fsync'd, or
        `{key}.{tag}.{random}.sqtmp` in the bucket) is never listed and never replaces `uri` by itself:
        only `promote` puts it there, so an attempt that lost its job can stage but need not promote.
        `tag` names the attempt (`a2`): 1 to 32 letters, digits, '-' or '_'.
        """
        return self._backend(uri, "write to").stage(uri, data, content_type, tag=tag)

    def promote(self, staged_uri: str, uri: str) -> None:
        """Move a staged object onto `uri` (file: a rename; s3: copy with its ContentType, then delete).

        Idempotent: when the staged object is gone and `uri` exists, someone promoted it already and this
        returns quietly; when both are gone it raises StorageError(transient=False).
        """
        self._same_scheme(staged_uri, uri).promote(staged_uri, uri)

    def staged_copies(self, uri: str) -> list[str]:
        """The staged copies of `uri` that exist, of any attempt (a killed attempt's are left behind)."""
        return self._backend(uri, "list").staged_copies(uri)

    def discard(self, staged_uri: str) -> None:
        """Delete a staged object; nothing happens when it is already gone."""
        self._backend(staged_uri, "delete").discard(staged_uri)

    def _same_scheme(self, staged_uri: str, uri: str) -> Backend:
        backend = self._backend(uri, "write to")  # `uri` is checked there; the staged one needs its scheme only
        if staged_uri.partition("://")[0].lower() != uri.partition("://")[0].lower():
            raise ValueError(f"{redact_uri(staged_uri)} and {redact_uri(uri)} are in different stores")
        return backend

    def probe(self, uri: str) -> bool:
        """Whether the remote store or host behind `uri` answers at all (any answer but a 5xx); file://: True."""
        scheme, _ = split_uri(uri)
        reader = self._readers.get(scheme)
        probe = getattr(reader, "probe", None)
        return bool(probe(uri)) if probe is not None else True

    def exists(self, uri: str) -> bool:
        """Whether an object or regular file is at `uri`."""
        return self._backend(uri, "test").exists(uri)

    def delete(self, uri: str) -> None:
        """Remove the object or file at `uri`; nothing happens when it does not exist."""
        self._backend(uri, "delete").delete(uri)

    def presign(self, uri: str, ttl_s: int) -> str | None:
        """A presigned GET URL for an `s3://` URI, valid `ttl_s` seconds, naming the public endpoint; else None."""
        scheme, _ = split_uri(uri)
        backend = self._backends.get(scheme)
        return backend.presign(uri, ttl_s) if backend is not None else None

    def read_output(self, uri: str) -> bytes:
        """The bytes of a job's output: an s3:// object, or a file:// file under the output directory."""
        scheme, _ = split_uri(uri)
        if scheme == "file":
            return self._files.read_output(uri)
        return self._backend(uri, "read").read(uri)

    def presign_upload(self, uri: str, *, max_bytes: int, ttl_s: int, content_type: str) -> dict[str, Any]:
        """A presigned POST that stores one image at the `s3://` `uri` (see S3Backend.presign_post)."""
        if split_uri(uri)[0] != "s3":
            raise InputForbidden(f"cannot presign an upload to {redact_uri(uri)}: only s3:// stores take one")
        return self._s3.presign_post(uri, max_bytes=max_bytes, ttl_s=ttl_s, content_type=content_type)

    def list(self, prefix_uri: str, *, page_size: int = 1000) -> Iterator[str]:
        """URIs of every object (s3://, `page_size` keys a request) or file (file://, recursive) under a prefix.

        Yields lazily, in key order for S3 and sorted per directory for files.
        """
        return self._backend(prefix_uri, "list").list(prefix_uri, page_size=page_size)


__all__ = [
    "HTTP_CONNECT_TIMEOUT_S",
    "HTTP_READ_TIMEOUT_S",
    "INPUT_SCHEMES",
    "MAX_URI_CHARS",
    "OUTPUT_SCHEMES",
    "S3_CONNECT_TIMEOUT_S",
    "S3_MAX_ATTEMPTS",
    "S3_READ_TIMEOUT_S",
    "TEMP_SUFFIX",
    "Backend",
    "Reader",
    "Storage",
    "check_input_uri",
    "check_output_prefix",
    "check_output_uri",
    "join_uri",
    "redact_uri",
]
