"""Tenant scopes: is a URI inside one of a set of prefixes? Judged on one normal form, refusing every trick.

The HTTP gateway confines each tenant's `input_uri`, `output_uri` and uploads to the prefixes of its
tenants file (docs/http.md). Both sides of the comparison go through `normalise`, and a URI that could
mean two things to two programs is refused rather than guessed at:

- scheme: s3, file, http, https only, compared in lower case;
- s3: the bucket exactly, lower-case letters, digits, '.' and '-' (what S3 allows since 2018: a bucket
  spelt with capitals could name the same bucket through a case-folding virtual host);
- file: absolute paths only (`file:///...`): no host, no `file://./relative`, no `~`;
- http(s): a lower-case ASCII host (IDN hosts in their `xn--` form), no user info (`host@evil`), the
  default port dropped, one trailing dot dropped; the query kept, the fragment dropped;
- paths and keys: no empty segment (`//`), no `.` or `..` segment (also as `..;x`), no backslash, no
  percent-encoded dot, slash, backslash or percent (`%2e`, `%2f`, `%5c`, `%25`) and no control,
  format (zero-width, bidi) or compatibility character (fullwidth `／`, `．`, dot leaders: whatever
  Unicode NFKC would rewrite), nor the slash look-alikes NFKC leaves alone (`∕`, `⁄`, `⧸`);
- keys and paths compare case-sensitively, as S3 and POSIX file systems do.

A prefix always ends with '/', so `s3://uploads/miniapp/` never admits `s3://uploads/miniappX/a.jpg`.
Stdlib only and no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from stylequeue.errors import InputForbidden
from stylequeue.pipeline.storage.uris import MAX_URI_CHARS, redact_uri

SCHEMES = ("s3", "file", "http", "https")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST_RE = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_IPV6_RE = re.compile(r"^\[[0-9a-f:.]+\]$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
# Percent-escapes that decode to '.', '/', '\\', '%' or a control character: a server that decodes them
# would see a different path than the one compared here.
_BAD_ESCAPE_RE = re.compile(r"%(?:2e|2f|5c|25|[01][0-9a-f]|7f)", re.IGNORECASE)
_SLASH_LOOKALIKES = frozenset("\u2044\u2215\u29f8\u29f9\u2216\u29f5\u3033\u30fb\uff0f\uff3c\ufe68")


def _refuse(uri: str, why: str) -> InputForbidden:
    return InputForbidden(f"{redact_uri(uri)!r} is refused: {why}")


def _check_characters(uri: str) -> None:
    if len(uri) > MAX_URI_CHARS:
        raise InputForbidden(f"URI is {len(uri)} characters long, more than {MAX_URI_CHARS}")
    for char in uri:
        if char == "\\":
            raise _refuse(uri, "it contains a backslash")
        if char.isascii():
            if ord(char) < 0x20 or ord(char) == 0x7F:
                raise _refuse(uri, "it contains a control character")
            continue
        if unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"):
            raise _refuse(uri, f"it contains the invisible or unassigned character U+{ord(char):04X}")
        if char in _SLASH_LOOKALIKES or unicodedata.normalize("NFKC", char) != char:
            raise _refuse(uri, f"it contains U+{ord(char):04X}, a look-alike of another character")
    if unicodedata.normalize("NFC", uri) != uri:
        raise _refuse(uri, "it is not in Unicode normal form C")
    if _BAD_ESCAPE_RE.search(uri):
        raise _refuse(uri, "it percent-encodes a dot, slash, backslash, percent sign or control character")


def _check_segments(uri: str, path: str, *, prefix: bool) -> None:
    """`path` (a key, or an absolute path without its leading '/') has only plain, non-empty segments."""
    segments = path.split("/")
    if prefix and segments and segments[-1] == "":
        segments = segments[:-1]  # the trailing slash of a prefix (or of a bucket's root)
    for segment in segments:
        if segment == "":
            raise _refuse(uri, "its path has an empty segment ('//')")
        if segment.split(";", 1)[0] in (".", ".."):
            raise _refuse(uri, "its path has a '.' or '..' segment")


def _s3(uri: str, rest: str, *, prefix: bool) -> str:
    bucket, slash, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise _refuse(uri, "it names no valid lower-case bucket (s3://bucket/key)")
    if key:
        _check_segments(uri, key, prefix=prefix)
    elif not prefix:
        raise _refuse(uri, "it names no key (s3://bucket/key)")
    return f"s3://{bucket}/{key}"


def _file(uri: str, rest: str, *, prefix: bool) -> str:
    if not rest.startswith("/"):
        raise _refuse(uri, "file:// URIs must name an absolute path (file:///dir/name)")
    _check_segments(uri, rest[1:], prefix=prefix)
    return f"file://{rest}"


def split_authority(uri: str, scheme: str, rest: str) -> tuple[str, str, str]:
    """(host, port or '', path + query) of an http(s) URI's remainder, in normal form; refuses tricks."""
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:].split("#", 1)[0]
    if "@" in authority:
        raise _refuse(uri, "it has user info before the host ('user@host')")
    if authority.startswith("["):
        host, _, port = authority.partition("]")
        host, port = host + "]", port.removeprefix(":")
    else:
        host, _, port = authority.partition(":")
    host = host.lower()
    if not host.startswith("["):
        host = host[:-1] if host.endswith(".") else host
        if not host.isascii() or not _HOST_RE.match(host):
            raise _refuse(uri, "its host is not a plain ASCII host name (use the xn-- form of a unicode name)")
    elif not _IPV6_RE.match(host):
        raise _refuse(uri, "its host is not a valid IPv6 literal")
    if port and (not _PORT_RE.match(port) or not 0 < int(port) < 65536):
        raise _refuse(uri, "its port is not a number between 1 and 65535")
    port = "" if port in ("", _DEFAULT_PORTS[scheme]) else str(int(port))
    path, question, query = tail.partition("?")
    return host, port, (path or "/") + question + query


