"""One worker process's machinery, wired from Settings: store, storage, models, executor, lease keeper, callbacks.

Celery tasks (worker/tasks.py) only hand job ids (or callback deliveries) to `WorkerService`; everything after
that happens here and in the modules it wires. A job message is acknowledged once its jobs are claimed (a
lease in the job store protects them from then on), so the Celery pool is never tied up by a long job and an
interactive message is always taken promptly. A callback message is acknowledged once its delivery is queued
on the callback threads (its entry in the callbacks outbox protects it). Backpressure (worker/backpressure.py):
when this process holds `high_water` jobs it stops consuming `stylequeue.bulk` until it is down to `low_water`.
A `ConsumptionWatchdog` (worker/consumption.py) restarts Celery's consumer when messages wait for this worker
and it takes none.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stylequeue import broker
from stylequeue.config.settings import Settings
from stylequeue.config.styles import StyleCatalog
from stylequeue.errors import ConfigError, ErrorCode
from stylequeue.jobs import Job, JobState, Presence, Priority, RedisJobStore, iso_now
from stylequeue.worker import heap
from stylequeue.worker.backpressure import Backpressure
from stylequeue.worker.outage import dependency_of

if TYPE_CHECKING:
    from celery import Celery

    from stylequeue.models.registry import LoadedStyle
    from stylequeue.pipeline.storage import Storage
    from stylequeue.worker.callbacks import CallbackDispatcher
    from stylequeue.worker.codec import CodecPool
    from stylequeue.worker.consumption import ConsumptionWatchdog
    from stylequeue.worker.execution import JobExecutor
    from stylequeue.worker.inference import InferencePool
    from stylequeue.worker.leases import LeaseKeeper
    from stylequeue.worker.metrics import WorkerMetrics
    from stylequeue.worker.outage import OutageGuard

log = logging.getLogger("stylequeue.worker")

# The sweep looks at jobs queued with no message owed for this many visibility periods: by then Celery has
# redelivered any message a dead worker held, so a job still waiting had its message lost.
SWEEP_AFTER_VISIBILITY_PERIODS = 3
# A consumer taking nothing while messages wait is restarted after two leases (at least STALL_MIN_S):
# the lease is how long a deployment lets a worker go silent before others step in.
STALL_MIN_S = 10.0
# How often a worker reads the fleet's backlog for its metrics: about one Prometheus scrape interval, so a fleet
# of 100 workers costs Redis ~7 sampled readings a second (jobs/backlog.py).
BACKLOG_EVERY_S = 15.0


@dataclass
class WorkerOptions:
    """What `stylequeue worker` flags choose; `celery -A stylequeue.worker.app worker` uses the defaults."""

    styles: list[str] | None = None  # preload these; None = every registered style
    threads: int = 0  # job threads (fetch/decode/encode/store); 0 = 2 * max_batch + 2
    codec_processes: int | None = None  # processes decoding/encoding bulk jobs; None: see _start_codec
    models: bool = True  # False: --callbacks-only
    callbacks: bool = True  # False: --no-callbacks
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"  # loopback unless the deployment opens it (--metrics-addr)
    lease_s: float = 30.0
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @property
    def queues(self) -> list[str]:
        queues = list(broker.JOB_QUEUES) if self.models else []
        return queues + ([broker.CALLBACK_QUEUE] if self.callbacks else [])


def require_runtime(settings: Settings, styles: list[str] | None) -> list[str]:
    """The runtimes that can serve these styles here (all registered ones for None); a ConfigError of one
    line naming what to install when none can (models/runtimes.py: Paddle is one way, not the only one)."""
    from stylequeue.models.runtimes import serving_runtimes

    catalog = StyleCatalog(settings.styles)
    names = styles if styles is not None else sorted(catalog.own())
    specs = [catalog.get(name) for name in names]  # an unknown name is a configuration error too
    return serving_runtimes(settings.runtime, settings.device, specs, settings.cache_dir)


def callback_secrets(settings: Settings) -> Callable[[Job], str | None]:
    """Which secret signs a job's callback: its gateway tenant's `webhook_secret` when the tenants file
    (STYLEQUEUE_API_TENANTS) gives one, else STYLEQUEUE_WEBHOOK_SECRET (None: unsigned)."""
    default = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    if settings.api_tenants is None:
        return lambda job: default
    from stylequeue.config.tenants import load_tenants

    secrets = {tenant.name: tenant.webhook_secret for tenant in load_tenants(settings.api_tenants)
               if tenant.webhook_secret}
    return lambda job: secrets.get(job.tenant or "", default)


class WorkerService:
    """Start with `start()`, feed with `accept()` and `deliver_callback()`, stop with `stop()`."""

    def __init__(self, settings: Settings, options: WorkerOptions, app: Celery) -> None:
        self.settings = settings
        self.options = options
        self.app = app
        self.worker_id = options.worker_id
        self.store = RedisJobStore.from_url(settings.redis_url, key_prefix=settings.key_prefix,
                                            job_ttl_s=settings.job_ttl_s)
        self.presence = Presence(self.store)
        self.backpressure = Backpressure(max(4 * settings.max_batch, 2 * broker.BULK_CHUNK_SIZE))
        self.metrics: WorkerMetrics | None = None
        self.pool: InferencePool | None = None
        self.executor: JobExecutor | None = None
        self.codec: CodecPool | None = None
        self.keeper: LeaseKeeper | None = None
        self.callbacks: CallbackDispatcher | None = None
        self.guard: OutageGuard | None = None
        self.watchdog: ConsumptionWatchdog | None = None
        self._storage: Storage | None = None
        self._consumer: Any = None
        self._consumed: list[str] = []  # the queues Celery's consumer took at start
        self._sweep_reported = 0
        self._resent_reported = 0
        self._started_at = time.time()
        self._backlog_due = 0.0

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> WorkerService:
        from stylequeue.pipeline.storage import Storage
        from stylequeue.worker.leases import LeaseKeeper
        from stylequeue.worker.metrics import WorkerMetrics

        self.store.ping()
        for warning in self.store.persistence_warnings():
            log.warning("%s", warning)
        if self.settings.webhook_secret is None and self.options.callbacks:
            log.warning("STYLEQUEUE_WEBHOOK_SECRET is not set: callbacks will be sent unsigned")
        self.metrics = WorkerMetrics()
        if self.options.metrics_port:
            self.metrics.serve(self.options.metrics_port, self.options.metrics_addr)
            log.info("metrics on %s:%d/metrics", self.options.metrics_addr, self.options.metrics_port)
        threads = self.options.threads or min(32, 2 * self.settings.max_batch + 2)
        self._storage = Storage(self.settings, max_pool_connections=max(32, threads + 4))
        self._start_guard()
        if self.options.models:
            self._start_models(threads)
        if self.options.callbacks:
            self._start_callbacks()
        self.keeper = LeaseKeeper(
            store=self.store, executor=self.executor, worker_id=self.worker_id, lease_s=self.options.lease_s,
            send_jobs=lambda job_ids, priority: broker.send_jobs(self.app, job_ids, priority),
            send_callback=lambda job_id, token: broker.send_callback(self.app, job_id, token),
            queue_depths=self._job_queue_depths, heartbeat=self._heartbeat,
            sweep_after_s=SWEEP_AFTER_VISIBILITY_PERIODS * self.settings.visibility_timeout_s,
            lost_after_s=max(10.0, 2 * self.options.lease_s),
            probe=self.guard.probe_due if self.guard is not None else None,
        ).start()
        heap.settle()
        return self

    def _start_guard(self) -> None:
        from stylequeue.worker.outage import OutageGuard

        storage = self._storage
        assert storage is not None
        self.guard = OutageGuard(
            outage_s=self.settings.outage_s, probe=storage.probe,
            record_start=lambda dependency, now: self.store.outage_begun(dependency, self.worker_id, now,
                                                                         stale_after_s=2 * self.settings.outage_s),
            record_end=self.store.outage_ended,
            on_change=lambda dependency, down: self._flow(force=True),
            refund=self._refund_outage_attempts)

    def _refund_outage_attempts(self, job_ids: list[str]) -> None:
        refunded = self.store.refund_attempts(job_ids, ErrorCode.STORAGE_ERROR)
        if refunded:
            log.info("gave back the attempts of %d jobs whose failures revealed the outage", refunded)

    def dependency_of(self, uri: str) -> str | None:
        return dependency_of(uri, self.settings.s3_endpoint_url)

    def _output_store_down(self) -> bool:
        """Whether the store every job's output goes to is down: then no job can finish, so take none."""
        return self.guard is not None and self.guard.holds(self.dependency_of(self.settings.storage_url + "/x"))

    def _start_models(self, threads: int) -> None:
        from stylequeue.worker.execution import JobExecutor
        from stylequeue.worker.inference import InferencePool

        require_runtime(self.settings, self.options.styles)
        from stylequeue.models.registry import ModelRegistry

        warming = self._start_codec()

        catalog = StyleCatalog(self.settings.styles)
        styles = self.options.styles if self.options.styles is not None else sorted(catalog.own())
        for name in styles:
            catalog.get(name)  # an unknown --styles name is a configuration error, before anything loads
        registry = ModelRegistry(catalog, runtime=self.settings.runtime, precision=self.settings.precision,
                                 device=self.settings.device, cache_dir=self.settings.cache_dir,
                                 max_loaded=max(4, len(styles)))
        metrics = self.metrics
        assert metrics is not None and self._storage is not None
        # On a GPU a max batch left at its default is measured at load (worker/inference.py); a set one wins.
        default_batch = Settings.model_fields["max_batch"].default
        self.pool = InferencePool(
            registry, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms,
            search_batch=self.settings.device != "cpu" and self.settings.max_batch == default_batch,
            timeout_s=self.settings.job_timeout_s, on_loaded=self._published,
            on_batch=metrics.observe_batch,
        )
        self.pool.warm(styles)
        if warming is not None:
            warming.join()
        self.executor = JobExecutor(
            store=self.store, storage=self._storage, models=self.pool, worker_id=self.worker_id,
            lease_s=self.options.lease_s, max_input_pixels=self.settings.max_input_pixels,
            job_timeout_s=self.settings.job_timeout_s, threads=threads, group_size=self.settings.max_batch,
            on_finished=self._on_finished, on_stage=metrics.observe_stage,
            on_error=lambda exc: metrics.thread_errors.inc(), codec=self.codec,
            guard=self.guard, dependency_of=self.dependency_of,
        )

    def _start_codec(self) -> threading.Thread | None:
        """Start the codec processes for bulk jobs; they warm up while the models load."""
        from stylequeue.worker.codec import CodecPool, default_processes

        processes = self.options.codec_processes
        if processes is None:
            # The pool pays where the model leaves the CPU to us: a GPU, or the null runtime (a model
            # that costs nothing). A CPU model keeps every core busy; there, codec processes only
            # preempt its threads (OpenVINO bf16 at 256 px on 2 cores: 75 ms per image beside two
            # codec processes, 69 ms without), so decoding stays on the job threads.
            model_on_cpu = self.settings.device == "cpu" and self.settings.runtime != "null"
            processes = 0 if model_on_cpu else default_processes()
        if processes < 1:
            return None
        self.codec = CodecPool(self.settings, processes, timeout_s=self.settings.job_timeout_s)
        # A bulk group goes to one codec process: hold enough for a group in each, and a message arriving.
        # Below that, the mark (which follows the finish rate) measures a worker its own floor starved.
        self.backpressure.raise_floor(processes * self.settings.max_batch + broker.BULK_CHUNK_SIZE)

        codec = self.codec

        def warm() -> None:
            try:
                codec.warm()
            except Exception as exc:  # bulk jobs still run, on the job threads
                log.warning("codec processes did not start (%s); decoding on job threads instead", exc)
                self.codec = None
                codec.close()

        thread = threading.Thread(target=warm, name="codec-warm", daemon=True)
        thread.start()
        log.info("%d codec processes for bulk jobs", processes)
        return thread

    def _start_callbacks(self) -> None:
        from stylequeue.worker.callbacks import CallbackDispatcher, deliver_one

        secret_for = callback_secrets(self.settings)
        self.callbacks = CallbackDispatcher(
            lambda delivery: deliver_one(self.store, delivery, secret_for=secret_for,
                                         allow_private=self.settings.allow_private_networks,
                                         render=self.public_record))

    def attach_consumer(self, consumer: Any) -> None:
        """Called when Celery's consumer is ready: lets backpressure pause and resume the bulk queue,
        and the watchdog restart consumption."""
        from stylequeue.worker.consumption import ConsumptionWatchdog

        self._consumer = consumer
        self._consumed = [queue.name for queue in consumer.task_consumer.queues]
        self.presence.heartbeat(self.worker_id, self._heartbeat())
        if self.watchdog is None:
            self.watchdog = ConsumptionWatchdog(
                waiting=self._waiting_queues, restart=lambda: consumer.hub.call_soon(self._restart_consumer),
                stall_s=max(STALL_MIN_S, 2 * self.options.lease_s),
            ).start()

    def stop(self) -> None:
        """SIGTERM path: give back jobs not started (their messages due at once), finish started ones, stop."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.executor is not None:
            released = self.executor.stop(timeout=max(30.0, self.settings.job_timeout_s))
            if released:
                log.info("gave back %d jobs that had not started", len(released))
        if self.keeper is not None:
            self.keeper.stop()
        if self.callbacks is not None:
            self.callbacks.close()
        if self.pool is not None:
            self.pool.close()
        if self.codec is not None:
            self.codec.close()
        try:
            self.presence.forget_worker(self.worker_id)
        except Exception as exc:  # Redis may be gone at shutdown; nothing is lost by skipping this
            log.debug("could not unregister worker: %s", exc)

    # --- intake -----------------------------------------------------------------------------------

    def accept(self, job_ids: list[str], priority: Priority | str) -> int:
        if self.watchdog is not None:
            self.watchdog.received()
        if self.executor is None:
            raise ConfigError("this worker serves callbacks only (--callbacks-only); it received a job message")
        self.executor.accept(job_ids, Priority(priority))
        self._flow()
        return len(job_ids)

    def deliver_callback(self, job_id: str, token: int) -> None:
        """Queue one delivery on the callback threads (never on this Celery thread)."""
        from stylequeue.worker.callbacks import Delivery, host_of

        if self.watchdog is not None:
            self.watchdog.received()
        if self.callbacks is None:
            raise ConfigError("this worker delivers no callbacks (--no-callbacks); it received a callback message")
        try:
            url = self.store.get(job_id).callback_url
        except Exception:  # a gone record is recorded by the delivery itself
            url = None
        if not self.callbacks.submit(Delivery(job_id, int(token)), host_of(url)):
            log.warning("job %s: too many callbacks waiting for %s; this one comes due again later", job_id,
                        host_of(url))

    def public_record(self, job: Job) -> dict[str, Any]:
        url = None
        if job.state == JobState.SUCCEEDED and job.output_uri.startswith("s3://") and self._storage is not None:
            url = self._storage.presign(job.output_uri, self.settings.output_url_ttl_s)
        return job.to_dict(output_url=url)

    # --- flow control -------------------------------------------------------------------------------

    def _flow(self, force: bool = False) -> None:
        """Ask Celery's loop to reconcile the job queues with backpressure and outages when a decision changed."""
        if self.executor is None or self._consumer is None:
            return
        if self.backpressure.update(self.executor.inflight()) or force:
            # Celery's event loop runs pending callbacks in no particular order (a set), so it is told to
            # reconcile with the wanted state, never to pause or resume: the last one to run is right.
            self._consumer.hub.call_soon(self._apply_flow)

    def _apply_flow(self) -> None:
        """On Celery's event loop: consume from each job queue, or not, as backpressure and outages now say.

        The bulk queue pauses at the high-water mark; both pause while the output store is down (no job could
        finish; the jobs held back wait on the due set, and other workers may still take them)."""
        consumer = self._consumer
        for queue, paused in self._job_queues_paused().items():
            consuming = consumer.task_consumer.consuming_from(queue)
            if paused and consuming:
                consumer.cancel_task_queue(queue)
            elif not paused and not consuming:
                consumer.add_task_queue(queue)

    def _job_queues_paused(self) -> dict[str, bool]:
        outage = self._output_store_down()
        return {broker.BULK_QUEUE: self.backpressure.paused or outage, broker.INTERACTIVE_QUEUE: outage}

    def _wanted_queues(self) -> list[str]:
        """The queues this worker should be consuming now: those it started with, less those paused."""
        paused = self._job_queues_paused()
        return [queue for queue in self._consumed if not paused.get(queue, False)]

    def _waiting_queues(self) -> list[str]:
        return [queue for queue, depth in broker.queue_depths(self.app, self._wanted_queues()).items() if depth]

    def _restart_consumer(self) -> None:
        """On Celery's event loop: consume every wanted queue again, then have the consumer reconnect."""
        from stylequeue.worker.consumption import ConsumptionStalled

        for queue in self._wanted_queues():
            if not self._consumer.task_consumer.consuming_from(queue):
                self._consumer.add_task_queue(queue)
        # A connection error out of the event loop takes Celery's own recovery path: the channel is
        # closed (unacknowledged messages go back), a new connection is made, every queue consumed anew.
        raise ConsumptionStalled("consumer restarted: messages waited and none was received")

    # --- hooks --------------------------------------------------------------------------------------

    def _on_finished(self, job: Job, callback_token: int) -> None:
        self.backpressure.finished()
        if self.metrics is not None:
            self.metrics.count_job(str(job.state), job.style)
        if callback_token:  # the finishing script put the callback on the outbox: wake a deliverer now
            try:
                broker.send_callback(self.app, job.id, callback_token)
            except Exception as exc:  # it comes due on the outbox when its lease ends
                log.warning("job %s: could not send its callback message now (%s); it is sent later", job.id, exc)
        self._flow()

    def _published(self, style: str, loaded: LoadedStyle) -> None:
        info = dict(loaded.info) | {"model": loaded.model, "load_ms": round(loaded.load_ms, 1),
                                    "loaded_at": iso_now()}
        self.presence.publish_runtime(style, self.worker_id, info)
        if self.metrics is not None:
            self.metrics.model_load_seconds.labels(style).set(loaded.load_ms / 1000)
        log.info("style %s: runtime %s/%s (%s)", style, info.get("runtime"), info.get("precision"), loaded.model)

    def _publish_backlog(self) -> None:
        """The fleet's backlog for the metrics (jobs/backlog.py), read at most every BACKLOG_EVERY_S."""
        from stylequeue.jobs.backlog import read_backlog

        now = time.monotonic()
        if self.metrics is None or now < self._backlog_due:
            return
        self._backlog_due = now + BACKLOG_EVERY_S
        try:
            backlog = read_backlog(self.store)
        except Exception as exc:  # Redis away for a moment: the last reading stands
            log.debug("backlog unavailable: %s", exc)
            return
        self.metrics.set_backlog({(str(p), style): n for (p, style), n in backlog.waiting.items()}, backlog.running)

    def _job_queue_depths(self) -> dict[Priority, int]:
        depths = broker.queue_depths(self.app, broker.JOB_QUEUES)
        return {priority: depths.get(queue, 0) for priority, queue in broker.QUEUE_OF.items()}

    def _heartbeat(self) -> dict[str, Any]:
        self._flow()
        if self._consumer is not None and self.executor is not None:
            self._consumer.hub.call_soon(self._apply_flow)  # cheap, and heals any missed change
        inflight = self.executor.inflight() if self.executor else 0
        if self.metrics is not None:
            self.metrics.inflight.set(inflight)
            if self.callbacks is not None:
                self.metrics.callbacks_waiting.set(self.callbacks.pending())
            if self.keeper is not None:
                found = self.keeper.sweep_found - self._sweep_reported
                if found:
                    self.metrics.sweep_found.inc(found)
                    self._sweep_reported = self.keeper.sweep_found
                resent = self.keeper.resent - self._resent_reported
                if resent:
                    self.metrics.messages_resent.inc(resent)
                    self._resent_reported = self.keeper.resent
            try:
                for queue, depth in broker.queue_depths(self.app).items():
                    self.metrics.queue_depth.labels(queue).set(depth)
            except Exception as exc:  # the broker away for a moment: the heartbeat still goes out
                log.debug("queue depths unavailable: %s", exc)
            self._publish_backlog()
        return {"device": self.settings.device, "inflight": inflight, "started": self._started_at,
                "ready": self._consumer is not None, "pid": os.getpid(),
                "styles": sorted(self.pool.loaded()) if self.pool else [], "bulk_paused": self.backpressure.paused,
                "dependencies_down": self.guard.down() if self.guard is not None else []}
