"""One worker process's machinery, wired from Settings: store, storage, models, executor, lease keeper.

Celery tasks (worker/tasks.py) only hand job ids to `WorkerService.accept`; everything after that
happens here and in the modules it wires. A message is acknowledged once its jobs are claimed (a
lease in the job store protects them from then on), so the Celery pool is never tied up by a long
job and an interactive message is always taken promptly. Backpressure: when this process holds more
than `high_water` jobs (about two seconds of its work) it stops consuming `stylequeue.bulk` until it
has worked down to `low_water`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stylequeue.config.settings import Settings
from stylequeue.config.styles import StyleCatalog
from stylequeue.errors import ConfigError
from stylequeue.jobs import Job, RedisJobStore, iso_now
from stylequeue.worker import messages
from stylequeue.worker.batching import BULK, INTERACTIVE

if TYPE_CHECKING:
    from celery import Celery

    from stylequeue.models.registry import LoadedStyle
    from stylequeue.worker.codec import CodecPool
    from stylequeue.worker.execution import JobExecutor
    from stylequeue.worker.inference import InferencePool
    from stylequeue.worker.leases import LeaseKeeper
    from stylequeue.worker.metrics import WorkerMetrics

log = logging.getLogger("stylequeue.worker")

# Backpressure: a worker holds about HOLD_S seconds of claimed jobs, and never more than MAX_HELD.
HOLD_S = 2.0
MAX_HELD = 1024
# The finish rate is re-measured over every RATE_WINDOW_S of busy time (time holding jobs), or over a
# fifth of it once the worker finished min_water jobs in that time.
RATE_WINDOW_S = 0.5


@dataclass
class WorkerOptions:
    """What `stylequeue worker` flags choose; `celery -A stylequeue.worker.app worker` uses the defaults."""

    styles: list[str] | None = None  # preload these; None = every registered style
    threads: int = 0  # job threads (fetch/decode/encode/store); 0 = 2 * max_batch + 2
    codec_processes: int | None = None  # processes decoding/encoding bulk jobs; None: see _start_codec
    models: bool = True  # False: --callbacks-only
    callbacks: bool = True  # False: --no-callbacks
    metrics_port: int | None = None
    lease_s: float = 30.0
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @property
    def queues(self) -> list[str]:
        queues = list(messages.JOB_QUEUES) if self.models else []
        return queues + ([messages.CALLBACK_QUEUE] if self.callbacks else [])


def require_runtime(settings: Settings, styles: list[str] | None) -> list[str]:
    """The runtimes that can serve these styles here (all registered ones for None); a ConfigError of one
    line naming what to install when none can (models/runtimes.py: Paddle is one way, not the only one)."""
    from stylequeue.models.runtimes import serving_runtimes

    catalog = StyleCatalog(settings.styles)
    names = styles if styles is not None else sorted(catalog.all())
    specs = [catalog.get(name) for name in names]  # an unknown name is a configuration error too
    return serving_runtimes(settings.runtime, settings.device, specs, settings.cache_dir)


class WorkerService:
    """Start with `start()`, feed with `accept()`, stop with `stop()`."""

    def __init__(self, settings: Settings, options: WorkerOptions, app: Celery) -> None:
        self.settings = settings
        self.options = options
        self.app = app
        self.worker_id = options.worker_id
        self.store = RedisJobStore.from_url(settings.redis_url, key_prefix=settings.key_prefix,
                                            job_ttl_s=settings.job_ttl_s)
        # The mark follows the worker's speed: about HOLD_S seconds of work, within [min, MAX_HELD].
        # A paused queue takes a moment to resume (a poll cycle, then Celery's intake), so resuming
        # starts at three quarters of the mark, while the worker still holds work for that moment.
        self.min_water = max(4 * settings.max_batch, 2 * messages.BULK_CHUNK_SIZE)
        self.high_water = self.min_water
        self.low_water = self.high_water * 3 // 4
        self._finished = 0
        self._rate = 0.0
        self._rate_base = 0  # jobs finished when the current window began
        self._busy_s = 0.0  # busy seconds in the current window
        self._clock: tuple[float, bool] = (time.monotonic(), False)  # last look: when, and busy then
        self.metrics: WorkerMetrics | None = None
        self.pool: InferencePool | None = None
        self.executor: JobExecutor | None = None
        self.codec: CodecPool | None = None
        self.keeper: LeaseKeeper | None = None
        self._storage: Any = None
        self._consumer: Any = None
        self._bulk_paused = False
        self._flow_lock = threading.Lock()
        self._started_at = time.time()

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> WorkerService:
        from stylequeue.pipeline.storage import Storage
        from stylequeue.worker.leases import LeaseKeeper
        from stylequeue.worker.metrics import WorkerMetrics

        self.store.ping()
        self._check_redis()
        if self.settings.webhook_secret is None and self.options.callbacks:
            log.warning("STYLEQUEUE_WEBHOOK_SECRET is not set: callbacks will be sent unsigned")
        self.metrics = WorkerMetrics()
        if self.options.metrics_port:
            self.metrics.serve(self.options.metrics_port)
            log.info("metrics on :%d/metrics", self.options.metrics_port)
        threads = self.options.threads or min(32, 2 * self.settings.max_batch + 2)
        self._storage = Storage(self.settings, max_pool_connections=max(32, threads + 4))
        if self.options.models:
            self._start_models(threads)
        self.keeper = LeaseKeeper(
            store=self.store, executor=self.executor, worker_id=self.worker_id, lease_s=self.options.lease_s,
            send_job=lambda job_id, priority: messages.send_job(self.app, job_id, priority),
            send_callback=lambda job_id: messages.send_callback(self.app, job_id),
            heartbeat=self._heartbeat,
        ).start()
        return self

    def _start_models(self, threads: int) -> None:
        from stylequeue.worker.execution import JobExecutor
        from stylequeue.worker.inference import InferencePool

        require_runtime(self.settings, self.options.styles)
        from stylequeue.models.registry import ModelRegistry

        warming = self._start_codec()

        catalog = StyleCatalog(self.settings.styles)
        styles = self.options.styles if self.options.styles is not None else sorted(catalog.all())
        for name in styles:
            catalog.get(name)  # an unknown --styles name is a configuration error, before anything loads
        registry = ModelRegistry(catalog, runtime=self.settings.runtime, precision=self.settings.precision,
                                 device=self.settings.device, cache_dir=self.settings.cache_dir,
                                 max_loaded=max(4, len(styles)))
        metrics = self.metrics
        assert metrics is not None
        # On a GPU a max batch left at its default is measured at load (worker/inference.py); a set one wins.
        default_batch = Settings.model_fields["max_batch"].default
        self.pool = InferencePool(
            registry, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms,
            search_batch=self.settings.device != "cpu" and self.settings.max_batch == default_batch,
            timeout_s=self.settings.job_timeout_s, on_loaded=self._published,
            on_batch=lambda style, size, seconds: (metrics.batch_size.labels(style).observe(size),
                                                   metrics.batch_seconds.labels(style).observe(seconds)),
        )
        self.pool.warm(styles)
        if warming is not None:
            warming.join()
        self.executor = JobExecutor(
            store=self.store, storage=self._storage, models=self.pool, worker_id=self.worker_id,
            lease_s=self.options.lease_s, max_input_pixels=self.settings.max_input_pixels,
            job_timeout_s=self.settings.job_timeout_s, threads=threads, group_size=self.settings.max_batch,
            on_finished=self._on_finished,
            on_stage=metrics.observe_stage,
            codec=self.codec,
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

    def attach_consumer(self, consumer: Any) -> None:
        """Called when Celery's consumer is ready: lets backpressure pause and resume the bulk queue."""
        self._consumer = consumer
        self.store.heartbeat(self.worker_id, self._heartbeat())

    def stop(self) -> None:
        """SIGTERM path: finish jobs already started, give back the rest, stop the threads."""
        if self.executor is not None:
            released = self.executor.stop(timeout=max(30.0, self.settings.job_timeout_s))
            for job_id in released:
                job = self.store.get(job_id)
                messages.send_job(self.app, job_id, job.priority)
            if released:
                log.info("gave back %d jobs that had not started", len(released))
        if self.keeper is not None:
            self.keeper.stop()
        if self.pool is not None:
            self.pool.close()
        if self.codec is not None:
            self.codec.close()
        try:
            self.store.forget_worker(self.worker_id)
        except Exception as exc:  # Redis may be gone at shutdown; nothing is lost by skipping this
            log.debug("could not unregister worker: %s", exc)

    # --- intake -----------------------------------------------------------------------------------

    def accept(self, job_ids: list[str], priority: str) -> int:
        if self.executor is None:
            raise ConfigError("this worker serves callbacks only (--callbacks-only); it received a job message")
        untaken = self.executor.accept(job_ids, INTERACTIVE if priority == "interactive" else BULK)
        if untaken:  # shutting down: hand them to another worker rather than acknowledge them away
            for job_id in untaken:
                messages.send_job(self.app, job_id, priority)
        self._flow()
        return len(job_ids) - len(untaken)

    def _flow(self) -> None:
        """Pause the bulk queue at the high-water mark; resume at the low-water mark."""
        if self.executor is None or self._consumer is None:
            return
        inflight = self.executor.inflight()
        with self._flow_lock:
            self._follow_rate(busy=inflight > 0)
            if not self._bulk_paused and inflight >= self.high_water:
                self._bulk_paused = True
            elif self._bulk_paused and inflight <= self.low_water:
                self._bulk_paused = False
            else:
                return
        # Celery's event loop runs its pending callbacks in no particular order (a set), so it is told
        # to reconcile with the wanted state, never to pause or resume: the last one to run is right.
        self._consumer.hub.call_soon(self._apply_flow)

    def _apply_flow(self) -> None:
        """On Celery's event loop: consume from the bulk queue, or not, as `_bulk_paused` now says."""
        consumer = self._consumer
        with self._flow_lock:
            paused = self._bulk_paused
        consuming = consumer.task_consumer.consuming_from(messages.BULK_QUEUE)
        if paused and consuming:
            consumer.cancel_task_queue(messages.BULK_QUEUE)
        elif not paused and not consuming:
            consumer.add_task_queue(messages.BULK_QUEUE)

    def _follow_rate(self, busy: bool) -> None:
        """Re-derive the marks from the jobs finished per busy second, once per RATE_WINDOW_S of it.

        Only time spent holding jobs counts: a worker idle before a burst must not read as a slow one
        (it would then hold the minimum for seconds into the burst). Called on every intake and finish.
        """
        now = time.monotonic()
        last, was_busy = self._clock
        self._clock = (now, busy)
        if was_busy:
            self._busy_s += now - last
        done = self._finished - self._rate_base
        # A full window, or sooner where the evidence is already plain: a fast worker that finished
        # the whole minimum mark within a tenth of a second need not hold the minimum for half a second.
        if self._busy_s < RATE_WINDOW_S and (self._busy_s < RATE_WINDOW_S / 5 or done < self.min_water):
            return
        rate = done / self._busy_s
        self._rate = rate if self._rate == 0 else (self._rate + rate) / 2
        self._busy_s, self._rate_base = 0.0, self._finished
        self.high_water = int(min(MAX_HELD, max(self.min_water, HOLD_S * self._rate)))
        self.low_water = self.high_water * 3 // 4

    def deliver_callback(self, job_id: str) -> None:
        from stylequeue.worker.callbacks import deliver_callback

        secret = self.settings.webhook_secret.get_secret_value() if self.settings.webhook_secret else None
        deliver_callback(self.store, job_id, secret=secret, allow_private=self.settings.allow_private_networks,
                         render=self.public_record)

    def public_record(self, job: Job) -> dict[str, Any]:
        url = None
        if job.state == "succeeded" and job.output_uri.startswith("s3://") and self._storage is not None:
            url = self._storage.presign(job.output_uri, self.settings.output_url_ttl_s)
        return job.to_dict(output_url=url)

    # --- hooks --------------------------------------------------------------------------------------

    def _on_finished(self, job: Job) -> None:
        self._finished += 1
        if self.metrics is not None:
            self.metrics.count_job(str(job.state), job.style)
        if job.callback_url:  # the script that finished the job recorded the callback as pending
            messages.send_callback(self.app, job.id)
        self._flow()

    def _published(self, style: str, loaded: LoadedStyle) -> None:
        info = dict(loaded.info) | {"model": loaded.model, "load_ms": round(loaded.load_ms, 1),
                                    "loaded_at": iso_now()}
        self.store.publish_runtime(style, self.worker_id, info)
        if self.metrics is not None:
            self.metrics.model_load_seconds.labels(style).set(loaded.load_ms / 1000)
        log.info("style %s: runtime %s/%s (%s)", style, info.get("runtime"), info.get("precision"), loaded.model)

    def _heartbeat(self) -> dict[str, Any]:
        self._flow()
        if self._consumer is not None and self.executor is not None:
            self._consumer.hub.call_soon(self._apply_flow)  # cheap, and heals any missed change
        inflight = self.executor.inflight() if self.executor else 0
        if self.metrics is not None:
            self.metrics.inflight.set(inflight)
            for queue in (*messages.JOB_QUEUES, messages.CALLBACK_QUEUE):
                self.metrics.queue_depth.labels(queue).set(self.store.redis.llen(queue))
        return {"device": self.settings.device, "inflight": inflight, "started": self._started_at,
                "ready": self._consumer is not None, "pid": os.getpid(),
                "styles": sorted(self.pool.loaded()) if self.pool else [], "bulk_paused": self._bulk_paused}

    def _check_redis(self) -> None:
        """The job store must keep what it is given (SPEC section 2): warn when it would not."""
        try:
            config = self.store.redis.config_get("appendonly") | self.store.redis.config_get("maxmemory-policy")
            saves = self.store.redis.config_get("save").get("save", "")
        except Exception:  # managed Redis often forbids CONFIG
            return
        if config.get("appendonly") != "yes" and not saves:
            log.warning("Redis persists nothing (no AOF, no RDB saves): a Redis restart loses every job")
        if config.get("maxmemory-policy", "noeviction") != "noeviction":
            log.warning("Redis maxmemory-policy is %s: it may evict job records; use noeviction",
                        config["maxmemory-policy"])
