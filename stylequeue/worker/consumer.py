"""Celery's consumer less native delayed delivery, which stylequeue never uses (`worker_consumer` names it).

Celery sets up RabbitMQ "native delayed delivery" (28 levels of exchanges and queues, and a binding per queue)
as soon as it sees a quorum queue, for countdown/eta messages. stylequeue sends none: retries and callbacks
wait on due sets in the job store (docs/jobs.md). On our direct exchange that setup only logs a warning per
queue at every start, so the step is left out.
"""

from __future__ import annotations

from celery.worker.consumer import Consumer as CeleryConsumer

DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class Consumer(CeleryConsumer):  # type: ignore[misc]  # Celery ships no types
    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps = [step for step in CeleryConsumer.Blueprint.default_steps if step != DELAYED_DELIVERY_STEP]
