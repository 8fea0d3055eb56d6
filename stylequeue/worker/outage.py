"""Outages: telling a dependency that is down from a job that is bad (docs/jobs.md: outages).

A job's transient storage error (connection refused, timed out, 5xx) counts against the job only while its
dependency (an object store endpoint, an input host) otherwise works. `OutageGuard` watches those errors per
dependency: once OUTAGE_FAILURES different jobs failed on it in a row, with no success in between, the
dependency is **down** (one job failing again and again is that job's own problem). While it is down
- a job that needs it is handed back to `queued` without spending an attempt (the executor asks `holds`), its
  message due when the dependency is probed next;
- the worker stops taking new jobs if the dependency is one every job needs (the output store);
- the guard probes it with backoff (1 s doubling to 30 s) and declares it **up** at the first answer.
Only after `outage_s` of continuous outage (STYLEQUEUE_OUTAGE_S, counted from when the first worker saw it,
shared through the job store) does the guard stop holding jobs back: they run, spend their attempts and fail
`storage_error`. A job whose own input is missing, corrupt or forbidden fails at once whatever the guard says:
those are not transient errors. Pure: the probe and the clock are passed in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger("stylequeue.worker.outage")

OUTAGE_FAILURES = 3
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 30.0


def dependency_of(uri: str, s3_endpoint: str | None) -> str | None:
    """What a URI depends on: `s3:<endpoint>` for every s3:// URI (one endpoint serves all buckets), `http:<host>`
    for an http(s) input; None for file:// (a local disk is no remote dependency)."""
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme == "s3":
        return f"s3:{s3_endpoint or 'aws'}"
    if scheme in ("http", "https"):
        try:
            host = urlsplit(uri).hostname or ""
        except ValueError:
            return None
        return f"http:{host.lower()}" if host else None
    return None


@dataclass
class _State:
    failures: int = 0
    jobs: set[str] = field(default_factory=set)  # distinct jobs among the consecutive failures
    down_since: float | None = None  # when the outage began (shared), by the clock below
    next_probe: float = 0.0
    probe_every: float = PROBE_FIRST_S
    sample_uri: str = ""  # a URI on the dependency, for the probe


