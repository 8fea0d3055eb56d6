"""A randomized stress test over real components (issue 13): three `stylequeue worker` processes (null runtime)
on a real Redis take a stream of interactive jobs (with callbacks) and bulk jobs while, at random moments,
workers are killed with SIGKILL (and replaced), one is stopped with SIGTERM (and replaced), Redis is paused
(`CLIENT PAUSE`), and workers are frozen with SIGSTOP for longer than their lease, then thawed (stale attempts
that wake up after their jobs were taken over: F6). Then the invariants:

- every job ends `succeeded`, within MAX_ATTEMPTS;
- exactly one output per job, holding that job's own pixels (the null runtime returns its input and every
  input differs, so a stale attempt's or another job's bytes would show); the only staged (`.sqtmp`) files
  left are attempts the job store said a killed worker held when it died;
- every owed callback is delivered and verified; a repeated POST carries the same webhook-id;
- the sweep found nothing (`stats()["sweep_found"]` stays 0): a message a kill -9 made the broker lose is
  owed again from the `sent` watch (counted as `resent`, an infrastructure event), never found by the sweep.

Seeded: the seed is printed and named in every failure; `STRESS_SEED=N` replays a run's schedule of faults
and jobs (the interleavings inside the processes still differ).
"""

from __future__ import annotations

import io
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from stylequeue import Client, JobState
from stylequeue.embedded import EmbeddedRedis
from stylequeue.jobs import MAX_ATTEMPTS, Presence, RedisJobStore
from tests.faults import Fleet, WebhookReceiver, held_by, worker_id
from tests.workers import WorkerProcess, make_image, wait_for, worker_env

pytestmark = pytest.mark.slow

SECRET = "whsec_" + "c3R5bGVxdWV1ZS10ZXN0LXNlY3JldC0zMmJ5dGVzISE="
WORKERS = 3
CHAOS_S = 20.0  # how long jobs are submitted and faults injected
LEASE_S = 3  # tests/workers.py's worker_env
# Working sizes already (multiples of 4, at most the style's 64 px): the null runtime returns them unchanged.
SIDES = ((16, 16), (24, 16), (16, 32), (32, 24))
# Staged copies are `.{name}.a{attempt}-{job id}.{random}.sqtmp` (worker/execution.py `stage_tag`).
STAGED = re.compile(r"^\.(?P<name>.+)\.a(?P<attempt>\d+)(?:-[A-Za-z0-9_]+)?\.[0-9a-f]+\.sqtmp$")


@dataclass
class Submitter:
    """Submits a random mix of interactive jobs (1-3, with callbacks), bulk chunks (10-40) and bulk bursts
    (150-300) until told to stop; each job gets an input file of its own."""

    client: Client
    inputs: Path
    callback_url: str
    rng: random.Random
    jobs: dict[str, Path] = field(default_factory=dict)  # job id -> its input file
    interactive: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    written: int = 0

    def new_input(self) -> Path:
        self.written += 1
        path = self.inputs / f"{self.written}.png"
        path.write_bytes(make_image(*self.rng.choice(SIDES), seed=self.rng.randrange(2**32)))
        return path

    def run(self) -> None:
        while not self.stop.is_set():
            roll = self.rng.random()
            interactive = roll < 0.4
            # Now and then a burst, so the faults find workers holding a backlog of claimed bulk jobs.
            count = (self.rng.randint(1, 3) if interactive else self.rng.randint(10, 40) if roll < 0.9
                     else self.rng.randint(150, 300))
            paths = [self.new_input() for _ in range(count)]
            try:
                jobs = self.client.submit_many(
                    [f"file://{p}" for p in paths], style="tiny", priority="interactive" if interactive else "bulk",
                    callback_url=self.callback_url if interactive else None)
            except Exception as exc:  # a producer must ride through these faults too: recorded, then asserted
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            for job, path in zip(jobs, paths, strict=True):
                self.jobs[job.id] = path
                if interactive:
                    self.interactive.add(job.id)
            self.stop.wait(self.rng.uniform(0.15, 0.5))


