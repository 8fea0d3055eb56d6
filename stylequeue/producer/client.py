"""`Client`: where a job is created (docs/python.md). Light: no Paddle, no model, no GPU, no worker code.

A submit validates everything it can without I/O (style in the registry file, URI schemes, a callback URL
that names no private address), writes the job record (on the `due` set, so a message is owed), then sends
a message carrying the job id and drops the due entry. A producer that dies between the two leaves the
message owed, and a worker sends it; a broker that refuses the message undoes the submit (the record is
deleted again) and raises BrokerUnavailable, so a submit either fully happens or leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from stylequeue import broker
from stylequeue.config.settings import Settings, load_settings
from stylequeue.config.styles import StyleCatalog, StyleSpec
from stylequeue.errors import BrokerUnavailable, ConfigError, JobNotFound, StyleQueueError, WaitTimeout
from stylequeue.jobs import Job, JobState, Presence, Priority, RedisJobStore, new_job_id

if TYPE_CHECKING:
    from celery import Celery

    from stylequeue.pipeline.storage import Storage

PRIORITIES = tuple(str(p) for p in Priority)
MAX_METADATA_BYTES = 16384
MAX_DEADLINE_S = 7 * 24 * 3600


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
        self.presence = Presence(self.store)
        self.catalog = StyleCatalog(self.settings.styles)
        self._app: Celery | None = None
        self._storage: Storage | None = None

    # --- lazily built edges -------------------------------------------------------------------------

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = broker.make_celery_app(self.settings)
        return self._app

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            from stylequeue.pipeline.storage import Storage

            self._storage = Storage(self.settings)
        return self._storage

    # --- submitting ---------------------------------------------------------------------------------

    def _validate(self, input_uri: str, style: str, output_uri: str | None, callback_url: str | None,
                  priority: str, metadata: dict[str, Any] | None, deadline_s: float | None) -> StyleSpec:
        from stylequeue.pipeline.storage import check_input_uri, check_output_uri
        from stylequeue.pipeline.storage.netguard import check_callback_url

        spec = self.catalog.get(style)
        if priority not in PRIORITIES:
            raise ConfigError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        check_input_uri(input_uri, self.settings)
        if output_uri is not None:
            check_output_uri(output_uri, self.settings)
        if callback_url is not None:
            if urlparse(callback_url).scheme not in ("http", "https"):
                raise ConfigError(f"callback URL must be http(s)://, got {callback_url!r}")
            check_callback_url(callback_url, allow_private=self.settings.allow_private_networks)
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise ConfigError("metadata must be a JSON object (a dict)")
            try:
                size = len(json.dumps(metadata))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"metadata is not JSON-serialisable: {exc}") from None
            if size > MAX_METADATA_BYTES:
                raise ConfigError(f"metadata is {size} bytes of JSON; at most {MAX_METADATA_BYTES}")
        if deadline_s is not None and not 0 < deadline_s <= MAX_DEADLINE_S:
            raise ConfigError(f"deadline must be between 0 and {MAX_DEADLINE_S} seconds, got {deadline_s!r}")
        return spec

    def _new_job(self, spec: StyleSpec, input_uri: str, output_uri: str | None, callback_url: str | None,
                 priority: str, metadata: dict[str, Any] | None, tenant: str | None = None) -> Job:
        job_id = new_job_id()
        return Job(
            id=job_id,
            style=spec.name,
            input_uri=input_uri,
            output_uri=output_uri or default_output_uri(self.settings.storage_url, spec, job_id),
            priority=Priority(priority),
            callback_url=callback_url,
            metadata=dict(metadata or {}),
            tenant=tenant,
        )

    def check_submit(self, input_uri: str, style: str, callback_url: str | None = None,
                     output_uri: str | None = None, priority: str = "interactive",
                     metadata: dict[str, Any] | None = None, deadline_s: float | None = None) -> None:
        """Raise what `submit` would raise for these arguments, creating nothing (all-or-nothing batches)."""
        self._validate(input_uri, style, output_uri, callback_url, priority, metadata, deadline_s)

    def submit(self, input_uri: str, style: str, callback_url: str | None = None, output_uri: str | None = None,
               priority: str = "interactive", idempotency_key: str | None = None,
               metadata: dict[str, Any] | None = None, deadline_s: float | None = None, *,
               tenant: str | None = None, output_prefix: str | None = None) -> Job:
        """Create one job and enqueue it. With an `idempotency_key` seen within the job TTL, return that job.

        `deadline_s`: the job must start within that many seconds of now, else it ends `cancelled` with error
        `expired` and never reaches the model. `tenant` is for the HTTP gateway: the tenant the job belongs to;
        `output_prefix` (the gateway's `{tenant outputs}{style}/`), when no `output_uri` is given, places the
        output at `{prefix}{job_id}.{ext}` instead of under the storage URL.
        Raises RedisUnavailable (the job store) or BrokerUnavailable (the broker; the submit is undone).
        """
        spec = self._validate(input_uri, style, output_uri, callback_url, priority, metadata, deadline_s)
        job = self._new_job(spec, input_uri, output_uri, callback_url, priority, metadata, tenant)
        if output_uri is None and output_prefix is not None:
            from stylequeue.pipeline.storage import check_output_prefix

            check_output_prefix(output_prefix, self.settings)
            job.output_uri = f"{output_prefix.rstrip('/')}/{job.id}.{spec.extension}"
        created = self.store.create(job, idempotency_key, deadline_s=deadline_s)
        if created.created:
            self._send_or_undo(lambda: broker.send_job(self.app, job.id, job.priority), [job], created.token)
        return created.job

    def prepare_many(self, input_uris: Sequence[str], style: str, *, callback_url: str | None = None,
                     output_prefix: str | None = None, priority: str = "bulk",
                     metadata: dict[str, Any] | None = None, output_uris: Sequence[str] | None = None,
                     deadline_s: float | None = None, tenant: str | None = None) -> list[Job]:
        """The jobs `submit_many` would create, checked and with their ids, created nowhere yet (see `enqueue`)."""
        if output_uris is not None and len(output_uris) != len(input_uris):
            raise ConfigError(f"{len(output_uris)} output URIs for {len(input_uris)} inputs: give one per input")
        if not input_uris:
            return []
        spec = self._validate(input_uris[0], style, None, callback_url, priority, metadata, deadline_s)
        from stylequeue.pipeline.storage import check_input_uri, check_output_prefix, check_output_uri

        if output_prefix is not None:
            check_output_prefix(output_prefix, self.settings)
        jobs: list[Job] = []
        for index, uri in enumerate(input_uris):
            check_input_uri(uri, self.settings)
            output_uri = output_uris[index] if output_uris is not None else None
            if output_uri is not None:
                check_output_uri(output_uri, self.settings)
            job = self._new_job(spec, uri, output_uri, callback_url, priority, metadata, tenant)
            if output_uri is None and output_prefix is not None:
                job.output_uri = f"{output_prefix.rstrip('/')}/{job.id}.{spec.extension}"
            jobs.append(job)
        return jobs

    def enqueue(self, jobs: Sequence[Job], *, deadline_s: float | None = None) -> list[Job]:
        """Create prepared jobs (one script call per 1,024) and send their messages (bulk: one per chunk)."""
        for start in range(0, len(jobs), 8 * broker.BULK_CHUNK_SIZE):
            batch = list(jobs[start:start + 8 * broker.BULK_CHUNK_SIZE])
            token = self.store.create_many(batch, deadline_s=deadline_s)
            by_priority: dict[Priority, list[str]] = {}
            for job in batch:
                by_priority.setdefault(job.priority, []).append(job.id)

            def send(groups: dict[Priority, list[str]] = by_priority) -> None:
                for priority, ids in groups.items():
                    broker.send_jobs(self.app, ids, priority)

            self._send_or_undo(send, batch, token)
        return list(jobs)

    def submit_many(self, input_uris: Sequence[str], style: str, *, callback_url: str | None = None,
                    output_prefix: str | None = None, priority: str = "bulk",
                    metadata: dict[str, Any] | None = None, output_uris: Sequence[str] | None = None,
                    deadline_s: float | None = None) -> list[Job]:
        """Create many jobs with one Redis round trip per 1,024 and one message per chunk of bulk jobs.

        `output_prefix` (e.g. `s3://out/ink/`) places outputs at `{prefix}{job_id}.{ext}`; by default they go
        under the storage URL like single submits. `output_uris`, one per input, names each output exactly
        instead (what `stylequeue bulk` uses, so a rerun overwrites rather than duplicates).
        """
        jobs = self.prepare_many(input_uris, style, callback_url=callback_url, output_prefix=output_prefix,
                                 priority=priority, metadata=metadata, output_uris=output_uris,
                                 deadline_s=deadline_s)
        return self.enqueue(jobs, deadline_s=deadline_s)

    def _send_or_undo(self, send: Callable[[], None], jobs: Sequence[Job], token: int) -> None:
        """Send messages and drop the jobs' due entries; if the broker refuses, undo the jobs and raise."""
        try:
            send()
        except Exception as exc:  # kombu raises many connection error types
            try:
                self.store.discard_unsent(jobs)
            except StyleQueueError:  # the store is away too: the jobs stay owed, and a worker sends them
                pass
            raise BrokerUnavailable(
                f"cannot reach the broker at {_redact(self.settings.effective_broker_url)}: {exc}; nothing was "
                "submitted; check STYLEQUEUE_BROKER_URL (or STYLEQUEUE_REDIS_URL) and that the server is running"
            ) from exc
        try:
            self.store.dispatched([job.id for job in jobs], token)
        except StyleQueueError:  # the message went out; a worker would only send a harmless duplicate later
            pass

    # --- reading ------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job's current record; raises JobNotFound."""
        return self.store.get(job_id)

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        return self.store.get_many(job_ids)

    def wait(self, job_id: str, timeout: float | None = 60, *, poll_s: float = 0.5) -> Job:
        """Block until the job is finished and return it; raises WaitTimeout (a TimeoutError).

        When it times out with no live worker, the message says so.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            job = self.store.get(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                hint = "" if self.presence.workers() else "; no worker is consuming (none sent a heartbeat lately)"
                raise WaitTimeout(f"job {job_id} still {job.state} after {timeout:g} s{hint}")
            pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 1.5, poll_s)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; on a finished job change nothing. Returns the record."""
        while True:
            job = self.store.get(job_id)
            if job.finished:
                return job
            moved = self.store.transition(job_id, job.state, JobState.CANCELLED)
            if moved:
                if moved.callback_token:
                    try:
                        broker.send_callback(self.app, job_id, moved.callback_token)
                    except Exception:  # owed on the outbox: a worker sends it when its lease ends
                        pass
                return self.store.get(job_id)

    def to_json(self, job: Job) -> dict[str, Any]:
        """The public record with a fresh presigned `output_url` for a succeeded s3:// output."""
        url = None
        if job.state == JobState.SUCCEEDED and job.output_uri.startswith("s3://"):
            try:
                url = self.storage.presign(job.output_uri, self.settings.output_url_ttl_s)
            except Exception:  # e.g. boto3 without credentials: the record is still worth showing, unlinked
                url = None
        return job.to_dict(output_url=url)

    def styles(self) -> list[dict[str, Any]]:
        """Registered styles, each with the runtime every live worker chose for it."""
        from stylequeue.config.styles import model_label

        runtimes = self.presence.runtimes()
        live = self.presence.workers()
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
        self.store.close()
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
