"""Prometheus metrics of one worker process, served on `--metrics-port` (loopback unless `--metrics-addr`).

jobs by final state and style, batch sizes, stage latencies, broker queue depths, the fleet's backlog (jobs
waiting by priority and style, jobs running: what a HorizontalPodAutoscaler can scale on), model load time, and
the errors the worker survived (job threads, the sweep's finds).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    """The worker's metrics in their own registry (several workers in one test process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("stylequeue_jobs_total", "Jobs that reached a final state", ["state", "style"],
                            registry=self.registry)
        self.batch_size = Histogram("stylequeue_batch_size", "Images per inference batch", ["style"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_seconds = Histogram("stylequeue_batch_seconds", "Inference time per batch", ["style"],
                                       buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("stylequeue_stage_seconds", "Time per job stage", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("stylequeue_queue_depth", "Messages waiting in a broker queue", ["queue"],
                                 registry=self.registry)
        # The fleet's backlog in the job store (jobs/backlog.py), the same in every worker: aggregate with max().
        self.jobs_waiting = Gauge("stylequeue_jobs_waiting",
                                  "Jobs queued in the job store, by priority and style (estimated by sampling "
                                  "above 256; the same fleet-wide figure in every worker)",
                                  ["priority", "style"], registry=self.registry)
        self.jobs_running = Gauge("stylequeue_jobs_running", "Jobs running on any worker (fleet-wide)",
                                  registry=self.registry)
        self.inflight = Gauge("stylequeue_jobs_inflight", "Jobs this worker holds", registry=self.registry)
        self.model_load_seconds = Gauge("stylequeue_model_load_seconds", "Time to load and warm a style",
                                        ["style"], registry=self.registry)
        self.thread_errors = Counter("stylequeue_job_thread_errors_total",
                                     "Unexpected errors a job thread survived (its jobs failed or return on lease end)",
                                     registry=self.registry)
        self.sweep_found = Counter("stylequeue_sweep_found_total",
                                   "Queued jobs the sweep found with no message owed (should stay 0)",
                                   registry=self.registry)
        self.messages_resent = Counter("stylequeue_messages_resent_total",
                                       "Jobs whose message the broker lost, sent again by the watch",
                                       registry=self.registry)
        self.callbacks_waiting = Gauge("stylequeue_callbacks_waiting",
                                       "Callback deliveries this worker has taken and not finished",
                                       registry=self.registry)
        # labels() looks a child up under a lock each call; per-job metrics keep their children here.
        self._stages: dict[str, Any] = {}
        self._jobs: dict[tuple[str, str], Any] = {}
        self._waiting: set[tuple[str, str]] = set()

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stages.get(stage)
        if child is None:
            child = self._stages.setdefault(stage, self.stage_seconds.labels(stage))
        child.observe(seconds)

    def observe_batch(self, style: str, size: int, seconds: float) -> None:
        self.batch_size.labels(style).observe(size)
        self.batch_seconds.labels(style).observe(seconds)

    def count_job(self, state: str, style: str) -> None:
        child = self._jobs.get((state, style))
        if child is None:
            child = self._jobs.setdefault((state, style), self.jobs.labels(state, style))
        child.inc()

    def set_backlog(self, waiting: dict[tuple[str, str], float], running: int) -> None:
        """Publish a backlog reading; a (priority, style) no longer waiting reads 0, not its last value."""
        for labels in self._waiting - set(waiting):
            self.jobs_waiting.labels(*labels).set(0)
        for (priority, style), count in waiting.items():
            self.jobs_waiting.labels(priority, style).set(count)
        self._waiting |= set(waiting)
        self.jobs_running.set(running)

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        return start_http_server(port, addr=addr, registry=self.registry)
