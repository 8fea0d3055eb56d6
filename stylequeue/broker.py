"""What travels over the broker, and the Celery app that carries it. Producers and workers both use this module.

A message carries job ids only, and is only a wake-up: the job itself, and the fact that its message is
owed, live in the job store (jobs/). Light: Celery's app and kombu, no worker code.

Queues, each declared bound to the one direct exchange `stylequeue` with its own name as routing key (what
RabbitMQ shows and a consumer of the exchange uses); messages go straight to their queue:
- `stylequeue.interactive`: one job id a message;
- `stylequeue.bulk`: BULK_CHUNK_SIZE job ids a message;
- `stylequeue.callbacks`: one webhook delivery (job id, delivery token) a message.

Choices that matter for not losing jobs:
- JSON only (never pickle): a message is data, not code.
- `task_acks_late` + `task_reject_on_worker_lost`: the worker acknowledges a message once the task returns,
  i.e. once its jobs are claimed (a lease protects them from then on) or handed on; a worker killed before
  that leaves it unacknowledged, and the broker delivers it again.
- Redis `visibility_timeout` = STYLEQUEUE_VISIBILITY_TIMEOUT_S: an unacknowledged message of a dead worker
  comes back after that long (its jobs come back sooner through leases and the due set).
- `queue_order_strategy: priority`: a worker polls `stylequeue.interactive` before `stylequeue.bulk`.
- redis:// and rediss:// brokers use broker_transport.py, kombu's Redis transport fixed so that a Redis
  restart cannot end the worker, and `broker_connection_max_retries=None`: the worker reconnects for ever.
- RabbitMQ (`amqp://`): the three queues are quorum queues, publishes wait for the broker's confirm, and a
  message is acknowledged within moments of its delivery (its jobs claimed), so `consumer_timeout` never
  closes a channel however long a job runs; a dead consumer's unacknowledged messages come back at once.
- Redis through Sentinel (`redis+sentinel://`, config/redis_url.py): kombu's `sentinel://` transport with
  `master_name`, so the broker follows a failover as the job store does.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stylequeue.config.redis_url import kombu_broker
from stylequeue.errors import ConfigError
from stylequeue.jobs.record import Priority

if TYPE_CHECKING:
    from celery import Celery

    from stylequeue.config.settings import Settings

log = logging.getLogger("stylequeue.broker")

EXCHANGE = "stylequeue"
INTERACTIVE_QUEUE = "stylequeue.interactive"
BULK_QUEUE = "stylequeue.bulk"
CALLBACK_QUEUE = "stylequeue.callbacks"
# Queue order is priority order for a worker consuming several of them.
JOB_QUEUES = (INTERACTIVE_QUEUE, BULK_QUEUE)
QUEUE_OF = {Priority.INTERACTIVE: INTERACTIVE_QUEUE, Priority.BULK: BULK_QUEUE}

# One task name per queue, so `celery inspect` and Flower read like the architecture.
INTERACTIVE_TASK = "stylequeue.interactive"
BULK_TASK = "stylequeue.bulk"
CALLBACK_TASK = "stylequeue.callback"

# On RabbitMQ every stylequeue queue is a quorum queue: replicated, so losing a node costs no wake-up (a lost
# one would leave its job waiting for the sweep, several visibility periods). Celery's own control and event
# queues stay classic: they are transient and auto-deleted, which quorum queues cannot be, and carry no job.
QUORUM_ARGUMENTS = {"x-queue-type": "quorum"}

# Bulk jobs travel several to a message: Celery's per-message cost (~1.8 ms) is paid per chunk, and a busy
# worker's event loop, sharing the GIL with its job threads, takes messages in slowly enough to starve it
# between chunks. 64 rather than 32, then 128 rather than 64, each gained ~10% on the null-model bulk path
# (bench/e2e.py, 2-core machines). Claims and leases are per job anyway.
BULK_CHUNK_SIZE = 128


def make_celery_app(settings: Settings, *, prefetch_multiplier: int = 1) -> Celery:
    """A Celery app for the broker in `settings`; tasks register when a worker imports worker.tasks."""
    from celery import Celery
    from kombu.entity import Exchange, Queue

    broker_url, sentinel_options = kombu_broker(settings.effective_broker_url)
    if broker_url.startswith("sentinel://") and not sentinel_options:
        # kombu's own sentinel:// list for the broker names no service: the job store's, if it has one.
        sentinel_options = kombu_broker(settings.redis_url)[1]
        if not sentinel_options:
            raise ConfigError("STYLEQUEUE_BROKER_URL is a sentinel:// list, which names no service: set "
                              "STYLEQUEUE_REDIS_URL to redis+sentinel://:password@host1:26379,host2:26379/mymaster/0 "
                              "(the broker then takes its service), or give the broker that form too")
    app = Celery("stylequeue", broker=broker_url, include=["stylequeue.worker.tasks"])
    transport: dict[str, Any] = {}
    amqp = is_amqp(broker_url)
    if broker_url.startswith(("redis", "rediss", "unix", "sentinel")):
        transport = {
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
            # BRPOP times out this often (kombu's default is 1 s): a queue the worker resumes after
            # backpressure, or a newly added one, is listened to within 0.1 s instead of 1 s.
            "polling_interval": 0.1,
            "global_keyprefix": "",
            **sentinel_options,  # master_name (and the sentinels' password) for a redis+sentinel:// URL
        }
    elif amqp:
        # Quorum queues need publisher confirms for a send to mean "stored" (Celery's quorum queue guide).
        transport = {"confirm_publish": True}
    exchange = Exchange(EXCHANGE, type="direct", durable=True)  # type: ignore[no-untyped-call]
    queues = [Queue(name, exchange, routing_key=name, durable=True,  # type: ignore[no-untyped-call]
                    queue_arguments=QUORUM_ARGUMENTS if amqp else None)
              for name in (INTERACTIVE_QUEUE, BULK_QUEUE, CALLBACK_QUEUE)]
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=prefetch_multiplier,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_queues=queues,
        # Routed by queue only: Celery then publishes to a direct queue through the default exchange, which
        # needs no binding. Over Redis a binding lives in a key; publishes routed through a binding that a
        # Redis without persistence lost (or a FLUSHDB removed) vanish without an error.
        task_routes={
            INTERACTIVE_TASK: {"queue": INTERACTIVE_QUEUE},
            BULK_TASK: {"queue": BULK_QUEUE},
            CALLBACK_TASK: {"queue": CALLBACK_QUEUE},
        },
        task_default_queue=INTERACTIVE_QUEUE,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_pool_limit=32,
        # RabbitMQ: quorum queues take per-consumer prefetch only (Celery then turns global QoS off itself),
        # and a queue Celery creates on its own gets the same type.
        task_create_missing_queues=True,
        task_default_queue_type="quorum" if amqp else "classic",
        worker_detect_quorum_queues=True,
        # Without the native delayed delivery Celery would set up for quorum queues: no countdown/eta here.
        worker_consumer="stylequeue.worker.consumer:Consumer",
    )
    _use_fixed_redis_transport(app, broker_url)
    app.conf.stylequeue_settings = settings
    return app


def _use_fixed_redis_transport(app: Celery, broker_url: str) -> None:
    """Redis restarts: our transport (see broker_transport.py), and reconnect attempts without end."""
    from stylequeue.broker_transport import SENTINEL_TRANSPORT, TRANSPORT

    scheme = broker_url.split("://", 1)[0]
    if scheme not in ("redis", "rediss", "sentinel"):
        return
    # A Sentinel failover is a broker outage for a moment, and the same close path runs after it.
    app.conf.broker_transport = SENTINEL_TRANSPORT if scheme == "sentinel" else TRANSPORT
    # The default of 100 attempts (up to 30 s apart) would end the worker during a long outage.
    app.conf.broker_connection_max_retries = None
    if scheme == "rediss" and "ssl_cert_reqs=" not in broker_url:
        # kombu's default for a bare rediss:// URL, which it applies only to a transport named "rediss".
        log.warning("rediss:// broker URL without ssl_cert_reqs: the broker's certificate is not verified")
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_NONE}


def is_amqp(broker_url: str) -> bool:
    """Whether `broker_url` names RabbitMQ (kombu's amqp transports)."""
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://", "librabbitmq://"))


def send_job(app: Celery, job_id: str, priority: Priority | str) -> None:
    """One job: interactive jobs one per message, a bulk job as a chunk of one."""
    if Priority(priority) is Priority.BULK:
        send_chunk(app, [job_id])
    else:
        app.send_task(INTERACTIVE_TASK, args=[job_id], queue=INTERACTIVE_QUEUE)


def _chunk_repr(job_ids: Sequence[str]) -> str:
    """What Flower and task events show as a chunk's args. Celery would otherwise build a safe repr of
    the whole id list for every message: a tenth of a bulk submit's CPU."""
    return f"[[{job_ids[0]!r}, ... {len(job_ids)} job ids]]" if job_ids else "[[]]"


def send_chunk(app: Celery, job_ids: Sequence[str]) -> None:
    app.send_task(BULK_TASK, args=[list(job_ids)], queue=BULK_QUEUE, argsrepr=_chunk_repr(job_ids))


def send_chunks(app: Celery, job_ids: Sequence[str], chunk_size: int = BULK_CHUNK_SIZE) -> int:
    """Send bulk jobs `chunk_size` to a message over one broker connection; returns messages sent."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for start in range(0, len(job_ids), chunk_size):
            chunk = list(job_ids[start:start + chunk_size])
            app.send_task(BULK_TASK, args=[chunk], queue=BULK_QUEUE, producer=producer, argsrepr=_chunk_repr(chunk))
            sent += 1
    return sent


def send_jobs(app: Celery, job_ids: Sequence[str], priority: Priority | str) -> None:
    """Jobs of one priority: bulk ones in chunks, interactive ones one a message, over one connection."""
    if Priority(priority) is Priority.BULK:
        send_chunks(app, job_ids)
        return
    with app.producer_or_acquire() as producer:
        for job_id in job_ids:
            app.send_task(INTERACTIVE_TASK, args=[job_id], queue=INTERACTIVE_QUEUE, producer=producer)


def send_callback(app: Celery, job_id: str, token: int) -> None:
    """Wake a callback deliverer for `job_id`; `token` is its entry's score on `callbacks:due`."""
    app.send_task(CALLBACK_TASK, args=[job_id, token], queue=CALLBACK_QUEUE)


def queue_depths(app: Celery, queues: Sequence[str] = (*JOB_QUEUES, CALLBACK_QUEUE)) -> dict[str, int]:
    """Messages waiting in each queue (not counting those a worker received and has not acknowledged).

    A passive declare answers with the count on RabbitMQ and Redis alike.
    """
    depths: dict[str, int] = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for queue in queues:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except Exception:  # a queue nobody declared yet holds nothing
                depths[queue] = 0
                channel = connection.channel()  # RabbitMQ closes a channel on a failed passive declare
    return depths