@dataclass
class Chaos:
    """The faults, each applied to a random ready worker; `log` says what happened when."""

    fleet: Fleet
    redis: redis.Redis
    rng: random.Random
    started: float = field(default_factory=time.monotonic)
    log: list[str] = field(default_factory=list)
    killed_held: set[tuple[str, int]] = field(default_factory=set)  # (job, attempt) killed workers held
    # (job, attempt) each frozen worker held when frozen: taken over while it slept, still in its memory after,
    # and staged by it before it sees the loss; a kill before it deletes them leaves them (docs/jobs.md)
    frozen_held: dict[int, set[tuple[str, int]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.log.append(f"{time.monotonic() - self.started:5.1f}s {text}")

    def ready(self) -> list[WorkerProcess]:
        """Live workers that are consuming (never one still starting, which a SIGTERM would not find ready)."""
        ready = {info.get("pid") for info in Presence(RedisJobStore(self.redis)).workers().values()
                 if info.get("ready")}
        return [w for w in self.fleet.live() if w.process.pid in ready and w.process.pid not in self.fleet.frozen]

    def pick(self, *, holding: bool = False) -> WorkerProcess:
        """A random ready worker; with `holding`, one that holds jobs now if any does."""
        assert wait_for(lambda: bool(self.ready()), timeout=60), self.fleet.outputs()
        ready = self.ready()
        busy = [w for w in ready if held_by(self.redis, worker_id(w))] if holding else []
        return self.rng.choice(busy or ready)

    def kill(self) -> None:
        victim = self.pick(holding=True)
        self.fleet.kill9(victim)
        held = held_by(self.redis, worker_id(victim))  # its leases outlive it by up to LEASE_S
        self.killed_held.update(held)
        self.killed_held.update(self.frozen_held.get(victim.process.pid, ()))
        self.note(f"kill -9 pid {victim.process.pid} holding {len(held)} jobs; replacement started")
        self.fleet.start(1, wait=False)

    def term(self) -> None:
        victim = self.pick(holding=True)
        code = self.fleet.sigterm(victim)
        self.note(f"SIGTERM pid {victim.process.pid}: exit {code}; replacement started")
        if code != 0:
            self.problems.append(f"SIGTERM'd worker {victim.process.pid} exited {code}")
        self.fleet.start(1, wait=False)

    def pause(self) -> None:
        self.note("CLIENT PAUSE 2000 ms")
        self.redis.client_pause(2000)
        time.sleep(2)

    def freeze(self) -> None:
        victim = self.pick(holding=True)
        frozen_for = 2 * LEASE_S
        self.fleet.freeze(victim)
        held = held_by(self.redis, worker_id(victim))
        self.frozen_held.setdefault(victim.process.pid, set()).update(held)
        self.note(f"SIGSTOP pid {victim.process.pid} holding {len(held)} jobs, for {frozen_for} s")
        time.sleep(frozen_for)
        self.fleet.thaw(victim)
        now = RedisJobStore(self.redis).get_many([job_id for job_id, _ in held])
        taken = sum(1 for (_, attempt), job in zip(held, now, strict=True)
                    if job is not None and (job.attempts != attempt or job.owner != worker_id(victim)))
        self.note(f"SIGCONT pid {victim.process.pid}: {taken} of its jobs were reaped or taken over meanwhile")

    def schedule(self) -> list[tuple[float, Callable[[], None]]]:
        """When each fault strikes. Kills and the SIGTERM come early: what a dead worker's delivery held
        comes due CALLBACK_LEASE_S (60 s) later, and the test must drain by then."""
        uniform = self.rng.uniform
        faults = [(uniform(2, 7), self.kill), (uniform(7, 12), self.kill), (uniform(2, 12), self.term),
                  (uniform(4, CHAOS_S - 3), self.pause), (uniform(4, CHAOS_S - 3), self.pause),
                  (uniform(3, CHAOS_S / 2), self.freeze), (uniform(CHAOS_S / 2, CHAOS_S - 6), self.freeze)]
        return sorted(faults, key=lambda item: item[0])

    def strike(self) -> None:
        """Apply every fault at its time (or at once, when the one before ran late)."""
        for at, fault in self.schedule():
            time.sleep(max(0.0, at - (time.monotonic() - self.started)))
            fault()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_outputs(out: Path, jobs: dict[str, Path], killed_held: set[tuple[str, int]]) -> list[str]:
    """One output per job with its own input's pixels; staged leftovers only from killed workers' attempts."""
    problems = []
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    finals = {n for n in names if not n.endswith(".sqtmp")}
    expected = {f"{job_id}.png" for job_id in jobs}
    problems += [f"output missing: {n}" for n in sorted(expected - finals)]
    problems += [f"stray output: {n}" for n in sorted(finals - expected)]
    for job_id, source in jobs.items():
        target = out / f"{job_id}.png"
        if target.exists() and not np.array_equal(pixels(target.read_bytes()), pixels(source.read_bytes())):
            problems.append(f"job {job_id}: output pixels are not its input's (another attempt's or job's bytes)")
    for name in (n for n in names if n.endswith(".sqtmp")):
        match = STAGED.match(name)
        owner = (match["name"].removesuffix(".png"), int(match["attempt"])) if match else None
        if owner not in killed_held:
            problems.append(f"staged file {name} left by an attempt no killed worker held")
    return problems


def test_random_faults_lose_no_job_and_write_every_output_once(tiny_registry: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("STRESS_SEED") or time.time_ns() % 2**32)
    print(f"stress seed {seed} (STRESS_SEED={seed} replays this schedule)")
    rng = random.Random(seed)
    inputs, store = tmp_path / "in", tmp_path / "store"
    inputs.mkdir()
    receiver = WebhookReceiver(SECRET)
    # Its own Redis: CLIENT PAUSE stops every client of a server.
    with EmbeddedRedis(persist=False) as server:
        env = worker_env(server.url, tiny_registry, f"file://{store}", input_roots=f"{inputs},{store}",
                         runtime="null", webhook_secret=SECRET, max_batch="8")
        fleet = Fleet(env, tmp_path, "--codec-procs", "1")
        client = Client(redis_url=server.url, styles=tiny_registry, storage_url=f"file://{store}",
                        input_roots=str(inputs), allow_private_networks=True)
        control = redis.Redis.from_url(server.url)
        submitter = Submitter(client, inputs, receiver.url, random.Random(rng.random()))
        chaos = Chaos(fleet, control, random.Random(rng.random()))
        codes: list[int] = []
        sweep_found = 0
        try:
            fleet.start(WORKERS)
            feeding = threading.Thread(target=submitter.run, name="submitter", daemon=True)
            chaos.started = time.monotonic()
            feeding.start()
            chaos.strike()
            time.sleep(max(0.0, CHAOS_S - (time.monotonic() - chaos.started)))
            submitter.stop.set()
            feeding.join(30)
            chaos.note(f"submitting stopped: {len(submitter.jobs)} jobs, {len(submitter.interactive)} interactive")
            context = f"seed {seed}; faults: {chaos.log}"

            ids = list(submitter.jobs)
            assert wait_for(lambda: all(j and j.finished for j in client.get_many(ids)), timeout=150, interval=0.5), \
                f"{context}\n{Counter(str(j.state) if j else 'missing' for j in client.get_many(ids))}"
            chaos.note("every job finished")
            owed = sorted(submitter.interactive)
            assert wait_for(lambda: all((j.callback or {}).get("state") == "delivered"
                                        for j in client.get_many(owed) if j), timeout=120, interval=0.5), \
                f"{context}\n{Counter(str((j.callback or {}).get('state')) for j in client.get_many(owed) if j)}"
            chaos.note("every callback delivered")

            jobs = client.get_many(ids)
            problems = list(chaos.problems) + [f"submit failed: {e}" for e in submitter.errors]
            problems += [f"job {j.id}: {j.state} {j.error}" for j in jobs if j and j.state != JobState.SUCCEEDED]
            problems += [f"job {j.id}: {j.attempts} attempts" for j in jobs if j and j.attempts > MAX_ATTEMPTS]
            problems += check_outputs(store / "outputs" / "tiny", submitter.jobs, chaos.killed_held)
            delivered = receiver.by_job()
            for job_id in owed:
                got = delivered.get(job_id, [])
                if not got or not all(d.verified for d in got) or len({d.webhook_id for d in got}) != 1:
                    problems.append(f"job {job_id}: callback deliveries {[(d.webhook_id, d.error) for d in got]}")
            sweep_found = client.store.stats().get("sweep_found", 0)
            repeated = sum(len(got) - 1 for got in delivered.values())
            print(f"{len(ids)} jobs, attempts {sorted(Counter(j.attempts for j in jobs if j).items())}, "
                  f"{repeated} repeated callback POSTs, sweep found {sweep_found}; faults: {chaos.log}")
            assert problems == [], f"{context}\n" + "\n".join(problems[:40])
            for worker in fleet.live():  # every replacement came up and is still serving
                worker.wait_ready(60)
        finally:
            codes = fleet.stop_all()
            client.close()
            receiver.close()
        assert all(code == 0 for code in codes), f"seed {seed}: worker exit codes {codes}\n{fleet.outputs()}"
    assert sweep_found == 0, f"seed {seed}: the sweep found {sweep_found} queued jobs nothing owed a message"
