"""`stylequeue bulk`: restyle every image under a prefix, resumably, with a bounded number of unfinished jobs.

A run is named by (SRC_PREFIX, style, DST_PREFIX). Its record in Redis (jobs/runs.py) maps each source key to
its latest job, written before the job is created, so `--resume` skips sources whose job succeeded, waits for those
still queued or running, and resubmits those that failed, were cancelled or whose record expired.

Outputs are deterministic: `DST_PREFIX/<source key relative to SRC_PREFIX, suffix replaced by the style's
extension>` (see `output_keys`), so a rerun overwrites rather than duplicates. Objects already at an
output key are not looked for: only the run record says what this run made, and an older object there
may come from other weights; it is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from stylequeue import broker
from stylequeue.config.settings import file_uri_path
from stylequeue.errors import ConfigError
from stylequeue.jobs import BulkRunRecord, JobState, RedisJobStore
from stylequeue.jobs.runs import LOCK_TTL_S
from stylequeue.producer.bulk_report import (
    BulkFailure,
    BulkReport,
    print_report,
    progress_bar,
    resume_command,
    write_failures,
)

if TYPE_CHECKING:
    from rich.console import Console

    from stylequeue.pipeline.storage import Storage
    from stylequeue.producer.client import Client

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SUBMIT_BATCH = 1024  # most jobs created per turn of the loop, so finished jobs are counted between turns


def is_image_key(key: str) -> bool:
    """Whether an object key looks like an image by its suffix (case-insensitive)."""
    return posixpath.splitext(key)[1].lower() in IMAGE_SUFFIXES


def output_keys(source_keys: Iterable[str], extension: str) -> dict[str, str]:
    """Each source key's output key: `a/cat.JPG` -> `a/cat.png` for a png style.

    Where sources would share an output (`cat.jpg` and `cat.png`), each of them keeps its own suffix
    (`cat.jpg.png`, `cat.png.png`), so no source's output overwrites another's.
    """
    chosen = {key: posixpath.splitext(key)[0] + "." + extension for key in source_keys}
    while True:
        owners = Counter(chosen.values())
        clashing = [key for key, out in chosen.items() if owners[out] > 1 and out != f"{key}.{extension}"]
        if not clashing:
            return chosen
        for key in clashing:  # keys plus a suffix are distinct, so this ends
            chosen[key] = f"{key}.{extension}"


def normalise_prefix(uri: str) -> str:
    """A prefix as a folder: ending in '/', and for file:// the absolute real path."""
    if uri.startswith("file://"):
        uri = "file://" + os.path.realpath(file_uri_path(uri))
    return uri if uri.endswith("/") else uri + "/"


def run_id(src_prefix: str, style: str, dst_prefix: str) -> str:
    """The run's name in Redis: a hash of its normalised identity."""
    identity = json.dumps([normalise_prefix(src_prefix), style, normalise_prefix(dst_prefix)])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def list_sources(storage: Storage, src_prefix: str, *,
                 every_1000: Callable[[], None] | None = None) -> tuple[dict[str, str], int]:
    """(source key relative to the prefix -> its URI for every image, number of other objects)."""
    sources: dict[str, str] = {}
    ignored = 0
    for count, uri in enumerate(storage.list(src_prefix), 1):
        if every_1000 is not None and count % 1000 == 0:
            every_1000()  # a listing of 100k objects takes longer than the lock lives
        key = uri[len(src_prefix):] if uri.startswith(src_prefix) else ""
        if key and is_image_key(key):
            sources[key] = uri
        else:
            ignored += 1
    return sources, ignored


