"""The network guard: refused addresses (no traffic needed), pinned connections, TLS names, deadlines."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stylequeue.errors import InputForbidden
from stylequeue.pipeline.storage import netguard

REFUSED = [
    "http://127.0.0.1/",
    "http://127.9.9.9:8080/x",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://100.100.100.200/",  # Aliyun metadata, shared address space
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://[::1]/",
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fd00:ec2::254]/",  # AWS metadata over IPv6
    "http://[ff02::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
    "http://[2002:a00:1::]/",  # 6to4 of 10.0.0.1
    "http://localhost/",
    "http://2130706433/",  # 127.0.0.1 written as one number
    "http://0x7f.1/",
    "https://127.0.0.1:8443/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_private_addresses_are_refused_before_connecting(url: str) -> None:
    with pytest.raises(InputForbidden, match="STYLEQUEUE_ALLOW_PRIVATE_NETWORKS"):
        netguard.check_url(url, allow_private=False)


@pytest.mark.parametrize("url", ["http://8.8.8.8/a.jpg", "https://[2001:4860:4860::8888]/", "http://[::ffff:8.8.8.8]/"])
def test_public_addresses_pass(url: str) -> None:
    netguard.check_url(url, allow_private=False)  # resolving a literal sends nothing


@pytest.mark.parametrize("url", ["ftp://8.8.8.8/a", "file:///etc/passwd", "gopher://8.8.8.8/", "8.8.8.8/x",
                                 "http://user:pw@8.8.8.8/", "http:///nohost", "http://8.8.8.8:99999/"])
def test_other_schemes_and_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(InputForbidden):
        netguard.check_url(url, allow_private=True)


def test_allow_private_lets_loopback_through() -> None:
    netguard.check_url("http://127.0.0.1:1/", allow_private=True)
    netguard.check_url("http://[::1]:1/", allow_private=True)


@pytest.mark.parametrize(("address", "reason"), [
    ("169.254.169.254", "link-local"), ("::ffff:10.0.0.1", "private"), ("fe80::1", "link-local"),
    ("127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("ff02::1", "multicast"), ("fec0::1", "site-local"),
])
def test_refusal_names_the_kind_of_address(address: str, reason: str) -> None:
    found = netguard.forbidden_reason(ipaddress.ip_address(address))
    assert found is not None and found.startswith(reason)


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the Host header it received; /drip sends its body one byte at a time."""

    def do_GET(self) -> None:
        if self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass  # the client gave up, as it should
            return
        body = (self.headers.get("Host") or "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(server: http.server.ThreadingHTTPServer) -> Iterator[int]:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo))


@pytest.fixture
def only_test_server_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Policy as in production (allow_private=False) except for the test server's own 127.0.0.1."""
    real = netguard.refusal

    def refusal(address: netguard.IPAddress, *, allow_private: bool) -> str | None:
        return None if str(address) == "127.0.0.1" else real(address, allow_private=allow_private)

    monkeypatch.setattr(netguard, "refusal", refusal)


def test_connects_to_the_checked_address_not_a_second_dns_answer(
        echo_port: int, only_test_server_allowed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding_dns(host: str, port: object, *args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
        if host != "photos.rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]
        lookups.append(host)
        # First answer passes the check; any later answer points at cloud metadata.
        address = "127.0.0.1" if len(lookups) == 1 else "169.254.169.254"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    url = f"http://photos.rebind.test:{echo_port}/a.jpg"
    with netguard.request("GET", url, allow_private=False) as response:
        assert response.status == 200
        assert response.read_all(1000) == f"photos.rebind.test:{echo_port}".encode()
    assert lookups == ["photos.rebind.test"]


def test_a_slow_drip_is_cut_at_the_total_deadline(echo_port: int) -> None:
    url = f"http://127.0.0.1:{echo_port}/drip"
    with netguard.request("GET", url, allow_private=True, read_timeout_s=5, total_timeout_s=0.5) as response:
        with pytest.raises(TimeoutError):
            response.read_all(10_000)


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for the name `localhost` only (no IP address in it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stylequeue test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, ssl.SSLContext]]:
    ca, cert, key = _tls_files(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    for port in _serve(server):
        yield port, ssl.create_default_context(cafile=str(ca))


def test_tls_is_verified_for_the_url_host_while_connecting_to_its_address(
        tls_server: tuple[int, ssl.SSLContext]) -> None:
    port, client_context = tls_server
    url = f"https://localhost:{port}/"
    with netguard.request("GET", url, allow_private=True, ssl_context=client_context) as response:
        assert response.read_all(1000) == f"localhost:{port}".encode()
    # The same server by address: its certificate does not name 127.0.0.1, so verification must fail.
    with pytest.raises(ssl.SSLCertVerificationError):
        netguard.request("GET", f"https://127.0.0.1:{port}/", allow_private=True, ssl_context=client_context)


def test_a_slow_drip_over_tls_is_cut_too(tls_server: tuple[int, ssl.SSLContext]) -> None:
    port, client_context = tls_server
    url = f"https://localhost:{port}/drip"
    with netguard.request("GET", url, allow_private=True, total_timeout_s=0.5, ssl_context=client_context) as response:
        with pytest.raises(TimeoutError):
            response.read_all(10_000)


def test_the_old_import_path_is_the_same_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import stylequeue.pipeline.netguard as old_path

    # One module under two names: patching either patches what the guard itself calls.
    monkeypatch.setattr(old_path, "refusal", lambda address, *, allow_private: None)
    netguard.check_url("http://127.0.0.1/", allow_private=False)


BAD_HOSTS = [f"{'a' * 64}.example.com", "a..example.com", f"{'abcdefghi.' * 26}com", "\u0080x.example.com"]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_host_names_dns_cannot_carry_are_refused_with_a_reason(host: str) -> None:
    url = f"https://{host}/a.jpg"
    for check in (netguard.check_url, netguard.check_literal_url, netguard.check_callback_url):
        with pytest.raises(InputForbidden, match="host name"):
            check(url, allow_private=True)  # never a UnicodeError, and private networks change nothing
    with pytest.raises(InputForbidden, match="host name"):
        netguard.request("GET", url, allow_private=True)


def test_international_and_63_character_names_pass() -> None:
    for host in ("bücher.example", f"{'a' * 63}.example.com"):
        netguard.check_literal_url(f"https://{host}/a.jpg", allow_private=False)
        netguard.check_callback_url(f"https://{host}/hook", allow_private=False)


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://127.0.0.1:8080/hook", "http://localhost/hook",
                                 "http://[::1]/hook", "http://2130706433/hook", "http://0x7f.1/hook",
                                 "http://169.254.169.254/latest/meta-data/", "ftp://hooks.example.com/x",
                                 "https://user:pw@hooks.example.com/x", "hooks.example.com/x"])
def test_callback_urls_refused_at_submit(url: str) -> None:
    with pytest.raises(InputForbidden, match="callback URL refused"):
        netguard.check_callback_url(url, allow_private=False)


def test_callback_urls_accepted_at_submit() -> None:
    netguard.check_callback_url("https://hooks.example.com/stylequeue?token=abc", allow_private=False)
    netguard.check_callback_url("http://10.0.0.1/hook", allow_private=True)
    netguard.check_callback_url("http://8.8.8.8/hook", allow_private=False)  # a public literal
