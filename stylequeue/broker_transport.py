"""Kombu's Redis transport, closable after Redis went away (docs/jobs.md: outages).

broker.make_celery_app selects it for redis:// and rediss:// brokers (`broker_transport`). It is kombu's
own transport with two changes, for this crash of a worker whose Redis stopped (kombu 5.6 and 5.7 alike):

    CRITICAL celery.worker: Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")

How it happens. On a lost connection Celery's consumer calls `connection.collect()` and then
`connection.close()` (`Consumer.on_connection_error_after_connected`). `collect()` closes every channel,
then detaches the transport from its kombu Connection (`transport.client = None`) whatever happened.
Two channels are open: the task channel (a BRPOP in flight, messages delivered but not acknowledged)
and the remote-control channel (an auto-delete fanout queue). When the remote-control socket reports the
loss first, the task channel's BRPOP reply is still unread, and:
1. closing the task channel reads that reply first (kombu `redis.Channel.close`); the read raises a
   connection error before the channel marks itself closed, and kombu ignores it;
2. `virtual.Transport.close_connection` then closes the channels in a loop that stops at the first
   error: the remote-control channel fails deleting its auto-delete queue, so the task channel, whose
   close would now have gone through, is never closed again;
3. the transport is detached; `connection.close()` closes the task channel once more; this time the
   close gets as far as putting the unacknowledged messages back (`restore_unacked`), which builds a new
   connection pool from `transport.client` (`redis.Channel._connparams`): None, so AttributeError.
   Celery ignores only connection and channel errors there, so it ends the worker.

The changes: `Transport.close_connection` closes every channel even when one fails (step 2), so the task
channel is closed while the transport is still attached; and a channel asked for a new pool once its
transport is gone raises a connection error instead of AttributeError (step 3), which every close and
acknowledge path in kombu and Celery already treats as "broker lost". Messages that could not be put
back stay in Redis's unacked set and return after the visibility timeout, as for a killed worker.

A third change is for speed. kombu builds a new redis-py client object for every command it sends outside
its polling connection (`Channel.conn_or_acquire`): each message taken in (the unacked bookkeeping), each
acknowledgement, each publish and each task event. The clients all share the channel's connection pool, so
nothing is gained by a new one, but building one costs more than the command (redis-py fills a table of
response callbacks per client): about a tenth of a busy worker's CPU. Here the channel keeps one client per
connection pool and hands out that; a redis-py client with a pool is safe to share between threads (each
command takes its own connection from the pool), and a pool kombu replaces (after a fork, on a lost
connection) gets a client of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("stylequeue.broker")

TRANSPORT = "stylequeue.broker_transport:Transport"
SENTINEL_TRANSPORT = "stylequeue.broker_transport:SentinelTransport"


def _guarded_connparams(channel: Any, parent: Any, asynchronous: bool) -> dict[str, Any]:
    transport = channel.connection
    if transport is None or transport.client is None:
        # kombu would read .hostname off None here; callers expect a connection error instead.
        raise RedisConnectionError("broker channel used after its connection was closed")
    params: dict[str, Any] = parent._connparams(channel, asynchronous=asynchronous)
    return params


@contextmanager
def _shared_client(channel: Any, client: Any) -> Iterator[Any]:
    """`client` if given, else the channel's one client on its current connection pool."""
    if client:
        yield client
        return
    pool = channel.pool
    shared = channel.__dict__.get("_stylequeue_client")
    if shared is None or shared.connection_pool is not pool:
        shared = channel._create_client()
        channel._stylequeue_client = shared
    yield shared


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        return _guarded_connparams(self, kombu_redis.Channel, asynchronous)

    def conn_or_acquire(self, client: Any = None) -> Any:
        return _shared_client(self, client)


class SentinelChannel(kombu_redis.SentinelChannel):
    """The same guard for a Redis reached through Sentinel (a failover is a lost connection too)."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        return _guarded_connparams(self, kombu_redis.SentinelChannel, asynchronous)

    def conn_or_acquire(self, client: Any = None) -> Any:
        return _shared_client(self, client)


class Transport(kombu_redis.Transport):
    Channel = Channel

    def close_connection(self, connection: Any) -> None:
        """Close every channel, even when closing one fails (kombu stops at the first failure)."""
        if self.cycle is not None:
            self.cycle.close()  # type: ignore[no-untyped-call]
        for channels in (self._avail_channels, self.channels):
            while channels:
                channel = channels.pop()
                try:
                    channel.close()
                except self.connection_errors + self.channel_errors as exc:
                    log.debug("closing a broker channel on a lost connection: %r", exc)


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
    close_connection = Transport.close_connection
