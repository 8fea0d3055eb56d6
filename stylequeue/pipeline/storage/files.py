"""`file://` paths confined to the configured roots.

Reads come only from STYLEQUEUE_INPUT_ROOTS; writes go only under the storage root or the input roots,
atomically (temp file + rename). Failures: InputForbidden outside the roots, InputNotFound,
InputTooLarge, StorageError(transient=False) for permission errors, StorageError(transient=True) for
other OS errors.
"""

from __future__ import annotations

import functools
import glob
import os
import stat
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from stylequeue.errors import InputForbidden, InputNotFound, InputTooLarge, JobError, StorageError
from stylequeue.pipeline.storage.uris import TEMP_SUFFIX

if TYPE_CHECKING:
    from stylequeue.config.settings import Settings

_MANAGED = "the storage root and STYLEQUEUE_INPUT_ROOTS"
_DIR_CACHE_TTL_S = 2.0


def path_of(uri: str) -> str:
    """The absolute path a `file://` URI names."""
    # Imported here: settings pulls in pydantic, and a webhook receiver importing the network guard beside
    # this module must not pay for it.
    from stylequeue.config.settings import file_uri_str

    return file_uri_str(uri)


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _no_roots_message() -> str:
    return ("file:// inputs are not allowed: no input roots are set; set STYLEQUEUE_INPUT_ROOTS to the "
            "comma-separated directories inputs may come from")


def _writable_roots(settings: Settings) -> list[str]:
    roots = [str(root) for root in settings.input_roots or []]
    if settings.storage_url.startswith("file://"):
        roots.append(path_of(settings.storage_url))
    return roots


def check_input(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) a `file://` input outside STYLEQUEUE_INPUT_ROOTS; no I/O."""
    roots = [os.path.abspath(root) for root in settings.input_roots or []]
    if not roots:
        raise InputForbidden(_no_roots_message())
    if not _inside(path_of(uri), roots):
        raise InputForbidden(f"{uri} is outside STYLEQUEUE_INPUT_ROOTS ({', '.join(roots)})")


def check_output(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) a `file://` output the worker would refuse to write; no I/O."""
    roots = [os.path.abspath(root) for root in _writable_roots(settings)]
    if not _inside(path_of(uri), roots):
        raise InputForbidden(f"{uri} is outside {_MANAGED}")


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new, empty, private temp file beside `name` in `directory`: (fd, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        temp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}{TEMP_SUFFIX}")
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
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*{TEMP_SUFFIX}")):
        try:
            os.unlink(stale)
        except OSError:
            pass


def _os_error(exc: OSError, uri: str) -> JobError:
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: permission denied ({exc.strerror})", transient=False)
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri} names a directory", transient=False)
    return StorageError(f"{uri}: {exc}", transient=True)


class FileBackend:
    """Files under the configured roots. Thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._input_roots = [str(root) for root in settings.input_roots or []]
        self._writable_roots = _writable_roots(settings)
        # Output directories this process made and confined lately: parent path -> (when, real path).
        self._ready_dirs: dict[str, tuple[float, str]] = {}

    def _too_large(self, uri: str, size: int | None) -> InputTooLarge:
        cap = self.settings.max_input_bytes
        amount = f"{size} bytes" if size is not None else "larger"
        return InputTooLarge(f"{uri} is {amount}, more than STYLEQUEUE_MAX_INPUT_BYTES={cap}")

    def read(self, uri: str) -> bytes:
        if not self._input_roots:
            raise InputForbidden(_no_roots_message())
        real = _confine(path_of(uri), self._input_roots, uri, "STYLEQUEUE_INPUT_ROOTS")
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

    def _managed_path(self, uri: str) -> str:
        """The real path of a file:// URI under the storage root or the input roots (else InputForbidden)."""
        return _confine(path_of(uri), self._writable_roots, uri, _MANAGED)

    def exists(self, uri: str) -> bool:
        return os.path.isfile(self._managed_path(uri))

    def presign(self, uri: str, ttl_s: int) -> str | None:
        return None  # a file has no URL a phone could open

    def _writable_path(self, uri: str) -> str:
        path = path_of(uri)
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

    def write(self, uri: str, data: bytes, content_type: str, *, sweep: bool = False) -> None:
        final = self._write_file(uri, data)
        if sweep:
            _sweep_temps(final)

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
        try:
            os.unlink(self._managed_path(uri))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _os_error(exc, uri) from None

    # --- listing (last: the method name shadows the builtin inside the class body) -----------------

    def list(self, prefix_uri: str, *, page_size: int = 1000) -> Iterator[str]:
        roots = self._writable_roots
        prefix = path_of(prefix_uri)
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
                if name.endswith(TEMP_SUFFIX) or not path.startswith(name_prefix):
                    continue
                if os.path.islink(path) and not _inside(os.path.realpath(path), real_roots):
                    continue  # a symlink out of the roots would be refused when read
                yield "file://" + path