class OutageGuard:
    """Per-dependency outage state for one worker process.

    Args:
        outage_s: how long an outage may last before jobs fail anyway.
        probe: `probe(sample_uri) -> bool`: True when the dependency answers at all (any non-5xx answer).
        clock: wall-clock seconds (the outage start is shared between workers through `record_start`).
        record_start: `(dependency, now) -> start`: the outage's start as the first worker to see it recorded it.
        record_end: `(dependency) -> None`: the outage is over.
        on_change: called with (dependency, down) when a dependency goes down or comes back.
        refund: called with the ids of the jobs whose failures revealed an outage (each spent an attempt
            before it was known: the guard gives those back).
    """

    def __init__(self, *, outage_s: float, probe: Callable[[str], bool], clock: Callable[[], float] = time.time,
                 record_start: Callable[[str, float], float] | None = None,
                 record_end: Callable[[str], None] | None = None,
                 on_change: Callable[[str, bool], None] | None = None,
                 refund: Callable[[list[str]], None] | None = None) -> None:
        self.outage_s = outage_s
        self.probe = probe
        self.clock = clock
        self.record_start = record_start or (lambda dependency, now: now)
        self.record_end = record_end or (lambda dependency: None)
        self.on_change = on_change or (lambda dependency, down: None)
        self.refund = refund or (lambda job_ids: None)
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    # --- what the executor reports -------------------------------------------------------------

    def succeeded(self, dependency: str | None) -> None:
        """A request to `dependency` worked: its run of failures ends (an outage ends at the next probe)."""
        if dependency is None:
            return
        with self._lock:
            state = self._states.get(dependency)
            if state is not None and state.down_since is None:
                state.failures = 0
                state.jobs.clear()

    def failed(self, dependency: str | None, job_id: str, uri: str) -> bool:
        """A transient failure of `job_id` on `dependency`; True when the job should be handed back without
        spending an attempt (the dependency is down, and has not been down for longer than `outage_s`)."""
        if dependency is None:
            return False
        went_down = False
        with self._lock:
            state = self._states.setdefault(dependency, _State())
            state.sample_uri = uri
            if state.down_since is None:
                state.failures += 1
                state.jobs.add(job_id)
                if len(state.jobs) < OUTAGE_FAILURES:
                    return False
                went_down = True
        if went_down:
            self._went_down(dependency, revealed_by=job_id)
        return self.holds(dependency)

    def holds(self, dependency: str | None) -> bool:
        """Whether jobs needing `dependency` are held back now (down, and not for longer than `outage_s`)."""
        if dependency is None:
            return False
        with self._lock:
            state = self._states.get(dependency)
            if state is None or state.down_since is None:
                return False
            return self.clock() - state.down_since < self.outage_s

    def retry_in(self, dependency: str | None) -> float:
        """Seconds until a held-back job should come back: the next probe, at least a second."""
        with self._lock:
            state = self._states.get(dependency or "")
            if state is None or state.down_since is None:
                return PROBE_FIRST_S
            return max(PROBE_FIRST_S, state.next_probe - self.clock())

    def down(self) -> list[str]:
        with self._lock:
            return [name for name, state in self._states.items() if state.down_since is not None]

    # --- probing (the lease keeper calls this every round) ------------------------------------------

    def probe_due(self) -> None:
        """Probe each down dependency whose backoff has passed; declare it up at the first answer."""
        now = self.clock()
        with self._lock:
            due = [(name, state.sample_uri) for name, state in self._states.items()
                   if state.down_since is not None and state.next_probe <= now]
        for dependency, uri in due:
            try:
                answered = self.probe(uri)
            except Exception as exc:  # a probe that raises is a probe that failed
                log.debug("probe of %s failed: %s", dependency, exc)
                answered = False
            if answered:
                self._came_up(dependency)
                continue
            with self._lock:
                state = self._states[dependency]
                state.probe_every = min(PROBE_MAX_S, state.probe_every * 2)
                state.next_probe = self.clock() + state.probe_every
                waited = self.clock() - (state.down_since or self.clock())
            if waited >= self.outage_s:
                log.error("%s still down after %.0f s (STYLEQUEUE_OUTAGE_S=%g): jobs needing it now fail "
                          "storage_error", dependency, waited, self.outage_s)

    def _went_down(self, dependency: str, revealed_by: str) -> None:
        now = self.clock()
        try:
            since = self.record_start(dependency, now)
        except Exception:  # the job store away too: this worker's own view
            since = now
        with self._lock:
            state = self._states[dependency]
            state.down_since = since
            state.probe_every = PROBE_FIRST_S
            state.next_probe = now + PROBE_FIRST_S
            charged = sorted(state.jobs - {revealed_by})  # the job that tipped it is handed back uncharged
        log.warning("%s is down (%d jobs in a row failed on it): jobs needing it are held back without spending "
                    "attempts; probing until it answers", dependency, OUTAGE_FAILURES)
        try:
            self.refund(charged)
        except Exception as exc:  # the job store away too: those jobs keep the attempt they spent
            log.debug("could not give back the attempts of %s: %s", ", ".join(charged), exc)
        self.on_change(dependency, True)

    def _came_up(self, dependency: str) -> None:
        with self._lock:
            state = self._states.pop(dependency, None)
        if state is None:
            return
        try:
            self.record_end(dependency)
        except Exception as exc:
            log.debug("could not record the end of the %s outage: %s", dependency, exc)
        log.warning("%s answers again after %.0f s; resuming", dependency, self.clock() - (state.down_since or 0))
        self.on_change(dependency, False)
