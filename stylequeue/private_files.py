"""Files and directories only their owner can read: secrets kept per data directory, and where they live.

`private_dir` makes a directory 0700 (and tightens one that exists); `write_private` replaces a file
atomically with a 0600 one; `kept_secret` returns the secret stored in a file, creating it once, so a
restarted server keeps the secret its clients already hold.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def private_dir(path: Path) -> Path:
    """`path` created if missing, and 0700 either way."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> Path:
    """Replace `path` with a 0600 file holding `text`; no moment exists where it is readable by others."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def new_token() -> str:
    """A random secret that is safe inside a URL's userinfo and a shell word: [A-Za-z0-9_-], 256 bits."""
    return secrets.token_urlsafe(32)


def kept_secret(path: Path, make: Callable[[], str] = new_token) -> str:
    """The secret in `path`; made with `make()` and stored 0600 the first time."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if value:
        os.chmod(path, 0o600)  # a copy restored from a backup may have lost its mode
        return value
    value = make()
    write_private(path, value + "\n")
    return value
