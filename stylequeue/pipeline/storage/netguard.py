"""The network guard: outbound http(s) only to addresses that were checked, and to exactly those.

Every request resolves its host once, refuses loopback, private, link-local (cloud metadata included),
unspecified, multicast and reserved addresses (also when wrapped in IPv6: IPv4-mapped, NAT64, 6to4)
unless `allow_private`, then connects to the checked address itself while sending the original Host
header and TLS server name. A second DNS answer is never consulted, so DNS rebinding cannot swap in
an internal address between the check and the connection. Redirects are re-checked hop by hop.

Stdlib only (beside the storage package's own light modules): `stylequeue.webhooks` imports this, and
receivers import that.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import quote, urljoin, urlsplit

from stylequeue.errors import InputForbidden, InputTooLarge
from stylequeue.pipeline.storage.uris import redact_uri

ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_LABEL_CHARS = 63
MAX_HOST_CHARS = 253
USER_AGENT = "stylequeue"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SAFE_PATH_CHARS = "/%:@!$&'()*+,;=-._~"
_SAFE_QUERY_CHARS = _SAFE_PATH_CHARS + "?"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def forbidden_reason(address: IPAddress) -> str | None:
    """Why `address` must not be contacted without allow_private ("loopback", ...), or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            # A mapped or NAT64 address reaches the embedded IPv4 host: judge that one alone.
            reason = forbidden_reason(embedded)
            return f"{reason} (as {address})" if reason else None
        if address.sixtofour is not None and forbidden_reason(address.sixtofour):
            return f"{forbidden_reason(address.sixtofour)} (6to4 {address})"
        if address.is_site_local:
            return "site-local"
    checks = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not globally routable", not address.is_global),
    )
    for name, hit in checks:
        if hit:
            return name
    return None


def refusal(address: IPAddress, *, allow_private: bool) -> str | None:
    """The refusal reason for `address` under this policy, or None when it may be contacted."""
    return None if allow_private else forbidden_reason(address)


@dataclass(frozen=True)
class Target:
    """A checked request target: where to connect (`addresses`) and what to say (`host`, `port`, `path`)."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]


def _check_host_name(host: str) -> None:
    """Refuse (InputForbidden) a host that cannot go to DNS: IDNA's rules, 63 characters a label, 253 in all.

    Python raises UnicodeError deep inside getaddrinfo or http.client for such a name; judged here, it
    fails the job (or the callback) at once with a reason, at submit where the producer checks.
    """
    if _literal_address(host) is not None:
        return
    shown = host if len(host) <= 80 else host[:77] + "..."
    try:
        encoded = host.encode("idna")
    except UnicodeError as exc:  # what the idna codec raises (a ValueError)
        raise InputForbidden(f"host name {shown!r} is not a valid DNS name ({exc}): each dot-separated label "
                             f"needs 1 to {MAX_LABEL_CHARS} characters") from None
    if len(encoded.rstrip(b".")) > MAX_HOST_CHARS:
        raise InputForbidden(f"host name {shown!r} is longer than the {MAX_HOST_CHARS} characters DNS allows")


def _literal_address(host: str) -> IPAddress | None:
    """The address `host` spells without DNS (also the legacy IPv4 forms 2130706433 and 0x7f.1), or None."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:
        # The system resolver reads these forms as addresses without asking DNS, so they are literals too.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request path) of an http(s) URL; InputForbidden for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputForbidden(f"malformed URL {redact_uri(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise InputForbidden(f"URL scheme {scheme or '(none)'!r} is not allowed: only http and https")
    if not parts.hostname:
        raise InputForbidden(f"URL {redact_uri(url)!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise InputForbidden("URLs with credentials (user:password@host) are not supported")
    _check_host_name(parts.hostname)
    path = quote(parts.path or "/", safe=_SAFE_PATH_CHARS)
    if parts.query:
        path += "?" + quote(parts.query, safe=_SAFE_QUERY_CHARS)
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), path


