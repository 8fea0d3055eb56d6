"""`file://` paths, opened only by walking down from a root's directory, one component at a time.

Roots are resolved with realpath once, when the backend is made (they are the operator's configuration):
- inputs are read only from under STYLEQUEUE_INPUT_ROOTS;
- outputs are written only under `{STYLEQUEUE_STORAGE_URL}/outputs/` (a file:// storage URL), never
  elsewhere under the storage root or the input roots, where the job store's data and logs may live.

Below a root every component is opened with O_NOFOLLOW relative to its parent's directory fd, and the
final file relative to its directory's fd (`walk.py`), so what is checked is what is opened: swapping a
directory for a symlink at any moment cannot move a read or a write outside. Writes refuse a symbolic link
anywhere below the output root. Reads follow a symbolic link only when its target lies inside the input
roots, by walking the target the same way. Nothing is cached between calls (a cached resolution or an
open directory fd would be trust that outlives its check), except inside a batch scope (`FileBackend.batch`):
there a thread's stages, writes and promotes into one directory share the directory fd its first walk
opened, for as long as the scope lasts, exactly as one walk holds its fd while it works.

Writes are atomic: a temp file `.{name}.{random}.sqtmp` in the same directory, fsync'd, renamed over the
name through the directory fd. `stage` leaves an attempt's bytes in `.{name}.{tag}.{random}.sqtmp`
until `promote` renames it over the name the same way. Listings skip every `*.sqtmp`.

Failures: InputForbidden (outside the roots, through a symbolic link), InputNotFound, InputTooLarge,
StorageError(transient=False) for permission errors and impossible names, StorageError(transient=True)
for other OS errors.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from stylequeue.errors import InputForbidden, InputNotFound, InputTooLarge, JobError, StorageError
from stylequeue.pipeline.storage.uris import TEMP_SUFFIX, redact_uri, staged_base, staged_tail
from stylequeue.pipeline.storage.walk import (
    DIR_FLAGS,
    LIST_FLAGS,
    Root,
    SymlinkFound,
    follow,
    is_regular,
    is_symlink,
    locate,
    unlink_quietly,
    walk,
    write_temp,
)

if TYPE_CHECKING:
    from stylequeue.config.settings import Settings

OUTPUTS = "outputs"
# How many symbolic links one read follows inside the roots (Linux's own limit per lookup is 40).
MAX_SYMLINKS = 8
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO cannot stall us
# Directory fds one thread's batch scope keeps open at most; the oldest is closed to make room. A codec group
# (up to 128 jobs) mostly writes one directory, so this bounds fds without costing it walks.
MAX_BATCH_DIRS = 64

_T = TypeVar("_T")
# A batch's directory: (its root's resolved path, the components below it, whether the walk made missing
# directories). Strings, not the Root: their hashes are cached, a dataclass's are computed in Python each time.
_DirKey = tuple[str, tuple[str, ...], bool]


_file_uri_str: Callable[[str], str] | None = None


def path_of(uri: str) -> str:
    """The absolute path a `file://` URI names."""
    global _file_uri_str
    if _file_uri_str is None:
        # Imported on first use: settings pulls in pydantic, and a webhook receiver importing the network
        # guard beside this module must not pay for it. Kept after: this runs several times per job.
        from stylequeue.config.settings import file_uri_str

        _file_uri_str = file_uri_str
    return _file_uri_str(uri)


def _sweep_temps(dir_fd: int, name: str) -> None:
    """Remove the temp files that writers of `name` killed mid-write left beside it.

    Only plain write temps (`.{name}.{random}.sqtmp`): a staged attempt's file carries a tag
    (`.{name}.{tag}.{random}.sqtmp`) and belongs to that attempt.
    """
    stem = f".{name}."
    readable = os.open(".", LIST_FLAGS, dir_fd=dir_fd)
    try:
        entries = os.listdir(readable)
    finally:
        os.close(readable)
    for entry in entries:
        if entry.startswith(stem) and entry.endswith(TEMP_SUFFIX) and "." not in entry[len(stem):-len(TEMP_SUFFIX)]:
            unlink_quietly(dir_fd, entry)


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


def _os_error(exc: OSError, uri: str) -> JobError:
    shown = redact_uri(uri)
    if isinstance(exc, PermissionError):
        return StorageError(f"{shown}: permission denied ({exc.strerror})", transient=False)
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{shown} names a directory", transient=False)
    if exc.errno == errno.ENAMETOOLONG:
        return StorageError(f"{shown}: a file name is too long", transient=False)
    return StorageError(f"{shown}: {exc.strerror or exc}", transient=True)


# --- checks without I/O (producers) -----------------------------------------------------------------


def _no_roots_message() -> str:
    return ("file:// inputs are not allowed: no input roots are set; set STYLEQUEUE_INPUT_ROOTS to the "
            "comma-separated directories inputs may come from")


def _outside_outputs_message(uri: str, settings: Settings) -> str:
    if not settings.storage_url.startswith("file://"):
        return (f"{redact_uri(uri)}: file:// outputs are not allowed because STYLEQUEUE_STORAGE_URL is not a "
                "file:// URI; name an s3:// output, or none to get one under STYLEQUEUE_STORAGE_URL")
    # The server's own directory is not named: this message reaches HTTP callers too (docs/http.md).
    return (f"{redact_uri(uri)} is outside the output directory: file:// outputs go only under "
            f"{{STYLEQUEUE_STORAGE_URL}}/{OUTPUTS}/ (change STYLEQUEUE_STORAGE_URL to write elsewhere), never "
            "elsewhere under the storage root or STYLEQUEUE_INPUT_ROOTS")


def _output_root(settings: Settings) -> Root | None:
    if not settings.storage_url.startswith("file://"):
        return None
    return Root.of(os.path.join(path_of(settings.storage_url), OUTPUTS))


def _lexical_output_parts(uri: str, settings: Settings) -> list[str] | None:
    """The components of a `file://` URI below `{storage}/outputs`, judged on the text alone."""
    if not settings.storage_url.startswith("file://"):
        return None
    root = os.path.join(os.path.abspath(path_of(settings.storage_url)), OUTPUTS)
    return Root(root, root).parts(path_of(uri))


def check_input(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) a `file://` input outside STYLEQUEUE_INPUT_ROOTS; no I/O."""
    roots = [os.path.abspath(root) for root in settings.input_roots or []]
    if not roots:
        raise InputForbidden(_no_roots_message())
    if locate(path_of(uri), [Root(root, root) for root in roots]) is None:
        raise InputForbidden(f"{redact_uri(uri)} is outside STYLEQUEUE_INPUT_ROOTS")


