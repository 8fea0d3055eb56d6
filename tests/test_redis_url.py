"""The redis+sentinel:// form of STYLEQUEUE_REDIS_URL (config/redis_url.py), followed by store and broker."""

from __future__ import annotations

import pytest

from stylequeue.broker import make_celery_app
from stylequeue.config.redis_url import (
    check_redis_url,
    describe_redis_url,
    kombu_broker,
    parse_sentinel_url,
    redis_client,
)
from stylequeue.config.settings import load_settings
from stylequeue.errors import ConfigError
from stylequeue.jobs import RedisJobStore

URL = "redis+sentinel://:p%40ss@10.0.0.1:26380,10.0.0.2,[fd00::3]:26381/mymaster/3?sentinel_password=sp"


def test_the_sentinel_form_names_sentinels_service_database_and_both_passwords() -> None:
    parsed = parse_sentinel_url(URL)
    assert parsed.sentinels == (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("fd00::3", 26381))
    assert (parsed.service, parsed.db) == ("mymaster", 3)
    assert (parsed.password, parsed.sentinel_password, parsed.username) == ("p@ss", "sp", None)
    assert parse_sentinel_url("redis+sentinel://s1/svc").db == 0


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel:///mymaster", "at least one sentinel"),
    ("redis+sentinel://s1:26379", "service name"),
    ("redis+sentinel://s1/mymaster/zero", "not a number"),
    ("redis+sentinel://s1:port/mymaster", "not a number"),
    ("redis+sentinel://s1/mymaster?master=x", "unknown"),
    ("http://s1/", "must start with"),
])
def test_malformed_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_redis_url(url)


def test_settings_accept_the_form_and_refuse_a_bad_one_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(redis_url=URL).redis_url == URL
    monkeypatch.setenv("STYLEQUEUE_BROKER_URL", "redis+sentinel://s1:26379")
    with pytest.raises(ConfigError, match="STYLEQUEUE_BROKER_URL.*service name"):
        load_settings()
    # kombu's own form lacks the service name (a transport option there): it takes the job store's, and without
    # a sentinel job store to take it from, the error says which form to write instead.
    monkeypatch.setenv("STYLEQUEUE_BROKER_URL", "sentinel://s1:26379;sentinel://s2:26379")
    with pytest.raises(ConfigError, match="names no service.*redis\\+sentinel://"):
        make_celery_app(load_settings())
    settings = load_settings(redis_url=URL)
    app = make_celery_app(settings)
    assert app.conf.broker_url == "sentinel://s1:26379;sentinel://s2:26379"
    assert app.conf.broker_transport_options["master_name"] == "mymaster"


def test_the_broker_becomes_kombus_sentinel_transport_with_the_master_name() -> None:
    url, options = kombu_broker(URL)
    assert url.split(";") == ["sentinel://:p%40ss@10.0.0.1:26380/3", "sentinel://:p%40ss@10.0.0.2:26379/3",
                              "sentinel://:p%40ss@[fd00::3]:26381/3"]
    assert options == {"master_name": "mymaster", "sentinel_kwargs": {"password": "sp"}}
    app = make_celery_app(load_settings(redis_url=URL))
    assert app.conf.broker_url == url
    assert app.conf.broker_transport_options["master_name"] == "mymaster"
    assert app.conf.broker_transport_options["visibility_timeout"] == 600  # still a Redis broker
    assert kombu_broker("amqp://guest@rabbit//") == ("amqp://guest@rabbit//", {})


def test_on_amqp_the_queues_are_quorum_queues_and_publishes_confirmed() -> None:
    app = make_celery_app(load_settings(broker_url="amqp://u:p@rabbit:5672/sq"))
    assert {q.name: q.queue_arguments for q in app.conf.task_queues} == {
        name: {"x-queue-type": "quorum"} for name in ("stylequeue.interactive", "stylequeue.bulk",
                                                      "stylequeue.callbacks")}
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    redis_app = make_celery_app(load_settings(redis_url="redis://127.0.0.1:6379/0"))
    assert all(q.queue_arguments is None for q in redis_app.conf.task_queues)


def test_messages_name_where_redis_is_without_credentials() -> None:
    assert describe_redis_url(URL) == "redis+sentinel://10.0.0.1:26380,10.0.0.2:26379,[fd00::3]:26381/mymaster/3"
    assert describe_redis_url("redis://:secret@db.local:6380/2") == "redis://db.local:6380/2"
    store = RedisJobStore.from_url(URL)
    assert store.redis_description() == describe_redis_url(URL) and "p@ss" not in store.redis_description()


def test_a_client_through_sentinels_that_do_not_answer_is_unavailable_not_a_crash() -> None:
    from stylequeue.embedded import free_port
    from stylequeue.errors import RedisUnavailable

    store = RedisJobStore(redis_client(f"redis+sentinel://127.0.0.1:{free_port()}/mymaster/0",
                                       socket_connect_timeout=0.5, socket_timeout=0.5))
    with pytest.raises(RedisUnavailable):
        store.ping()
