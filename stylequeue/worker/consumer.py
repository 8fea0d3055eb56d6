"""Celery's consumer (`worker_consumer` names this one), with two changes.

Reconnecting: after a lost broker Celery's consumer retries at kombu's default intervals, 2 s growing by 2 s to
30 s, so a broker back after a minute's outage waited up to half a minute more for the worker. Here the wait
grows by a second up to RECONNECT_MAX_S: a worker is consuming again within seconds of the broker's return.

Delayed delivery: Celery sets up RabbitMQ "native delayed delivery" (28 levels of exchanges and queues, and a
binding per queue) as soon as it sees a quorum queue, for countdown/eta messages. stylequeue sends none: retries
and callbacks wait on due sets in the job store (docs/jobs.md). On our direct exchange that setup only logs a
warning per queue at every start, so the step is left out.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
RECONNECT_MAX_S = 5.0


class Consumer(CeleryConsumer):  # type: ignore[misc]  # Celery ships no types
    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps = [step for step in CeleryConsumer.Blueprint.default_steps if step != DELAYED_DELIVERY_STEP]

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(conn.ensure_connection, interval_start=1, interval_step=1,
                                                   interval_max=RECONNECT_MAX_S)
        return super().ensure_connected(conn)
