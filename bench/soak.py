"""Fault soak (issue 10): null-runtime jobs through real workers while faults strike on a schedule, then the
loss columns, which must all read 0.

Jobs: a paced stream of interactive jobs (each with a callback, submitted with an idempotency key) and bulk
chunks, every input a distinct 16-24 px PNG on tmpfs, every output on `s3://` (a moto server behind a TCP
forwarder). Faults, on a schedule (flags below):
- `kill -9` of a worker every ~20 s, a replacement started at once (one worker is never killed: its RSS at
  start and end is the leak check);
- one Redis restart: stopped (SIGTERM, AOF flushed) and started again on the same port and data directory;
- one object-store outage: the forwarder closes every connection and refuses new ones;
- one webhook receiver outage: it stops listening.
A worker that exits on its own is counted and replaced (a Redis restart used to end every worker).

It prints jobs lost, jobs failed, duplicate outputs (objects that are no job's output, or that hold another
input's pixels), callbacks not delivered, sweep finds, time to drain after the last fault, and the RSS of the
long-lived worker after warm-up and at the end.

    python bench/soak.py --quick        # a few hundred jobs, about a minute
    python bench/soak.py                # 10,000 jobs, the full schedule (several minutes on 2 cores)

Not part of `make test`. Uses the fault helpers of tests/faults.py (run from the repository root).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the fault helpers live with the tests: one copy of each

from stylequeue import Client  # noqa: E402
from stylequeue.embedded import free_port  # noqa: E402
from stylequeue.jobs import RedisJobStore  # noqa: E402
from tests.faults import Fleet, RestartableRedis, TcpForwarder, WebhookReceiver, held_by, worker_id  # noqa: E402
from tests.workers import WorkerProcess, make_image  # noqa: E402

SECRET = "whsec_" + "c29hay10ZXN0LXNlY3JldC0zMi1ieXRlcy1sb25nISE="
SIDES = ((16, 16), (24, 16), (16, 24), (24, 24))  # working sizes already: the null runtime returns them as is
TERMINAL = (b'"succeeded"', b'"failed"', b'"cancelled"')
STAGED = re.compile(r"^(?P<name>.+)\.a(?P<attempt>\d+)(?:-[A-Za-z0-9_]+)?\.[0-9a-f]+\.sqtmp$")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak", "AWS_DEFAULT_REGION": "us-east-1"}


# --- the schedule ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few hundred jobs, a compressed schedule (~1 min)")
    parser.add_argument("--jobs", type=int, help="jobs to submit (default 10000; --quick 400)")
    parser.add_argument("--submit-s", type=float, help="seconds over which jobs are submitted (default: until "
                        "the last fault ends)")
    parser.add_argument("--interactive", type=float, default=0.2, help="share of jobs that are interactive")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--codec-procs", type=int, default=1, help="codec processes per worker")
    parser.add_argument("--kill-every", type=float, help="seconds between kill -9s (default 20; --quick 10)")
    parser.add_argument("--redis-restart-at", type=float, help="when Redis stops (default 40; --quick 8)")
    parser.add_argument("--redis-down-s", type=float, default=5.0, help="how long Redis stays down")
    parser.add_argument("--store-outage-at", type=float, help="when the object store goes (default 80; --quick 15)")
    parser.add_argument("--store-outage-s", type=float, help="how long it stays away (default 30; --quick 10)")
    parser.add_argument("--receiver-outage-at", type=float, help="default 140; --quick 28")
    parser.add_argument("--receiver-outage-s", type=float, help="default 20; --quick 4")
    parser.add_argument("--skip", type=lambda text: set(text.split(",")), default=set(),
                        help="faults to leave out, comma-separated: kill,redis,store,receiver (to isolate one)")
    parser.add_argument("--lease-s", type=float, default=5.0, help="STYLEQUEUE_LEASE_S of the workers")
    parser.add_argument("--outage-s", type=float, default=300.0, help="STYLEQUEUE_OUTAGE_S of the workers")
    parser.add_argument("--drain-timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs are always kept)")
    args = parser.parse_args()
    quick = args.quick
    # --quick: every fault once, shorter; the receiver is back before its first retry (at ~5 s).
    defaults = {"jobs": 400 if quick else 10000, "kill_every": 10.0 if quick else 20.0,
                "redis_restart_at": 8.0 if quick else 40.0, "store_outage_at": 15.0 if quick else 80.0,
                "store_outage_s": 10.0 if quick else 30.0, "receiver_outage_at": 28.0 if quick else 140.0,
                "receiver_outage_s": 4.0 if quick else 20.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.submit_s is None:
        args.submit_s = last_fault_end(args)
    return args


def last_fault_end(args: argparse.Namespace) -> float:
    return max(args.redis_restart_at + args.redis_down_s, args.store_outage_at + args.store_outage_s,
               args.receiver_outage_at + args.receiver_outage_s)


# --- the pieces under test ----------------------------------------------------------------------


def start_moto(port: int) -> subprocess.Popen[bytes]:
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    for _ in range(200):
        try:
            s3.create_bucket(Bucket="soak-out")
            return moto
        except Exception:
            time.sleep(0.1)
    raise SystemExit("the moto server did not start")


def write_registry(directory: Path) -> Path:
    """A style for the null runtime: it never reads the weights, only hashes them for `model`."""
    (directory / "soak.pdparams").write_bytes(b"null runtime: no weights")
    registry = directory / "styles.toml"
    registry.write_text('[styles.soak]\nweights = "soak.pdparams"\nmax_side = 64\noutput = "png"\n')
    return registry


def rss_mb(pid: int) -> tuple[float, float]:
    """(the process's RSS, its RSS plus its children's), MB."""
    import psutil

    process = psutil.Process(pid)
    own = process.memory_info().rss
    children = sum(child.memory_info().rss for child in process.children(recursive=True))
    return own / 2**20, (own + children) / 2**20


# --- the producer ---------------------------------------------------------------------------------


@dataclass
class Producer:
    """Submits `total` jobs at an even pace over `seconds`, riding through every fault by retrying."""

    client: Client
    inputs: list[Path]
    callback_url: str
    total: int
    seconds: float
    interactive_share: float
    rng: random.Random
    jobs: dict[str, Path] = field(default_factory=dict)
    interactive: set[str] = field(default_factory=set)
    retries: Counter[str] = field(default_factory=Counter)

    def run(self) -> None:
        started = time.monotonic()
        while len(self.jobs) < self.total:
            index = len(self.jobs)
            if len(self.interactive) < self.interactive_share * index + 1:  # keep the mix at its share of jobs
                self.submit_interactive(index)
            else:
                self.submit_bulk(index, min(self.rng.randint(8, 64), self.total - index))
            due = started + self.seconds * len(self.jobs) / self.total
            time.sleep(max(0.0, due - time.monotonic()))

    def submit_interactive(self, index: int) -> None:
        path = self.inputs[index]
        job = self.retrying(lambda: self.client.submit(f"file://{path}", style="soak", callback_url=self.callback_url,
                                                       idempotency_key=f"soak-{index}"))
        self.jobs[job.id] = path
        self.interactive.add(job.id)

    def submit_bulk(self, index: int, count: int) -> None:
        paths = self.inputs[index:index + count]
        jobs = self.retrying(lambda: self.client.submit_many([f"file://{p}" for p in paths], style="soak"))
        self.jobs.update({job.id: path for job, path in zip(jobs, paths, strict=True)})

    def retrying(self, submit: Callable[[], Any]) -> Any:
        while True:
            try:
                return submit()
            except Exception as exc:  # Redis or the broker away: what a producer that keeps going does
                self.retries[type(exc).__name__] += 1
                time.sleep(0.5)


# --- the faults -------------------------------------------------------------------------------------


@dataclass
class Faults:
    """Applies the schedule; keeps the worker count up; remembers what dead workers held."""

    args: argparse.Namespace
    fleet: Fleet
    store: RestartableRedis
    forwarder: TcpForwarder
    receiver: WebhookReceiver
    keeper: WorkerProcess  # never killed: the RSS check
    started: float = field(default_factory=time.monotonic)
    log: list[str] = field(default_factory=list)
    lost_held: set[tuple[str, int]] = field(default_factory=set)
    unplanned_exits: list[str] = field(default_factory=list)
    redis_down: bool = False
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f}s {text}"
        self.log.append(line)
        print(line, flush=True)

    def schedule(self) -> list[tuple[float, str, Callable[[], None]]]:
        """(when, what, action) of every fault not skipped; kills pause while Redis is away."""
        a = self.args
        events = [(a.redis_restart_at, "redis", "Redis stopped", self.redis_stop),
                  (a.redis_restart_at + a.redis_down_s, "redis", "Redis started on the same port", self.redis_start),
                  (a.store_outage_at, "store", "object store off", self.forwarder.off),
                  (a.store_outage_at + a.store_outage_s, "store", "object store on", self.forwarder.on),
                  (a.receiver_outage_at, "receiver", "receiver refusing", self.receiver.refuse),
                  (a.receiver_outage_at + a.receiver_outage_s, "receiver", "receiver back", self.receiver.accept)]
        at = a.kill_every
        while at < last_fault_end(a):
            if not a.redis_restart_at - 1 <= at <= a.redis_restart_at + a.redis_down_s + 2:
                events.append((at, "kill", "", self.kill))
            at += a.kill_every
        return sorted([(at, name, action) for at, kind, name, action in events if kind not in a.skip],
                      key=lambda event: event[0])

    def run(self) -> None:
        for at, name, action in self.schedule():
            time.sleep(max(0.0, at - (time.monotonic() - self.started)))
            action()
            if name:
                self.note(name)

    def redis_stop(self) -> None:
        self.redis_down = True
        self.store.stop()

    def redis_start(self) -> None:
        self.store.start()
        self.redis_down = False

    def kill(self) -> None:
        candidates = [w for w in self.fleet.live() if w is not self.keeper]
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        self.fleet.kill9(victim)
        held = self.held(victim)
        self.note(f"kill -9 pid {victim.process.pid} (holding {len(held)} jobs); replacement started")
        self.fleet.start(1, wait=False)

    def held(self, worker: WorkerProcess) -> list[tuple[str, int]]:
        try:
            held = held_by(redis.Redis.from_url(self.store.url), worker_id(worker))
        except redis.RedisError:
            return []
        self.lost_held.update(held)
        return held

    def watch(self, stop: threading.Event) -> None:
        """Replace any worker that exited without being killed here (counted: it should never happen)."""
        while not stop.wait(0.5):
            if self.redis_down:
                continue
            for worker in list(self.fleet.workers):
                code = worker.process.poll()
                if code is None or worker.log.closed:
                    continue
                worker.log.close()
                self.unplanned_exits.append(f"pid {worker.process.pid} exited {code}")
                self.note(f"worker pid {worker.process.pid} exited on its own ({code}); replacement started")
                self.held(worker)
                self.fleet.start(1, wait=False)


# --- the checks ---------------------------------------------------------------------------------------


def wait_drained(store: RedisJobStore, ids: list[str], owed: set[str], timeout: float) -> bool:
    """Block until every job is finished and every owed callback delivered (or failed for good)."""
    deadline = time.monotonic() + timeout
    unfinished, undelivered = list(ids), sorted(owed)
    while time.monotonic() < deadline:
        try:
            unfinished = [j for j, s in zip(unfinished, hget_all(store, unfinished, "state"), strict=True)
                          if s not in TERMINAL]
            if not unfinished:
                callbacks = hget_all(store, undelivered, "callback")
                undelivered = [j for j, c in zip(undelivered, callbacks, strict=True)
                               if not c or b'"delivered"' not in c and b'"failed"' not in c]
        except redis.RedisError:
            pass
        if not unfinished and not undelivered:
            return True
        time.sleep(1.0)
    return False


def hget_all(store: RedisJobStore, ids: list[str], name: str) -> list[bytes | None]:
    values: list[bytes | None] = []
    for start in range(0, len(ids), 2000):
        pipe = store.redis.pipeline(transaction=False)
        for job_id in ids[start:start + 2000]:
            pipe.hget(store.job_key(job_id), name)
        values += pipe.execute()
    return values


def all_job_ids(store: RedisJobStore) -> set[str]:
    prefix = store.job_key("")
    return {key.decode()[len(prefix):] for key in store.redis.scan_iter(match=f"{prefix}*", count=2000)}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_outputs(s3: Any, sources: dict[str, Path], succeeded: set[str],
                  lost_held: set[tuple[str, int]]) -> Counter[str]:
    """Read every object under outputs/: one per succeeded job, with its own input's pixels (`sources`: job
    id -> input file); staged copies only of attempts that dead workers held."""
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="soak-out", Prefix="outputs/")
            for o in page.get("Contents", [])]
    counts = Counter[str]()
    found = set()
    for key in keys:
        name = key.rsplit("/", 1)[1]
        staged = STAGED.match(name)
        if staged:
            owner = (staged["name"].removesuffix(".png"), int(staged["attempt"]))
            explained = owner in lost_held
            counts["staged of lost attempts" if explained else "staged unexplained"] += 1
            if not explained and counts["staged unexplained"] <= 5:
                print(f"unexplained staged copy: {key}")
            continue
        job_id = name.removesuffix(".png")
        if job_id not in sources:
            counts["stray"] += 1
            continue
        found.add(job_id)
        body = s3.get_object(Bucket="soak-out", Key=key)["Body"].read()
        if not np.array_equal(pixels(body), pixels(sources[job_id].read_bytes())):
            counts["foreign pixels"] += 1
    counts["missing"] = len(succeeded - found)
    return counts


# --- the run ------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="sq-soak-"))
    shm = Path(tempfile.mkdtemp(prefix="sq-soak-in-", dir="/dev/shm" if Path("/dev/shm").exists() else None))
    os.environ.update(CREDENTIALS)
    print(f"soak: {args.jobs} jobs over {args.submit_s:.0f} s, {args.workers} workers; work directory {work}",
          flush=True)
    rng = random.Random(args.seed)
    inputs = []
    for index in range(args.jobs):
        path = shm / f"{index}.png"
        path.write_bytes(make_image(*rng.choice(SIDES), seed=index))
        inputs.append(path)
    registry = write_registry(work)
    moto_port = free_port()
    moto = start_moto(moto_port)
    forwarder = TcpForwarder("127.0.0.1", moto_port)
    receiver = WebhookReceiver(SECRET)
    redis_server = RestartableRedis(work / "redis")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")} | CREDENTIALS | {
        "STYLEQUEUE_REDIS_URL": redis_server.url, "STYLEQUEUE_STYLES": str(registry),
        "STYLEQUEUE_STORAGE_URL": "s3://soak-out", "STYLEQUEUE_S3_ENDPOINT_URL": forwarder.url,
        "STYLEQUEUE_S3_ADDRESSING_STYLE": "path", "STYLEQUEUE_RUNTIME": "null", "STYLEQUEUE_INPUT_ROOTS": str(shm),
        "STYLEQUEUE_ALLOW_PRIVATE_NETWORKS": "true", "STYLEQUEUE_WEBHOOK_SECRET": SECRET,
        "STYLEQUEUE_LEASE_S": str(args.lease_s), "STYLEQUEUE_VISIBILITY_TIMEOUT_S": "30",
        "STYLEQUEUE_OUTAGE_S": str(args.outage_s), "STYLEQUEUE_CACHE_DIR": str(work / "cache"),
        "PYTHONUNBUFFERED": "1"}
    fleet = Fleet(env, work, "--max-batch", "8", "--codec-procs", str(args.codec_procs))
    client = Client(redis_url=redis_server.url, styles=registry, storage_url="s3://soak-out",
                    s3_endpoint_url=forwarder.url, s3_addressing_style="path", input_roots=str(shm),
                    allow_private_networks=True)
    try:
        run(args, fleet, client, redis_server, forwarder, receiver, inputs, moto_port)
    finally:
        fleet.stop_all()
        client.close()
        receiver.close()
        forwarder.close()
        redis_server.stop()
        moto.terminate()
        moto.wait(30)
        shutil.rmtree(shm, ignore_errors=True)
        if args.keep:
            print(f"(work directory kept: {work})")
        else:
            for item in work.iterdir():  # keep the worker logs for a post-mortem
                if not item.name.endswith(".log"):
                    shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink()
            print(f"(worker logs in {work})")


def run(args: argparse.Namespace, fleet: Fleet, client: Client, redis_server: RestartableRedis,
        forwarder: TcpForwarder, receiver: WebhookReceiver, inputs: list[Path], moto_port: int) -> None:
    import boto3

    keeper = fleet.start(args.workers)[0]
    ready_rss = rss_mb(keeper.process.pid)
    producer = Producer(client, inputs, receiver.url, args.jobs, args.submit_s, args.interactive,
                        random.Random(args.seed + 1))
    faults = Faults(args, fleet, redis_server, forwarder, receiver, keeper)
    stop_watching = threading.Event()
    feeding = threading.Thread(target=producer.run, name="producer", daemon=True)
    striking = threading.Thread(target=faults.run, name="faults", daemon=True)
    watching = threading.Thread(target=faults.watch, args=(stop_watching,), name="watch", daemon=True)
    for thread in (feeding, striking, watching):
        thread.start()
    warm_rss: tuple[float, float] | None = None
    while feeding.is_alive() or striking.is_alive():
        if warm_rss is None and time.monotonic() > faults.started + min(10.0, args.kill_every / 2):
            warm_rss = rss_mb(keeper.process.pid)  # after warm-up, before the first fault
        time.sleep(0.5)
    last_fault = time.monotonic()
    faults.note(f"faults over; {len(producer.jobs)} jobs submitted")
    ids = list(producer.jobs)
    drained = wait_drained(client.store, ids, producer.interactive, args.drain_timeout_s)
    drain_s = time.monotonic() - last_fault
    faults.note("drained" if drained else f"NOT drained after {args.drain_timeout_s:.0f} s")
    stop_watching.set()
    watching.join(5)
    end_rss = rss_mb(keeper.process.pid) if keeper.process.poll() is None else None

    store = client.store
    untracked = sorted(all_job_ids(store) - set(ids))
    everything = ids + untracked
    jobs = {job.id: job for job in client.get_many(everything) if job is not None}
    lost = [job_id for job_id in everything if job_id not in jobs or not jobs[job_id].finished]
    failed = Counter((job.error or {}).get("code", str(job.state)) for job in jobs.values()
                     if job.state != "succeeded")
    callbacks = Counter(str((jobs[j].callback or {}).get("state")) for j in producer.interactive if j in jobs)
    delivered = receiver.by_job()
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1")
    sources = {job.id: Path(job.input_uri.removeprefix("file://")) for job in jobs.values()}
    succeeded = {job.id for job in jobs.values() if job.state == "succeeded"}
    outputs = check_outputs(s3, sources, succeeded, faults.lost_held)
    report(args, faults, len(everything), len(producer.interactive), [
        ("jobs lost (unfinished, or no record)", len(lost)),
        ("jobs failed", sum(failed.values())),
        ("duplicate outputs (stray objects, or another input's pixels)", outputs["stray"] + outputs["foreign pixels"]),
        ("outputs missing (a succeeded job without its object)", outputs["missing"]),
        ("callbacks not delivered", len(producer.interactive) - callbacks.get("delivered", 0)),
        ("sweep finds", store.stats().get("sweep_found", 0)),
        ("time to drain after the last fault", f"{drain_s:.1f} s"),
        ("long-lived worker RSS, MB: ready / after warm-up / end", rss_row(ready_rss, warm_rss, end_rss, 0)),
        ("the same with its codec processes", rss_row(ready_rss, warm_rss, end_rss, 1)),
    ])
    print(f"failed by code: {dict(failed) or '-'}; callback states: {dict(callbacks)}; repeated callback POSTs "
          f"(same webhook-id): {sum(len(got) - 1 for got in delivered.values())}; unverified: "
          f"{sum(1 for got in delivered.values() for d in got if not d.verified)}")
    print(f"attempts: {sorted(Counter(job.attempts for job in jobs.values()).items())}; jobs the producer never "
          f"got back (a submit retried after a fault): {len(untracked)}; producer retries: "
          f"{dict(producer.retries) or '-'}")
    print(f"staged copies left: {outputs['staged of lost attempts']} of attempts dead workers held, "
          f"{outputs['staged unexplained']} unexplained; worker exits not caused here: "
          f"{len(faults.unplanned_exits)} {faults.unplanned_exits or ''}")


def rss_row(ready: tuple[float, float], warm: tuple[float, float] | None, end: tuple[float, float] | None,
            column: int) -> str:
    if warm is None or end is None:
        return f"{ready[column]:.0f} / - / - (the worker did not live to the end)"
    return (f"{ready[column]:.0f} / {warm[column]:.0f} / {end[column]:.0f} "
            f"({100 * (end[column] / warm[column] - 1):+.1f}% since warm-up)")


def report(args: argparse.Namespace, faults: Faults, total: int, interactive: int,
           rows: list[tuple[str, object]]) -> None:
    kills = sum("kill -9" in line for line in faults.log)
    print(f"\n## bench/soak.py: {total} jobs ({interactive} interactive with callbacks), {args.workers} workers, "
          f"null runtime, outputs on s3:// (moto behind a forwarder)\n")
    if args.skip:
        print(f"skipped: {', '.join(sorted(args.skip))}")
    print(f"faults: {kills} kill -9s (every {args.kill_every:g} s), Redis down {args.redis_down_s:g} s at "
          f"{args.redis_restart_at:g} s, object store down {args.store_outage_s:g} s at {args.store_outage_at:g} s, "
          f"receiver down {args.receiver_outage_s:g} s at {args.receiver_outage_at:g} s\n")
    print("| column | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print()


if __name__ == "__main__":
    main()
