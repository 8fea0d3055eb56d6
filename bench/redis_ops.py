"""Redis cost per job: commands, round trips and Redis CPU, for the job store and the broker apart.

    python bench/redis_ops.py [--bulk 20000] [--interactive 2000] [--sample 2000]

A real `stylequeue worker` (the `null` runtime, 64 px JPEGs on tmpfs) with the job store on one private Redis
(AOF on, as docs/deploy.md asks) and the Celery broker on another, so each server's counters say what a run
cost it: `INFO commandstats` (a Lua script call counts as one command), `INFO stats` total_reads_processed
(read events: round trips, a pipeline counting once) and `INFO cpu` (used_cpu_sys + used_cpu_user), read
before and after. Per job = the run's difference / jobs: the producer's submits and the worker's time-driven
duties (heartbeats, lease renewals, due-set polls every 0.5 s) included, this script's progress polls taken
out. The idle rate of those duties is printed apart. A MONITOR sample then names the scripts behind EVALSHA.

Prints Markdown tables and the capacity projection: jobs/s one Redis primary carries at 70% of a core, and
how many GPU workers at 3,000 img/s that is.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import Worker, base_env, count_failed, cpu_name, photo, write_style  # noqa: E402

from stylequeue.embedded import EmbeddedRedis, find_redis_server  # noqa: E402
from stylequeue.jobs import scripts  # noqa: E402
from stylequeue.producer.client import Client  # noqa: E402

PREFIX = "sqops:"
IDLE_S = 5.0
POLL_S = 0.2
CORE_SHARE = 0.7  # a Redis primary planned at 70% of its one core
GPU_IMG_S = 3000.0  # one GPU worker: the compiled generator on an H100 at 256 px (docs/performance.md)
END_MARK = "sq-ops-end"
SCRIPT_NAMES = {value.sha: value.name for value in vars(scripts).values() if isinstance(value, scripts.Script)}


@dataclass(frozen=True)
class Counters:
    """One server's counters at one moment."""

    commands: Counter[str]
    reads: int
    cpu_s: float

    @classmethod
    def read(cls, client: redis.Redis) -> Counters:
        stats = client.info("commandstats")
        commands = Counter({name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()})
        cpu = client.info("cpu")
        return cls(commands, int(client.info("stats")["total_reads_processed"]),
                   float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.commands - other.commands, self.reads - other.reads, self.cpu_s - other.cpu_s)


@dataclass(frozen=True)
class Cost:
    """What one run cost a server, per job."""

    jobs: int
    seconds: float
    delta: Counters

    def commands(self) -> float:
        return sum(self.delta.commands.values()) / self.jobs

    def reads(self) -> float:
        return self.delta.reads / self.jobs

    def cpu_ms_per_1000(self) -> float:
        return self.delta.cpu_s / self.jobs * 1e6

    def calls(self, command: str) -> float:
        return self.delta.commands.get(command, 0) / self.jobs


class Progress:
    """Waits for a run to end by polling the store's two indexes, and counts what that polling cost."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.polls = 0

    def wait(self, timeout: float = 1800) -> float:
        """Block until no job is queued or running; returns when that was seen (perf_counter)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pipe = self.client.pipeline(transaction=False)
            pipe.zcard(PREFIX + "queued")
            pipe.zcard(PREFIX + "running")
            queued, running = pipe.execute()
            self.polls += 1
            if queued == 0 and running == 0:
                return time.perf_counter()
            time.sleep(POLL_S)
        raise SystemExit(f"jobs still unfinished after {timeout:.0f} s")

    def take_out(self, delta: Counters, polls: int) -> Counters:
        """`delta` without `polls` of this class's polls (one round trip of two ZCARDs each)."""
        commands = delta.commands.copy()
        commands["zcard"] -= 2 * polls
        return Counters(+commands, delta.reads - polls, delta.cpu_s)


