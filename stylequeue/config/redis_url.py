"""Where Redis is: a plain URL, or a highly available Redis found through Sentinel (docs/configuration.md).

STYLEQUEUE_REDIS_URL, and STYLEQUEUE_BROKER_URL when it names a Redis, take `redis://`, `rediss://`,
`unix://`, or the sentinel form:

    redis+sentinel://[[user]:password@]host1[:port][,host2[:port]...]/service[/db][?sentinel_password=...]

- `host:port` are the sentinels (port 26379 when left out), comma-separated; any one that answers will do.
- `service` is the name the sentinels monitor the primary under (`sentinel monitor <service> ...`).
- `db` is the database number (default 0).
- the password (and user) are the primary's and its replicas' (`requirepass` / `masterauth`), never the
  sentinels'; `sentinel_password` is for sentinels started with a `requirepass` of their own.

One setting serves both users of Redis. The job store asks a sentinel for the primary's address whenever it
(re)connects (redis-py's `Sentinel.master_for`); the Celery broker, when STYLEQUEUE_BROKER_URL is unset or
in the same form, uses kombu's `sentinel://` transport with `master_name` = service. After a failover both
follow the promoted replica without a restart. TLS to a Sentinel-managed Redis is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis

SENTINEL_SCHEME = "redis+sentinel"
PLAIN_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `redis+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME + "://")


def check_redis_url(url: str) -> str:
    """`url` itself if it is a Redis URL stylequeue can use; ValueError saying what is wrong otherwise."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
        return url
    if not url.startswith(tuple(f"{scheme}://" for scheme in PLAIN_SCHEMES)):
        raise ValueError(f"must start with redis://, rediss://, unix:// or {SENTINEL_SCHEME}://")
    return url


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a `redis+sentinel://` URL; ValueError naming what is missing or malformed."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels = tuple(_host_port(item) for item in hosts.split(",") if item.strip())
    if not sentinels:
        raise ValueError(f"{SENTINEL_SCHEME}:// needs at least one sentinel host, e.g. "
                         f"{SENTINEL_SCHEME}://:password@sentinel1:26379,sentinel2:26379/mymaster/0")
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise ValueError(f"{SENTINEL_SCHEME}:// needs the monitored service name as its path, then an optional "
                         "database: .../mymaster or .../mymaster/0")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"database {path[1]!r} is not a number")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unknown {SENTINEL_SCHEME}:// parameter(s) {', '.join(sorted(unknown))}; "
                         "only sentinel_password is accepted")
    return SentinelURL(sentinels=sentinels, service=unquote(path[0]), db=int(path[1]) if len(path) == 2 else 0,
                       username=unquote(user) or None, password=unquote(password) or None,
                       sentinel_password=query.get("sentinel_password") or None)


def _host_port(item: str) -> tuple[str, int]:
    """`host`, `host:port` or `[v6 address]:port` -> (host, port)."""
    item = item.strip()
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    elif item.count(":") == 1:
        host, _, port = item.partition(":")
    else:
        host, port = item, ""
    if port and not port.isdigit():
        raise ValueError(f"sentinel port {port!r} is not a number")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT


def redis_client(url: str, *, blocking_pool: bool = False, **pool_kwargs: Any) -> redis.Redis:
    """A client for the Redis `url` names; through Sentinel, one that always talks to the current primary.

    `pool_kwargs` (timeouts, `max_connections`, ...) apply to the connections to Redis itself.
    `blocking_pool`: for a plain URL, a pool that waits for a free connection instead of failing (the job
    store's); redis-py has no such pool for Sentinel, where the number of threads bounds the connections.
    """
    if not is_sentinel_url(url):
        pool_class = redis.BlockingConnectionPool if blocking_pool else redis.ConnectionPool
        return redis.Redis(connection_pool=pool_class.from_url(url, **pool_kwargs))
    from redis.sentinel import Sentinel

    parsed = parse_sentinel_url(url)
    pool_kwargs.pop("timeout", None)  # the blocking pool's wait for a free connection
    sentinel_kwargs: dict[str, Any] = {key: value for key, value in pool_kwargs.items() if key.startswith("socket_")}
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed.service, db=parsed.db, username=parsed.username, password=parsed.password, **pool_kwargs)
    return cast(redis.Redis, client)


def kombu_broker(url: str) -> tuple[str, dict[str, Any]]:
    """(broker URL, extra transport options) for Celery: a sentinel form becomes kombu's `sentinel://` list
    with `master_name`; any other URL passes unchanged."""
    if not is_sentinel_url(url):
        return url, {}
    parsed = parse_sentinel_url(url)
    auth = ""
    if parsed.username or parsed.password:
        auth = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password or '', safe='')}@"
    hosts = [f"sentinel://{auth}{_bracketed(host)}:{port}/{parsed.db}" for host, port in parsed.sentinels]
    options: dict[str, Any] = {"master_name": parsed.service}
    if parsed.sentinel_password:
        options["sentinel_kwargs"] = {"password": parsed.sentinel_password}
    return ";".join(hosts), options


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def describe_redis_url(url: str) -> str:
    """Where `url` points, without credentials: for messages and logs."""
    if is_sentinel_url(url):
        parsed = parse_sentinel_url(url)
        hosts = ",".join(f"{_bracketed(host)}:{port}" for host, port in parsed.sentinels)
        return f"{SENTINEL_SCHEME}://{hosts}/{parsed.service}/{parsed.db}"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "?"
    return f"{parts.scheme}://{_bracketed(host)}:{parts.port or 6379}{parts.path or '/0'}"