def resolve_target(url: str, *, allow_private: bool) -> Target:
    """Resolve `url`'s host once and check every address it resolves to.

    Raises InputForbidden (scheme, malformed URL, a refused address) or socket.gaierror (DNS).
    """
    scheme, host, port, path = _split(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except UnicodeError as exc:  # the IDNA codec; _split's check should have caught it first
        raise InputForbidden(f"host name {host[:80]!r} cannot be encoded for DNS ({exc})") from None
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        text = str(sockaddr[0])
        if text in addresses:
            continue
        # Any refused answer refuses the host: the DNS owner chooses the answers and their order.
        reason = refusal(ipaddress.ip_address(text.split("%", 1)[0]), allow_private=allow_private)
        if reason:
            raise InputForbidden(
                f"host {host} resolves to {text}, a {reason} address; set STYLEQUEUE_ALLOW_PRIVATE_NETWORKS=true "
                f"to allow private networks"
            )
        addresses.append(text)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
    return Target(url=url, scheme=scheme, host=host, port=port, path=path, addresses=tuple(addresses))


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse (InputForbidden) a URL that is not http(s) or whose host resolves to a refused address."""
    resolve_target(url, allow_private=allow_private)


def check_literal_url(url: str, *, allow_private: bool) -> None:
    """`check_url` without DNS (for producers): scheme, shape, and a host that is an IP literal or localhost."""
    _scheme, host, _port, _path = _split(url)
    if allow_private:
        return
    lowered = host.lower().rstrip(".")
    if lowered == "localhost" or lowered.endswith(".localhost"):
        raise InputForbidden(f"host {host} is loopback; set STYLEQUEUE_ALLOW_PRIVATE_NETWORKS=true to allow it")
    address = _literal_address(host)
    if address is None:
        return  # a name: judged by the worker once it resolves it
    reason = forbidden_reason(address)
    if reason:
        raise InputForbidden(
            f"{host} is a {reason} address; set STYLEQUEUE_ALLOW_PRIVATE_NETWORKS=true to allow private networks"
        )


def check_callback_url(url: str, allow_private: bool) -> None:
    """Refuse (InputForbidden) a callback URL at submit, without DNS, as delivery would refuse it.

    http(s) only, no credentials, a valid host name, and no literal loopback, private or other
    internal address (nor `localhost`) unless `allow_private`. Names are judged when delivery resolves them.
    """
    try:
        check_literal_url(url, allow_private=allow_private)
    except InputForbidden as exc:
        raise InputForbidden(f"callback URL refused: {exc.message}") from None


def _connect_any(addresses: tuple[str, ...], port: int, connect_timeout_s: float) -> socket.socket:
    """A TCP connection to the first of `addresses` that answers (all of them already checked)."""
    last: OSError | None = None
    for address in addresses:
        try:
            sock = socket.create_connection((address, port), timeout=connect_timeout_s)
        except OSError as exc:
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    assert last is not None
    raise last


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose Host header names `target.host` but whose socket goes to a checked address."""

    opened_socket: socket.socket | None = None

    def __init__(self, target: Target, connect_timeout_s: float, read_timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=read_timeout_s)
        self._addresses = target.addresses
        self._connect_timeout_s = connect_timeout_s

    def connect(self) -> None:
        self.sock = self.opened_socket = _connect_any(self._addresses, self.port, self._connect_timeout_s)
        self.sock.settimeout(self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As _PinnedHTTPConnection, with TLS verified (and SNI sent) for the URL's host name."""

    opened_socket: socket.socket | None = None

    def __init__(self, target: Target, connect_timeout_s: float, read_timeout_s: float,
                 context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=read_timeout_s, context=context)
        self._addresses = target.addresses
        self._connect_timeout_s = connect_timeout_s
        self._tls = context

    def connect(self) -> None:
        raw = _connect_any(self._addresses, self.port, self._connect_timeout_s)
        raw.settimeout(self.timeout)
        try:
            self.sock = self.opened_socket = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class _Watchdog:
    """Aborts a connection when a total deadline passes (read timeouts alone let a slow drip run forever)."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float | None) -> None:
        self.fired = False
        self._conn = conn
        self._timer: threading.Timer | None = None
        if seconds is not None:
            self._timer = threading.Timer(max(seconds, 0.0), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        # Not conn.sock: http.client drops that once a response that closes the connection is read.
        sock = getattr(self._conn, "opened_socket", None)
        if sock is not None:
            try:
                # The plain socket call: it wakes a blocked reader without touching TLS state.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Response:
    """A response from `request`; read its body with `read`/`read_all`, then close it (or use `with`)."""

    def __init__(self, url: str, raw: http.client.HTTPResponse, conn: http.client.HTTPConnection,
                 watchdog: _Watchdog, total_timeout_s: float | None) -> None:
        self.url = url
        self.status = raw.status
        self.reason = raw.reason
        self.headers = raw.headers
        self._raw = raw
        self._conn = conn
        self._watchdog = watchdog
        self._total_timeout_s = total_timeout_s

    def read(self, amt: int) -> bytes:
        """Up to `amt` bytes of the body (b"" at its end); TimeoutError once the total deadline passed."""
        if self._watchdog.fired:
            raise TimeoutError(f"no complete answer within {self._total_timeout_s} s")
        try:
            data = self._raw.read(amt)
        except (OSError, http.client.HTTPException) as exc:
            if self._watchdog.fired:
                raise TimeoutError(f"no complete answer within {self._total_timeout_s} s") from exc
            raise
        if self._watchdog.fired:
            raise TimeoutError(f"no complete answer within {self._total_timeout_s} s")
        return data

    def read_all(self, max_bytes: int) -> bytes:
        """The whole body, streamed; InputTooLarge as soon as it (or its Content-Length) passes `max_bytes`."""
        declared = self.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
            raise InputTooLarge(f"{redact_uri(self.url)} declares {int(declared)} bytes, more than the limit of "
                                f"{max_bytes}")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = self.read(min(65536, max_bytes + 1 - size))
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > max_bytes:
                raise InputTooLarge(f"{redact_uri(self.url)} sent more than the limit of {max_bytes} bytes")
            chunks.append(chunk)

    def close(self) -> None:
        self._watchdog.cancel()
        self._raw.close()
        self._conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _send(target: Target, method: str, headers: dict[str, str], body: bytes | None, *,
          connect_timeout_s: float, read_timeout_s: float, total_timeout_s: float | None,
          ssl_context: ssl.SSLContext | None) -> Response:
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        context = ssl_context or ssl.create_default_context()
        conn = _PinnedHTTPSConnection(target, connect_timeout_s, read_timeout_s, context)
    else:
        conn = _PinnedHTTPConnection(target, connect_timeout_s, read_timeout_s)
    watchdog = _Watchdog(conn, total_timeout_s)
    try:
        conn.request(method, target.path, body=body, headers=headers)
        raw = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        watchdog.cancel()
        conn.close()
        if watchdog.fired:
            raise TimeoutError(f"no answer from {target.host} within {total_timeout_s} s") from exc
        raise
    if watchdog.fired:  # it fired while connecting, before there was a socket to shut
        raw.close()
        conn.close()
        raise TimeoutError(f"no answer from {target.host} within {total_timeout_s} s")
    return Response(target.url, raw, conn, watchdog, total_timeout_s)


def request(method: str, url: str, *, allow_private: bool, headers: dict[str, str] | None = None,
            body: bytes | None = None, max_redirects: int = 0, connect_timeout_s: float = 5.0,
            read_timeout_s: float = 15.0, total_timeout_s: float | None = None,
            ssl_context: ssl.SSLContext | None = None) -> Response:
    """One guarded HTTP request; GET/HEAD follow up to `max_redirects` redirects, each hop checked anew.

    With `max_redirects=0` a 3xx is returned as it is. Raises InputForbidden (refused URL or address, too
    many redirects), TimeoutError, socket.gaierror and other OSErrors, http.client.HTTPException.
    `total_timeout_s` bounds each hop from connect to the last body byte.
    """
    follow = max_redirects > 0 and method.upper() in ("GET", "HEAD")
    sent = {"User-Agent": USER_AGENT, "Connection": "close"} | (headers or {})
    for _hop in range(max_redirects + 1):
        target = resolve_target(url, allow_private=allow_private)
        started = time.monotonic()
        response = _send(target, method, sent, body, connect_timeout_s=connect_timeout_s,
                         read_timeout_s=read_timeout_s, total_timeout_s=total_timeout_s, ssl_context=ssl_context)
        location = response.headers.get("Location")
        if not follow or response.status not in REDIRECT_STATUSES or not location:
            return response
        response.close()
        url = urljoin(url, location.strip())
        if total_timeout_s is not None:
            total_timeout_s = max(total_timeout_s - (time.monotonic() - started), 0.0)
    raise InputForbidden(f"more than {max_redirects} redirects, last to {redact_uri(url)}")
