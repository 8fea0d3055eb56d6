"""`Client`: where a job is created (SPEC section 5). Light: no Paddle, no model, no GPU.

A submit validates everything it can without I/O (style in the registry file, URI schemes), writes
the job record, then sends a message carrying the job id. Records are the truth; messages only wake
workers up, and a lost message is recovered by the leases and the reaper, never by the producer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from stylequeue.config.settings import Settings, load_settings
from stylequeue.config.styles import StyleCatalog, StyleSpec
from stylequeue.errors import ConfigError, JobNotFound, StyleQueueError, WaitTimeout
from stylequeue.jobs import Job, JobState, RedisJobStore, new_job_id
from stylequeue.worker import messages

if TYPE_CHECKING:
    from celery import Celery

    from stylequeue.pipeline.storage import Storage

PRIORITIES = ("interactive", "bulk")
MAX_METADATA_BYTES = 16384


def default_output_uri(storage_url: str, spec: StyleSpec, job_id: str) -> str:
    """`{storage}/outputs/{style}/{job_id}.{ext}`: deterministic, so a retried job overwrites its own output."""
    return f"{storage_url.rstrip('/')}/outputs/{spec.name}/{job_id}.{spec.extension}"


class Client:
    """Submit, inspect, wait for and cancel jobs.

    `Client()` reads settings from the environment / `STYLEQUEUE_CONFIG`; keyword overrides such as
    `Client(redis_url="redis://...")` win over both; `Client(settings)` uses a ready Settings object.
    """

    def __init__(self, settings: Settings | None = None, *, config: str | Path | None = None,
                 **overrides: Any) -> None:
        self.settings = settings if settings is not None else load_settings(config, **overrides)
        self.store = RedisJobStore.from_url(
            self.settings.redis_url, key_prefix=self.settings.key_prefix, job_ttl_s=self.settings.job_ttl_s
        )
        self.catalog = StyleCatalog(self.settings.styles)
        self._app: Celery | None = None
        self._storage: Storage | None = None

    # --- lazily built edges -------------------------------------------------------------------------

    @property
    def app(self) -> Celery:
        if self._app is None:
            from stylequeue.worker.app import make_celery_app

            self._app = make_celery_app(self.settings)
        return self._app

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            from stylequeue.pipeline.storage import Storage

            self._storage = Storage(self.settings)
        return self._storage

    # --- submitting ---------------------------------------------------------------------------------

    def _validate(self, input_uri: str, style: str, output_uri: str | None, callback_url: str | None,
                  priority: str, metadata: dict[str, Any] | None) -> StyleSpec:
        from stylequeue.pipeline.storage import check_input_uri, check_output_uri

        spec = self.catalog.get(style)
        if priority not in PRIORITIES:
            raise ConfigError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        check_input_uri(input_uri, self.settings)
        if output_uri is not None:
            check_output_uri(output_uri, self.settings)
        if callback_url is not None and urlparse(callback_url).scheme not in ("http", "https"):
            raise ConfigError(f"callback URL must be http(s)://, got {callback_url!r}")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise ConfigError("metadata must be a JSON object (a dict)")
            try:
                size = len(json.dumps(metadata))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"metadata is not JSON-serialisable: {exc}") from None
            if size > MAX_METADATA_BYTES:
                raise ConfigError(f"metadata is {size} bytes of JSON; at most {MAX_METADATA_BYTES}")
        return spec

    def _new_job(self, spec: StyleSpec, input_uri: str, output_uri: str | None, callback_url: str | None,
                 priority: str, metadata: dict[str, Any] | None, tenant: str | None = None) -> Job:
        job_id = new_job_id()
        return Job(
            id=job_id,
            style=spec.name,
            input_uri=input_uri,
            output_uri=output_uri or default_output_uri(self.settings.storage_url, spec, job_id),
            priority=priority,
            callback_url=callback_url,
            metadata=dict(metadata or {}),
            tenant=tenant,
        )

    def check_submit(self, input_uri: str, style: str, callback_url: str | None = None,
                     output_uri: str | None = None, priority: str = "interactive",
                     metadata: dict[str, Any] | None = None) -> None:
        """Raise what `submit` would raise for these arguments, creating nothing (all-or-nothing batches)."""
        self._validate(input_uri, style, output_uri, callback_url, priority, metadata)

    def submit(self, input_uri: str, style: str, callback_url: str | None = None, output_uri: str | None = None,
               priority: str = "interactive", idempotency_key: str | None = None,
               metadata: dict[str, Any] | None = None, *, tenant: str | None = None) -> Job:
        """Create one job and enqueue it. With an `idempotency_key` seen within the job TTL, return that job.

        `tenant` is for the HTTP gateway: the id of the API token the job belongs to.
        """
        spec = self._validate(input_uri, style, output_uri, callback_url, priority, metadata)
        job = self._new_job(spec, input_uri, output_uri, callback_url, priority, metadata, tenant)
        job, created = self.store.create(job, idempotency_key)
        if created:
            self.send_or_fail(lambda: messages.send_job(self.app, job.id, priority), [job])
        return job

    def submit_many(self, input_uris: Sequence[str], style: str, *, callback_url: str | None = None,
                    output_prefix: str | None = None, priority: str = "bulk",
                    metadata: dict[str, Any] | None = None,
                    chunk_size: int = messages.BULK_CHUNK_SIZE,
                    output_uris: Sequence[str] | None = None) -> list[Job]:
        """Create many jobs with one pipelined Redis round trip per chunk and one message per chunk.

        `output_prefix` (e.g. `s3://out/ink/`) places outputs at `{prefix}{job_id}.{ext}`; by default they
        go under the storage URL like single submits. `output_uris`, one per input, names each output
        exactly instead (what `stylequeue bulk` uses, so a rerun overwrites rather than duplicates).
        """
        if not input_uris:
            return []
        if output_uris is not None and len(output_uris) != len(input_uris):
            raise ConfigError(f"{len(output_uris)} output URIs for {len(input_uris)} inputs: give one per input")
        spec = self._validate(input_uris[0], style, None, callback_url, priority, metadata)
        from stylequeue.pipeline.storage import check_input_uri, check_output_prefix, check_output_uri

        if output_prefix is not None:
            check_output_prefix(output_prefix, self.settings)
        jobs: list[Job] = []
        for start in range(0, len(input_uris), chunk_size * 8):
            batch: list[Job] = []
            for index, uri in enumerate(input_uris[start:start + chunk_size * 8], start):
                check_input_uri(uri, self.settings)
                output_uri = output_uris[index] if output_uris is not None else None
                if output_uri is not None:
                    check_output_uri(output_uri, self.settings)
                job = self._new_job(spec, uri, output_uri, callback_url, priority, metadata)
                if output_uri is None and output_prefix is not None:
                    job.output_uri = f"{output_prefix.rstrip('/')}/{job.id}.{spec.extension}"
                batch.append(job)
            self.store.create_many(batch)
            ids = [job.id for job in batch]
            if priority == "bulk":
                self.send_or_fail(lambda ids=ids: messages.send_chunks(self.app, ids, chunk_size), batch)
            else:
                self.send_or_fail(lambda ids=ids: [messages.send_job(self.app, i, priority) for i in ids], batch)
            jobs.extend(batch)
        return jobs

    def send_or_fail(self, send: Any, jobs: Sequence[Job]) -> None:
        """Send messages; if the broker refuses, fail the jobs rather than leave them queued forever."""
        try:
            send()
        except Exception as exc:  # kombu raises many connection error types
            for job in jobs:
                self.store.transition(job.id, JobState.QUEUED, JobState.FAILED,
                                      error={"code": "internal", "message": f"could not enqueue: {exc}"})
            from stylequeue.errors import RedisUnavailable

            raise RedisUnavailable(
                f"cannot reach the broker at {_redact(self.settings.effective_broker_url)}: {exc}"
            ) from exc

    # --- reading ------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job's current record; raises JobNotFound."""
        return self.store.get(job_id)

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        return self.store.get_many(job_ids)

    def wait(self, job_id: str, timeout: float | None = 60, *, poll_s: float = 0.5) -> Job:
        """Block until the job is finished and return it; raises WaitTimeout (a TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            job = self.store.get(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} still {job.state} after {timeout:g} s")
            pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 1.5, poll_s)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; on a finished job change nothing. Returns the record."""
        while True:
            job = self.store.get(job_id)
            if job.finished:
                return job
            if self.store.transition(job_id, job.state, JobState.CANCELLED, owner=None):
                if job.callback_url:  # the cancelling script recorded the callback as pending
                    messages.send_callback(self.app, job_id)
                return self.store.get(job_id)

    def to_json(self, job: Job) -> dict[str, Any]:
        """The public record with a fresh presigned `output_url` for a succeeded s3:// output."""
        url = None
        if job.state == JobState.SUCCEEDED and job.output_uri.startswith("s3://"):
            try:
                url = self.storage.presign(job.output_uri, self.settings.output_url_ttl_s)
            except StyleQueueError:
                url = None
        return job.to_dict(output_url=url)

    def styles(self) -> list[dict[str, Any]]:
        """Registered styles, each with the runtime every live worker chose for it."""
        from stylequeue.config.styles import model_label

        runtimes = self.store.runtimes()
        live = self.store.workers()
        out = []
        for name, spec in sorted(self.catalog.all().items()):
            entry = spec.public_dict()
            try:
                entry["model"] = model_label(spec)
            except OSError:
                entry["model"] = None
            entry["workers"] = {w: info for w, info in runtimes.get(name, {}).items() if w in live}
            out.append(entry)
        return out

    def close(self) -> None:
        self.store.redis.close()
        if self._app is not None:
            self._app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


__all__ = ["Client", "JobNotFound", "default_output_uri"]