class Bench:
    """The two servers, the worker and a client, for the runs below."""

    def __init__(self, work: Path, store: EmbeddedRedis, broker: EmbeddedRedis) -> None:
        self.store_client = redis.Redis.from_url(store.url)
        self.broker_client = redis.Redis.from_url(broker.url)
        self.progress = Progress(self.store_client)
        registry = write_style(work, ngf=4, n_blocks=1, max_side=64, output="jpeg")
        self.shm = Path(tempfile.mkdtemp(prefix="sq-ops-", dir="/dev/shm" if Path("/dev/shm").exists() else None))
        inputs = self.shm / "in"
        inputs.mkdir()
        for i in range(16):
            (inputs / f"{i}.jpg").write_bytes(photo(64, i, "JPEG"))
        self.uris = [f"file://{inputs}/{i % 16}.jpg" for i in range(16)]
        storage = f"file://{self.shm}/store"
        env = base_env(store.url, registry, storage, work / "cache", input_roots=str(inputs), runtime="null",
                       key_prefix=PREFIX, broker_url=broker.url)
        self.client = Client(redis_url=store.url, broker_url=broker.url, styles=registry, storage_url=storage,
                             input_roots=str(inputs), key_prefix=PREFIX)
        self.worker = Worker(env, work / "worker.log", "--max-batch", "32")

    def close(self) -> None:
        self.worker.stop()
        self.client.close()
        shutil.rmtree(self.shm, ignore_errors=True)

    def submit(self, jobs: int, interactive: bool) -> list[str]:
        uris = [self.uris[i % len(self.uris)] for i in range(jobs)]
        if interactive:
            return [self.client.submit(uri, style="bench").id for uri in uris]
        return [job.id for job in self.client.submit_many(uris, style="bench")]

    def run(self, jobs: int, *, interactive: bool) -> tuple[Cost, Cost, int]:
        """(job store cost, broker cost, failed jobs) of `jobs` jobs, submitted then waited for."""
        polls = self.progress.polls
        store_before, broker_before = Counters.read(self.store_client), Counters.read(self.broker_client)
        started = time.perf_counter()
        ids = self.submit(jobs, interactive)
        ended = self.progress.wait()
        store_delta = Counters.read(self.store_client) - store_before
        broker_delta = Counters.read(self.broker_client) - broker_before
        store_delta = self.progress.take_out(store_delta, self.progress.polls - polls)
        seconds = ended - started
        return Cost(jobs, seconds, store_delta), Cost(jobs, seconds, broker_delta), count_failed(self.client, ids)

    def idle(self) -> tuple[Counters, Counters]:
        """What the worker's time-driven duties cost each server per second with no job in sight."""
        store_before, broker_before = Counters.read(self.store_client), Counters.read(self.broker_client)
        time.sleep(IDLE_S)
        return (Counters.read(self.store_client) - store_before, Counters.read(self.broker_client) - broker_before)

    def attribute(self, jobs: int, *, interactive: bool) -> tuple[Sample, Sample]:
        """(job store, broker) commands of a run, by name (a MONITOR sample: slower, so not timed)."""
        samples = (Sample(self.store_client), Sample(self.broker_client))
        for sample in samples:
            sample.start()
        before = self.progress.polls
        self.submit(jobs, interactive)
        self.progress.wait()
        for sample in samples:
            sample.stop()
        samples[0].calls["zcard"] -= 2 * (self.progress.polls - before)
        return samples


