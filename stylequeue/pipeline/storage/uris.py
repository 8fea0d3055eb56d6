"""URI text: the scheme, the shape checks every URI passes, joining, and redaction for messages.

Stdlib only and no I/O: producers, every backend and the network guard use it.
`redact_uri` is the one way a URI or URL enters an error message or a log line: no userinfo, and for
http(s) (and anything else with a query) no query string or fragment, since presigned URLs and callback
tokens live there. `s3://` and `file://` URIs name keys and paths literally (`?` is part of the key), so
only their userinfo is dropped.
"""

from __future__ import annotations

import os
import re

from stylequeue.errors import InputForbidden

INPUT_SCHEMES = ("file", "s3", "http", "https")
OUTPUT_SCHEMES = ("file", "s3")
MAX_URI_CHARS = 4096
# Every temporary object (a write in progress, a staged attempt) ends so; listings skip these names.
TEMP_SUFFIX = ".sqtmp"
_TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# A staged object's name: the name it stands in for (or `.name` for files), the attempt's tag, random hex.
_STAGED_RE = re.compile(r"(?P<base>.+)\.[A-Za-z0-9_-]{1,32}\.[0-9a-f]{12}" + re.escape(TEMP_SUFFIX))
_LITERAL_SCHEMES = frozenset({"file", "s3"})
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def redact_uri(uri: str) -> str:
    """`uri` fit for a message: `https://u:p@h/x?X-Amz-Signature=...` -> `https://h/x`."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return _drop_query(uri)
    if scheme.lower() not in _LITERAL_SCHEMES:
        rest = _drop_query(rest)
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def _drop_query(text: str) -> str:
    return text.split("#", 1)[0].split("?", 1)[0]


def split_uri(uri: str) -> tuple[str, str]:
    """(lower-case scheme, the rest after '://') of a URI that passes the shape checks; else InputForbidden."""
    if len(uri) > MAX_URI_CHARS:
        raise InputForbidden(f"URI is {len(uri)} characters long, more than {MAX_URI_CHARS}")
    if _CONTROL_RE.search(uri):
        raise InputForbidden("URI contains control characters")
    scheme, sep, rest = uri.partition("://")
    if not sep or not _SCHEME_RE.match(scheme):
        raise InputForbidden(f"{redact_uri(uri)!r} is not a URI: expected file://, s3://, http:// or https://")
    return scheme.lower(), rest


def join_uri(prefix: str, *parts: str) -> str:
    """`prefix` and `parts` joined by single slashes: join_uri("s3://b/out/", "ink", "j_1.jpg")."""
    scheme, rest = split_uri(prefix)
    absolute = scheme == "file" and rest.startswith("/")
    base = f"{scheme}://" + ("/" if absolute and not rest.strip("/") else "") + rest.rstrip("/")
    tail = "/".join(part.strip("/") for part in parts if part.strip("/"))
    if not tail:
        return base
    return base + tail if base.endswith("/") else f"{base}/{tail}"


def staged_tail(tag: str) -> str:
    """`.{tag}.{random}.sqtmp`: what a staged copy's name adds to the name it stands in for."""
    if not _TAG_RE.match(tag):
        raise ValueError(f"attempt tag {tag!r} must be 1 to 32 letters, digits, '-' or '_'")
    return f".{tag}.{os.urandom(6).hex()}{TEMP_SUFFIX}"


def staged_base(staged: str) -> str | None:
    """The name a staged copy's name was made from (`staged_tail`'s inverse), or None if it is none."""
    match = _STAGED_RE.fullmatch(staged)
    return match["base"] if match else None