def check_output(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) a `file://` output the worker would refuse to write; no I/O."""
    if not _lexical_output_parts(uri, settings):
        raise InputForbidden(_outside_outputs_message(uri, settings))
    if uri.endswith("/"):
        raise InputForbidden(f"{redact_uri(uri)} names a directory, not a file")


def check_output_prefix(uri: str, settings: Settings) -> None:
    """Refuse (InputForbidden) a `file://` prefix that outputs could not be written under; no I/O."""
    if _lexical_output_parts(uri, settings) is None:
        raise InputForbidden(_outside_outputs_message(uri, settings))


# --- the backend ------------------------------------------------------------------------------------


class _Batch(threading.local):
    """One thread's batch scope: the directory fds it holds by `_DirKey`, or None outside a scope."""

    def __init__(self) -> None:
        self.dirs: dict[_DirKey, int] | None = None


class FileBackend:
    """Files under the configured roots. Thread-safe: it holds the resolved roots, and per thread the directory
    fds of that thread's batch scope (`batch`), which no other thread sees.

    `upload_roots` are more directories writes may go to: only the HTTP gateway names any (its tenants'
    `file://` upload prefixes, where it stores photos under names it makes); workers never do.
    """

    def __init__(self, settings: Settings, *, upload_roots: Sequence[str] = ()) -> None:
        self.settings = settings
        self._input_roots = [Root.of(str(root)) for root in settings.input_roots or []]
        self._output_root = _output_root(settings)
        self._listed_roots = self._input_roots + ([self._output_root] if self._output_root else [])
        self._write_roots = ([self._output_root] if self._output_root else []) + [Root.of(r) for r in upload_roots]
        self._batch = _Batch()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """A scope in which this thread's `stage`, `write` and `promote` walk each output directory once.

        A group's outputs mostly share one directory, and each walk from the root costs a few syscalls per
        component. Inside the scope the directory fd the first item's walk opened (per root, directory and
        `create`) serves the later items of that directory; every fd closes when the scope ends, also on an
        exception. What the scope changes: a directory swapped for a symlink (or renamed) after the batch
        walked it keeps being used as the directory the batch holds, as one walk already does while it holds
        its fd (walk.py); it never leads outside, because what is held was reached without symlinks. What it
        keeps: confinement to the roots (`locate`), the refusal of a name ending in "/" and of a symlink at
        the file's own name are checked per item, as outside a scope. A directory removed since the batch
        walked it (a cleanup between two items) fails a create or rename in it with ENOENT: that entry is
        dropped and the item walks again, once. Failed walks are not remembered, so a directory missing for
        one item is made or found by the next. Reads, listings, `exists`, `delete` and `staged_copies` do not
        use the scope. Scopes nest (the outermost one owns the fds); other threads are not affected.
        """
        if self._batch.dirs is not None:
            yield
            return
        self._batch.dirs = {}
        try:
            yield
        finally:
            dirs, self._batch.dirs = self._batch.dirs, None
            for fd in dirs.values():
                os.close(fd)

    # --- reads ---------------------------------------------------------------------------------------

    def _too_large(self, uri: str, size: int | None) -> InputTooLarge:
        cap = self.settings.max_input_bytes
        amount = f"{size} bytes" if size is not None else "larger"
        return InputTooLarge(f"{redact_uri(uri)} is {amount}, more than STYLEQUEUE_MAX_INPUT_BYTES={cap}")

    def _open_input(self, path: str, uri: str) -> int:
        """An fd of what `path` names under the input roots, following symlinks only inside them."""
        for hop in range(MAX_SYMLINKS + 1):
            located = locate(path, self._input_roots)
            if located is None:
                verb = "resolves" if hop else "is"
                raise InputForbidden(f"{redact_uri(uri)} {verb} outside STYLEQUEUE_INPUT_ROOTS")
            root, parts = located
            if not parts:
                raise InputNotFound(f"{redact_uri(uri)} is not a regular file")
            try:
                dir_fd = walk(root, parts[:-1], read_links=True)
            except SymlinkFound as link:
                if link.target is None:  # the root itself was replaced by a symlink
                    raise InputForbidden(f"{redact_uri(uri)}: its input root is now a symbolic link") from None
                path = follow(root, parts, link.index, link.target)
                continue
            try:
                return os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                target = os.readlink(parts[-1], dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            path = follow(root, parts, len(parts) - 1, target)
        raise InputForbidden(f"{redact_uri(uri)}: more than {MAX_SYMLINKS} symbolic links")

    def _open_input_file(self, uri: str) -> int:
        """`_open_input` for a URI, with its OS errors typed."""
        if not self._input_roots:
            raise InputForbidden(_no_roots_message())
        try:
            return self._open_input(path_of(uri), uri)
        except (FileNotFoundError, NotADirectoryError):
            raise InputNotFound(f"{redact_uri(uri)} does not exist") from None
        except PermissionError:
            raise InputForbidden(f"{redact_uri(uri)} is not readable by the worker") from None
        except OSError as exc:
            raise _os_error(exc, uri) from None

    def read(self, uri: str) -> bytes:
        fd = self._open_input_file(uri)
        cap = self.settings.max_input_bytes
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InputNotFound(f"{redact_uri(uri)} is not a regular file")
            if info.st_size > cap:
                raise self._too_large(uri, info.st_size)
            data = _read_all(fd, info.st_size, cap)
        except OSError as exc:
            raise _os_error(exc, uri) from None
        finally:
            os.close(fd)
        if len(data) > cap:
            raise self._too_large(uri, None)
        return data

    def presign(self, uri: str, ttl_s: int) -> str | None:
        return None  # a file has no URL a phone could open

    def read_output(self, uri: str) -> bytes:
        """The bytes of a written output (under the output directory), walked as writes are."""
        try:
            fd, name = self._output_dir(uri, create=False)
        except (FileNotFoundError, NotADirectoryError):
            raise InputNotFound(f"{redact_uri(uri)} does not exist") from None
        except OSError as exc:
            raise _os_error(exc, uri) from None
        try:
            file_fd = os.open(name, _READ_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            raise InputNotFound(f"{redact_uri(uri)} does not exist") from None
        except OSError as exc:
            raise _os_error(exc, uri) from None
        finally:
            os.close(fd)
        try:
            info = os.fstat(file_fd)
            if not stat.S_ISREG(info.st_mode):
                raise InputNotFound(f"{redact_uri(uri)} is not a regular file")
            return _read_all(file_fd, info.st_size, max(info.st_size, self.settings.max_input_bytes))
        except OSError as exc:
            raise _os_error(exc, uri) from None
        finally:
            os.close(file_fd)

    # --- writes --------------------------------------------------------------------------------------

    def _output_place(self, uri: str, path: str | None = None) -> tuple[Root, list[str]]:
        """The write root holding output `uri` (at `path`, when the caller has it already) and its components
        below it; InputForbidden where none may."""
        located = locate(path_of(uri) if path is None else path, self._write_roots)
        if located is None or not located[1]:
            raise InputForbidden(_outside_outputs_message(uri, self.settings))
        if uri.endswith("/"):
            raise InputForbidden(f"{redact_uri(uri)} names a directory, not a file")
        return located

    def _walk_output(self, uri: str, root: Root, parts: list[str], *, create: bool) -> int:
        """A new fd of the directory output `uri` goes in; a symlink on the way is InputForbidden."""
        try:
            return walk(root, parts[:-1], create=create)
        except SymlinkFound as link:
            raise InputForbidden(self._symlink_message(uri, parts, link.index)) from None

    def _output_dir(self, uri: str, *, create: bool, path: str | None = None) -> tuple[int, str]:
        """(fd of the directory an output goes in, its file name); missing directories made when `create`.
        `path`: the path `uri` names, when the caller has it already.

        Raises InputForbidden (outside the output directory, a symlink on the way or at the name) and
        the OS errors of the walk.
        """
        root, parts = self._output_place(uri, path)
        fd = self._walk_output(uri, root, parts, create=create)
        if is_symlink(fd, parts[-1]):
            os.close(fd)
            raise InputForbidden(self._symlink_message(uri, parts, len(parts) - 1))
        return fd, parts[-1]

    def _batch_dir(self, uri: str, *, create: bool, again: bool = False,
                   path: str | None = None) -> tuple[int, str, bool]:
        """`_output_dir` that, inside this thread's batch scope, uses the fd the scope holds for the directory.

        Returns (fd, name, held): a held fd belongs to the scope and the caller must not close it; an fd not
        held (outside a scope) is the caller's to close. `again` drops the scope's fd first and walks anew.
        """
        dirs = self._batch.dirs
        if dirs is None:
            fd, name = self._output_dir(uri, create=create, path=path)
            return fd, name, False
        root, parts = self._output_place(uri, path)
        key: _DirKey = (root.real, tuple(parts[:-1]), create)
        if again and key in dirs:
            os.close(dirs.pop(key))
        held = dirs.get(key)
        if held is None:
            held = self._walk_output(uri, root, parts, create=create)  # a failed walk leaves nothing behind
            if len(dirs) >= MAX_BATCH_DIRS:
                os.close(dirs.pop(next(iter(dirs))))
            dirs[key] = held
        if is_symlink(held, parts[-1]):  # per item: the directory stays held, the name is refused
            raise InputForbidden(self._symlink_message(uri, parts, len(parts) - 1))
        return held, parts[-1], True

    @staticmethod
    def _symlink_message(uri: str, parts: Sequence[str], index: int) -> str:
        where = f"{OUTPUTS}/" + "/".join(parts[:index + 1]) if index >= 0 else OUTPUTS
        return (f"{redact_uri(uri)}: {where} is a symbolic link; outputs are written only through real "
                "directories under the output directory")

    def _writing_in(self, uri: str, action: Callable[[int, str], _T]) -> _T:
        """`action(directory fd, file name)` for writing `uri`, directories made; OS errors typed.

        Outside a batch scope the fd is closed after. Inside one it is the scope's; when the action fails with
        ENOENT on it (its directory was removed since the scope walked it: nothing can be created in a removed
        directory), the scope's entry is dropped and the action runs once more after a new walk.
        """
        try:
            fd, name, held = self._batch_dir(uri, create=True)
        except OSError as exc:
            raise _os_error(exc, uri) from None
        try:
            return action(fd, name)
        except FileNotFoundError as exc:
            if not held:
                raise _os_error(exc, uri) from None
        except OSError as exc:
            raise _os_error(exc, uri) from None
        finally:
            if not held:
                os.close(fd)
        try:  # the scope's directory is gone: walk (and make it) again
            fd, name, _ = self._batch_dir(uri, create=True, again=True)
            return action(fd, name)
        except OSError as exc:
            raise _os_error(exc, uri) from None

    def write(self, uri: str, data: bytes, content_type: str, *, sweep: bool = False) -> None:
        def replace(fd: int, name: str) -> None:
            temp = write_temp(fd, lambda: f".{name}.{os.urandom(6).hex()}{TEMP_SUFFIX}", data)
            try:
                os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                unlink_quietly(fd, temp)
                raise
            if sweep:
                _sweep_temps(fd, name)

        self._writing_in(uri, replace)

    def stage(self, uri: str, data: bytes, content_type: str, *, tag: str) -> str:
        """Write `data` to a new file `.{name}.{tag}.{random}.sqtmp` beside `uri`, fsync'd; returns its URI."""
        staged_tail(tag)  # a bad tag is refused before any I/O
        temp = self._writing_in(uri, lambda fd, name: write_temp(fd, lambda: f".{name}{staged_tail(tag)}", data))
        return f"{uri.rpartition('/')[0]}/{temp}"

    def promote(self, staged_uri: str, uri: str) -> None:
        """Rename a staged file onto `uri`; quietly nothing when it is gone and `uri` exists (done before).

        In a batch scope a rename that finds nothing in the scope's directory walks again once before it
        concludes so: the directory may have been removed (and made again) since the scope walked it.
        """
        path = path_of(uri)
        directory, name = os.path.split(path)
        prefix, _, staged_name = staged_uri.rpartition("/")
        if prefix != uri.rpartition("/")[0]:  # what `stage` returns shares the URI's prefix: no second resolve then
            staged_dir, staged_name = os.path.split(path_of(staged_uri))
        else:
            staged_dir = directory
        if staged_dir != directory or staged_base(staged_name) != f".{name}":
            raise ValueError(f"{redact_uri(staged_uri)} is not a staged copy of {redact_uri(uri)}")
        for again in (False, True):
            try:
                fd, name, held = self._batch_dir(uri, create=False, again=again, path=path)
            except (FileNotFoundError, NotADirectoryError):
                raise self._nothing_to_promote(staged_uri, uri) from None
            except OSError as exc:
                raise _os_error(exc, uri) from None
            try:
                os.rename(staged_name, name, src_dir_fd=fd, dst_dir_fd=fd)
                return
            except FileNotFoundError:
                if is_regular(fd, name):
                    return
                if not held or again:
                    raise self._nothing_to_promote(staged_uri, uri) from None
            except OSError as exc:
                raise _os_error(exc, uri) from None
            finally:
                if not held:
                    os.close(fd)

    @staticmethod
    def _nothing_to_promote(staged_uri: str, uri: str) -> StorageError:
        return StorageError(f"cannot promote {redact_uri(staged_uri)}: it is gone and {redact_uri(uri)} does not "
                            "exist", transient=False)

    def staged_copies(self, uri: str) -> list[str]:
        """The staged files of `uri` that exist (every attempt's, in its directory)."""
        try:
            fd, name = self._output_dir(uri, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _os_error(exc, uri) from None
        try:  # the walk's fd is an O_PATH one, which cannot be read: open the directory itself through it
            readable = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            try:
                names = os.listdir(readable)
            finally:
                os.close(readable)
        except OSError as exc:
            raise _os_error(exc, uri) from None
        finally:
            os.close(fd)
        folder = uri.rpartition("/")[0]
        return [f"{folder}/{entry}" for entry in names if staged_base(entry) == f".{name}"]

    def discard(self, staged_uri: str) -> None:
        """Remove a staged file; nothing happens when it is already gone."""
        if staged_base(os.path.basename(path_of(staged_uri))) is None:
            raise ValueError(f"{redact_uri(staged_uri)} is not a staged file")
        self.delete(staged_uri)

    def exists(self, uri: str) -> bool:
        path = path_of(uri)
        if self._output_root is not None and self._output_root.parts(path):
            try:
                fd, name = self._output_dir(uri, create=False)
            except (FileNotFoundError, NotADirectoryError):
                return False
            except OSError as exc:
                raise _os_error(exc, uri) from None
            try:
                return is_regular(fd, name)
            finally:
                os.close(fd)
        try:
            fd = self._open_input_file(uri)
        except InputNotFound:
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def delete(self, uri: str) -> None:
        try:
            fd, name = self._output_dir(uri, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise _os_error(exc, uri) from None
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _os_error(exc, uri) from None
        finally:
            os.close(fd)

    # --- listing (last: the method name shadows the builtin inside the class body) -------------------

    def _readable_link(self, path: str) -> bool:
        """Whether a symlink at `path` leads, inside the input roots, to a regular file (what read accepts)."""
        try:
            fd = self._open_input(path, "file://" + path)
        except (JobError, OSError):
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def _files_below(self, dir_fd: int, directory: str, name_prefix: str) -> Iterator[str]:
        """`file://` URIs of the regular files below `dir_fd` (named `directory`), files before subdirectories."""
        readable = os.open(".", LIST_FLAGS, dir_fd=dir_fd)
        try:
            with os.scandir(readable) as scan:  # the kinds are read while the scan's fd is open
                found = sorted((e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                                e.is_symlink()) for e in scan if e.name.startswith(name_prefix))
        finally:
            os.close(readable)
        subdirs = []
        for name, is_dir, is_file, is_link in found:
            path = os.path.join(directory, name)
            if is_dir:
                subdirs.append(name)
            elif name.endswith(TEMP_SUFFIX):
                continue
            elif is_file or (is_link and self._readable_link(path)):
                yield "file://" + path
        for name in subdirs:
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue  # removed, or swapped for a symlink, since it was listed
            try:
                yield from self._files_below(child, os.path.join(directory, name), "")
            finally:
                os.close(child)

    def list(self, prefix_uri: str, *, page_size: int = 1000) -> Iterator[str]:
        path = path_of(prefix_uri)
        located = locate(path, self._listed_roots)
        if located is None:
            raise InputForbidden(f"{redact_uri(prefix_uri)} is outside STYLEQUEUE_INPUT_ROOTS and the output "
                                 "directory")
        root, parts = located
        directory, name_prefix = path, ""
        try:
            try:
                fd = walk(root, parts)
            except (FileNotFoundError, NotADirectoryError):
                if prefix_uri.endswith("/") or not parts:
                    return
                # Like S3, a prefix that is not a directory matches the names that start with it.
                directory, name_prefix = os.path.dirname(path), parts[-1]
                fd = walk(root, parts[:-1])
        except (FileNotFoundError, NotADirectoryError):
            return
        except SymlinkFound:
            raise InputForbidden(f"{redact_uri(prefix_uri)} passes through a symbolic link") from None
        except OSError as exc:
            raise _os_error(exc, prefix_uri) from None
        try:
            yield from self._files_below(fd, directory, name_prefix)
        finally:
            os.close(fd)
