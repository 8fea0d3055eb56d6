"""Opening paths below a root without ever following a symbolic link, and with no check to race.

A walk opens the root by its resolved path, then each component with O_NOFOLLOW relative to its
parent's directory fd; what a caller then does (open, create, rename, unlink) it does relative to the
last directory's fd. So what is checked is what is used: a directory swapped for a symlink at any
moment makes the walk fail (or, if the walk already holds it, keeps working in the directory it
holds), never lands it outside. `files.py` builds reads, writes and listings on this.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# O_PATH (Linux): a walk needs search permission on a directory, as a path lookup does, not read permission.
DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # reopens "." of a walked directory to read it
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _before_open(root: str, parts: Sequence[str], index: int) -> None:
    """Called by every walk just before it opens directory `parts[index]` below `root`; does nothing.

    Tests replace it to swap a directory for a symlink at exactly that moment, the race a walk must survive.
    """


@dataclass(frozen=True)
class Root:
    """A directory paths are confined to: `named` as configured (absolute), `real` resolved once."""

    named: str
    real: str

    @classmethod
    def of(cls, path: str) -> Root:
        named = os.path.abspath(path)
        return cls(named, os.path.realpath(named))

    def parts(self, path: str) -> list[str] | None:
        """The components of absolute `path` below this root ([] for the root itself); None when outside."""
        for base in (self.named, self.real):
            if path == base:
                return []
            prefix = base.rstrip("/") + "/"
            if path.startswith(prefix):
                return path[len(prefix):].split("/")
        return None


def locate(path: str, roots: Sequence[Root]) -> tuple[Root, list[str]] | None:
    """The most specific root holding `path`, and the components below it."""
    best: tuple[Root, list[str]] | None = None
    for root in roots:
        parts = root.parts(path)
        if parts is not None and (best is None or len(parts) < len(best[1])):
            best = root, parts
    return best


class SymlinkFound(Exception):
    """A walk met a symbolic link at `parts[index]`; `target` is its text when the walk was asked to read it."""

    def __init__(self, index: int, target: str | None) -> None:
        super().__init__(index)
        self.index = index
        self.target = target


def is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def is_regular(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def open_root(root: Root, *, create: bool) -> int:
    try:
        return os.open(root.real, DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            raise
    except NotADirectoryError:
        if os.path.islink(root.real):  # replaced by a symlink since it was resolved
            raise SymlinkFound(-1, None) from None
        raise
    os.makedirs(root.real, exist_ok=True)  # the root and what is above it are the operator's to place
    return open_root(root, create=False)


def _open_dir_at(dir_fd: int, name: str, *, create: bool) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, dir_fd=dir_fd)
    except FileExistsError:
        pass  # another writer made it meanwhile (or put a symlink there: the open below refuses that)
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def walk(root: Root, parts: Sequence[str], *, create: bool = False, read_links: bool = False) -> int:
    """An fd of the directory `root/parts...`, opened one component at a time, never through a symlink.

    Raises SymlinkFound where a component is one; FileNotFoundError or NotADirectoryError where a component
    is missing or not a directory (`create` makes missing directories instead).
    """
    fd = open_root(root, create=create)
    try:
        for index, name in enumerate(parts):
            _before_open(root.real, parts, index)
            try:
                child = _open_dir_at(fd, name, create=create)
            except NotADirectoryError:
                # O_DIRECTORY|O_NOFOLLOW fails on a symlink with ENOTDIR, as on a file: tell them apart.
                if not is_symlink(fd, name):
                    raise
                raise SymlinkFound(index, os.readlink(name, dir_fd=fd) if read_links else None) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def follow(root: Root, parts: Sequence[str], index: int, target: str) -> str:
    """The path a symlink at `parts[index]` points to, with the components after it appended."""
    base = os.path.join(root.real, *parts[:index])
    # Lexical: `base` was walked without symlinks; the result is walked again from a root, link by link.
    return os.path.normpath(os.path.join(base, target, *parts[index + 1:]))


def write_temp(dir_fd: int, new_name: Callable[[], str], data: bytes) -> str:
    """A new file (named by `new_name()`, retried on a clash) in the directory, holding `data`, fsync'd."""
    for _ in range(16):
        temp = new_name()
        try:
            fd = os.open(temp, _NEW_FLAGS, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            # A job is marked succeeded once its output is in place, so the bytes must survive a crash.
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_quietly(dir_fd, temp)
            raise
        os.close(fd)
        return temp
    raise FileExistsError(errno.EEXIST, "no free temp name")


def unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