def _web(uri: str, scheme: str, rest: str, *, prefix: bool) -> str:
    host, port, tail = split_authority(uri, scheme, rest)
    path = tail.split("?", 1)[0]
    _check_segments(uri, path[1:], prefix=prefix)
    return f"{scheme}://{host}{':' + port if port else ''}{tail}"


def normalise(uri: str, *, prefix: bool = False) -> str:
    """`uri` in the one form prefixes are compared in; InputForbidden for anything ambiguous (see the module).

    With `prefix`, the result ends with '/' (a trailing slash is added when missing).
    """
    _check_characters(uri)
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise _refuse(uri, f"the scheme must be one of {', '.join(SCHEMES)}")
    if prefix and not rest.split("?", 1)[0].endswith("/"):
        rest = rest.split("?", 1)[0] + "/"
    if prefix and scheme in ("http", "https") and "?" in rest:
        raise _refuse(uri, "a prefix has no query")
    if scheme == "s3":
        return _s3(uri, rest, prefix=prefix)
    if scheme == "file":
        return _file(uri, rest, prefix=prefix)
    return _web(uri, scheme, rest, prefix=prefix)


def _path_part(normalised: str) -> str:
    """What a prefix is compared with: an http(s) URI without its query (s3 keys keep '?': it is literal)."""
    if normalised.startswith(("http://", "https://")):
        return normalised.split("?", 1)[0]
    return normalised


def within(normalised: str, prefixes: Sequence[str]) -> bool:
    """Whether a normalised URI lies under one of some normalised prefixes (each ending with '/')."""
    path = _path_part(normalised)
    return any(path.startswith(prefix) and prefix.endswith("/") for prefix in prefixes)


def confine(uri: str, prefixes: Sequence[str], what: str) -> str:
    """`uri` normalised, if it lies under one of `prefixes`; else InputForbidden naming `what` it is."""
    normalised = normalise(uri)
    if not within(normalised, prefixes):
        raise InputForbidden(f"{what} {redact_uri(uri)!r} is outside the prefixes this token may use")
    return normalised


def url_host(url: str) -> str:
    """The normalised host of an http(s) URL (callback hosts); InputForbidden for a tricky or other URL."""
    _check_characters(url)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise _refuse(url, "a callback URL must be http:// or https://")
    return split_authority(url, scheme, rest)[0]


def normal_host(host: str) -> str:
    """A host name as `url_host` gives it (lower case, no trailing dot); ValueError for a non-ASCII name."""
    name = host.strip().lower()
    name = name[:-1] if name.endswith(".") else name
    if not name.isascii() or not (_HOST_RE.match(name) or _IPV6_RE.match(name)):
        raise ValueError(f"{host!r} is not a plain ASCII host name (use the xn-- form of a unicode name)")
    return name


__all__ = ["SCHEMES", "confine", "normal_host", "normalise", "split_authority", "url_host", "within"]