class Sample:
    """Commands one server runs while sampled: top-level `calls` by name (EVALSHA by script name), and the
    commands each script ran inside it (`inside`), from MONITOR, which shows a script's call, then its commands."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.calls: Counter[str] = Counter()
        self.inside: Counter[str] = Counter()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self.client.echo(END_MARK)  # the monitor's cue to stop, after everything of the run
        self._thread.join(30)

    def _listen(self) -> None:
        script = ""
        with self.client.monitor() as monitor:
            self._ready.set()
            for event in monitor.listen():
                words = event["command"].split(" ")
                if words[:2] == ["ECHO", END_MARK]:
                    return
                if event.get("client_type") == "lua":
                    self.inside[script] += 1
                    continue
                name = words[0].lower()
                if name == "evalsha":
                    name = script = "script " + SCRIPT_NAMES.get(words[1], words[1][:12])
                self.calls[name] += 1


def cost_rows(label: str, store: Cost, broker: Cost, failed: int) -> list[str]:
    messages = broker.calls("lpush")
    return [
        f"| {label} | {store.jobs:,} | {store.jobs / store.seconds:,.0f} | {store.commands():.2f} | "
        f"{store.calls('evalsha'):.2f} | {store.reads():.2f} | {store.cpu_ms_per_1000():.1f} | "
        f"{broker.commands():.2f} | {broker.reads():.2f} | {messages:.4f} (1 per {1 / messages:,.0f}) | "
        f"{broker.cpu_ms_per_1000():.1f} | {failed} |"
    ]


def capacity_rows(label: str, store: Cost, broker: Cost) -> list[str]:
    rows = []
    for where, cpu_ms in ((f"{label}, job store alone", store.cpu_ms_per_1000()),
                          (f"{label}, job store and broker on one Redis",
                           store.cpu_ms_per_1000() + broker.cpu_ms_per_1000())):
        jobs_s = CORE_SHARE / (cpu_ms / 1e6) if cpu_ms > 0 else float("inf")
        rows.append(f"| {where} | {cpu_ms:.1f} | {jobs_s:,.0f} | {jobs_s / GPU_IMG_S:.1f} |")
    return rows


def breakdown(title: str, sample: Sample, jobs: int) -> list[str]:
    lines = [f"\n{title} ({jobs:,} jobs, MONITOR sample; per job)\n",
             "| command (a script call is one) | calls | commands the scripts ran inside |", "|---|---|---|"]
    for name, count in (+sample.calls).most_common():
        inside = f"{sample.inside[name] / jobs:.2f}" if name.startswith("script ") else ""
        lines.append(f"| {name} | {count / jobs:.3f} | {inside} |")
    lines.append(f"| **all** | **{sum((+sample.calls).values()) / jobs:.3f}** | "
                 f"**{sum(sample.inside.values()) / jobs:.2f}** |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk", type=int, default=20000, help="bulk jobs (submit_many) in the timed run")
    parser.add_argument("--interactive", type=int, default=2000, help="interactive jobs (submit) in the timed run")
    parser.add_argument("--sample", type=int, default=2000, help="jobs of each kind in the MONITOR sample")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sq-redis-ops-"))
    lines = [f"## bench/redis_ops.py — {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"Redis {redis_version()}\n"]
    with EmbeddedRedis(persist=True) as store, EmbeddedRedis(persist=False) as broker:
        bench = Bench(work, store, broker)
        try:
            bench.run(256, interactive=False)  # warm: scripts loaded, codec processes up
            bench.run(64, interactive=True)
            idle_store, idle_broker = bench.idle()
            bulk = bench.run(args.bulk, interactive=False)
            interactive = bench.run(args.interactive, interactive=True)
            bulk_seen = bench.attribute(args.sample, interactive=False)
            interactive_seen = bench.attribute(args.sample, interactive=True)
        finally:
            bench.close()
    lines += [
        "| run | jobs | jobs/s | store commands/job (with those inside scripts) | script calls/job "
        "| store round trips/job | store CPU ms/1000 jobs "
        "| broker commands/job | broker round trips/job | broker messages/job | broker CPU ms/1000 jobs | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *cost_rows("bulk (`submit_many`)", *bulk),
        *cost_rows("interactive (`submit`)", *interactive),
        "",
        f"Idle worker, per second: job store {sum(idle_store.commands.values()) / IDLE_S:.1f} commands, "
        f"{idle_store.reads / IDLE_S:.1f} round trips; broker {sum(idle_broker.commands.values()) / IDLE_S:.1f} "
        f"commands, {idle_broker.reads / IDLE_S:.1f} round trips.",
        "",
        f"Capacity: one Redis primary at {CORE_SHARE:.0%} of a core, GPU workers at {GPU_IMG_S:,.0f} img/s\n",
        "| workload | Redis CPU ms / 1000 jobs | jobs/s | GPU workers |", "|---|---|---|---|",
        *capacity_rows("bulk", bulk[0], bulk[1]),
        *capacity_rows("interactive", interactive[0], interactive[1]),
        *breakdown("Job-store commands of a bulk run", bulk_seen[0], args.sample),
        *breakdown("Broker commands of a bulk run", bulk_seen[1], args.sample),
        *breakdown("Job-store commands of an interactive run", interactive_seen[0], args.sample),
        *breakdown("Broker commands of an interactive run", interactive_seen[1], args.sample),
    ]
    print("\n".join(lines))
    print(f"\n(logs in {work})")


def redis_version() -> str:
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True).stdout
    return next((word.split("=", 1)[1] for word in out.split() if word.startswith("v=")), "?")


if __name__ == "__main__":
    main()