class _Interrupts:
    """The first Ctrl-C asks the loop to stop after the current step (so what was submitted is recorded)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C stops at once

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


def run_bulk(client: Client, src_prefix: str, *, style: str, dst_prefix: str, resume: bool = False,
             max_in_flight: int = 2000, console: Console | None = None, poll_s: float = 1.0,
             limit: int | None = None, on_progress: Callable[[BulkReport], None] | None = None) -> BulkReport:
    """Restyle every image under `src_prefix` into `dst_prefix`, keeping at most `max_in_flight` jobs unfinished.

    `resume` continues an earlier run of the same (src, style, dst); without it such a run is a ConfigError.
    `limit` submits at most that many jobs this time (the rest waits for a resume). `console` shows a
    progress bar; `on_progress` is called with the live report after every submission and poll.
    Ctrl-C stops submitting and returns a report with `interrupted` set; submitted jobs keep running.
    """
    from stylequeue.pipeline.storage import check_output_prefix

    if max_in_flight < 1:
        raise ConfigError(f"--max-in-flight must be at least 1, got {max_in_flight}")
    spec = client.catalog.get(style)
    src, dst = normalise_prefix(src_prefix), normalise_prefix(dst_prefix)
    if dst.startswith(src):
        raise ConfigError(f"--output {dst} lies inside SRC_PREFIX {src}: outputs would be read back as "
                          "inputs; choose a DST_PREFIX outside it")
    check_output_prefix(dst, client.settings)
    report = BulkReport(run_id(src, spec.name, dst), src, spec.name, dst)
    started = time.monotonic()
    record = BulkRunRecord(client.store, report.run_id)
    record.acquire()
    bar = None
    try:
        earlier = record.describe()
        if earlier is not None and not resume:
            raise ConfigError(f"a bulk run {src} -> {dst} (style {spec.name}) exists ({earlier}): pass --resume "
                              "to continue it, or choose another --output")
        sources, report.ignored = list_sources(client.storage, src, every_1000=record.renew)
        report.total = len(sources)
        outputs = output_keys(sources, spec.extension)
        record.create(report.src_prefix, report.style, report.dst_prefix)
        in_flight: dict[str, str] = {}  # job id -> source key
        todo = sorted(sources)
        if earlier is not None:
            report.resumed = True
            todo = _take_over(client, record, todo, in_flight, report)
        bar = progress_bar(console, len(todo) + len(in_flight))
        with _Interrupts() as interrupts:
            def progress() -> None:
                report.in_flight, report.elapsed_s = len(in_flight), time.monotonic() - started
                if bar is not None:
                    bar.update(bar.task_ids[0], completed=report.succeeded + report.failed,
                               detail=f"submitted {report.submitted} · succeeded {report.succeeded} · failed "
                                      f"{report.failed} · {report.images_per_s:.1f} img/s")
                if on_progress is not None:
                    on_progress(report)

            position = 0
            renewed = time.monotonic()
            while not interrupts.requested:
                if time.monotonic() - renewed > LOCK_TTL_S / 3:  # on every path: a long submit keeps its lock
                    record.renew()
                    renewed = time.monotonic()
                allowed = len(todo) - position
                if limit is not None:
                    allowed = min(allowed, limit - report.submitted)
                room = max_in_flight - len(in_flight)
                # Submit in whole messages where possible (BULK_CHUNK_SIZE jobs travel together).
                step = min(broker.BULK_CHUNK_SIZE, max(1, max_in_flight // 2), allowed)
                if allowed > 0 and room >= step:
                    batch = todo[position:position + min(room, allowed, SUBMIT_BATCH)]
                    position += len(batch)
                    jobs = client.prepare_many([sources[k] for k in batch], spec.name, priority="bulk",
                                               output_uris=[dst + outputs[k] for k in batch],
                                               metadata={"bulk_run": report.run_id})
                    # Intent first: a crash after this leaves ids `--resume` sees (and resubmits if never made).
                    record.add({key: job.id for key, job in zip(batch, jobs, strict=True)})
                    client.enqueue(jobs)
                    in_flight.update((job.id, key) for key, job in zip(batch, jobs, strict=True))
                    report.submitted += len(jobs)
                    progress()
                    continue
                if not in_flight:
                    break
                _collect(client.store, in_flight, sources, dst, outputs, report)
                record.renew()
                renewed = time.monotonic()
                progress()
                if not (allowed > 0 and max_in_flight - len(in_flight) >= step):
                    interrupts.sleep(poll_s)
            report.interrupted = interrupts.requested
            report.not_submitted = len(todo) - position
            progress()
    finally:
        if bar is not None:
            bar.stop()
        record.release()
    return report


def _take_over(client: Client, record: BulkRunRecord, todo: list[str], in_flight: dict[str, str],
               report: BulkReport) -> list[str]:
    """Classify an earlier run's jobs: skip succeeded, wait for unfinished, return what to (re)submit."""
    recorded = record.load()
    known = [key for key in todo if key in recorded]
    states = client.store.states([recorded[key] for key in known])
    resubmit: set[str] = set()
    queued: list[str] = []
    for key, (state, _) in zip(known, states, strict=True):
        job_id = recorded[key]
        if state == JobState.SUCCEEDED:
            report.skipped += 1
        elif state in (JobState.QUEUED, JobState.RUNNING):
            in_flight[job_id] = key
            if state == JobState.QUEUED:
                queued.append(job_id)
        else:  # failed, cancelled, or recorded but never created (a crash before its record was written)
            resubmit.add(key)
    # A queued job's message may have gone where no worker listens (another broker, a queue flushed meanwhile):
    # resuming makes each one due now, so a worker sends it again (a duplicate is dropped at its claim).
    client.store.reschedule_many(queued, 0)
    return [key for key in todo if key not in recorded or key in resubmit]


def _collect(store: RedisJobStore, in_flight: dict[str, str], sources: dict[str, str], dst: str,
             outputs: dict[str, str], report: BulkReport) -> None:
    """Poll the states of unfinished jobs and count the ones that finished."""
    ids = list(in_flight)
    for job_id, (state, error) in zip(ids, store.states(ids), strict=True):
        if state in (JobState.QUEUED, JobState.RUNNING):
            continue
        key = in_flight.pop(job_id)
        if state == JobState.SUCCEEDED:
            report.succeeded += 1
            continue
        if state == JobState.FAILED and error:
            code, message = error.get("code", "internal"), error.get("message", "")
        elif state == JobState.CANCELLED:
            code, message = "cancelled", "the job was cancelled"
        else:
            code, message = "missing", "the job's record disappeared before it finished"
        report.failures.append(BulkFailure(sources[key], dst + outputs[key], job_id, code, message))


__all__ = ["BulkFailure", "BulkReport", "IMAGE_SUFFIXES", "output_keys", "print_report", "resume_command",
           "run_bulk", "write_failures"]
