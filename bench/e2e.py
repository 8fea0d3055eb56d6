"""End-to-end throughput of a real worker, each figure next to its baseline measured in the same run.

1. Model path, 256x256, CycleGAN ngf 64 / 9 blocks (random weights), runtime `auto`:
   the raw runtime's img/s (best of batch 1 and batch MAX_BATCH, in this process, nothing else running;
   the mean of a measurement before the workers and one after, since these machines drift) vs. a
   `stylequeue worker` fed through Redis with `file://` storage on tmpfs, and through a moto S3 server
   on the same machine. The worker's own metrics also give the share of its wall time spent inside
   the model ("model busy"), which the machine's drift does not move. `--ngf 32` runs the model 4x
   faster: a stand-in for a faster CPU, where the same work beside the model weighs 4x more.
2. Queue path, `null` runtime (returns its input), 64 px JPEGs on tmpfs: bulk and interactive jobs/s
   vs. a plain Celery no-op task (acks_late, prefetch 1, solo pool, Redis result backend).

    python bench/e2e.py                 # everything (about 5-10 minutes on 2 cores)
    python bench/e2e.py --skip-model    # queue path only
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import redis
from PIL import Image

from stylequeue.broker import BULK_CHUNK_SIZE
from stylequeue.embedded import EmbeddedRedis, free_port
from stylequeue.jobs import Presence, RedisJobStore
from stylequeue.producer.client import Client

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds `process` has used so far."""
    times = process.cpu_times()
    return times.user + times.system


def photo(side: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A smooth, photo-like test image (random noise would make JPEG unrealistically expensive)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, fmt, quality=90) if fmt == "JPEG" else image.save(out, fmt)
    return out.getvalue()


def write_style(directory: Path, *, ngf: int, n_blocks: int, max_side: int, output: str) -> Path:
    import paddle

    from stylequeue.models.generator import ResnetGenerator

    paddle.seed(1)
    generator = ResnetGenerator(ngf=ngf, n_blocks=n_blocks)
    paddle.save(generator.state_dict(), str(directory / "bench.pdparams"))
    registry = directory / "styles.toml"
    registry.write_text(f'[styles.bench]\nweights = "bench.pdparams"\nngf = {ngf}\nn_blocks = {n_blocks}\n'
                        f'max_side = {max_side}\noutput = "{output}"\n')
    return registry


class Worker:
    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = open(log, "ab")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-m", "stylequeue", "worker", *args], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        store = RedisJobStore(redis.Redis.from_url(env["STYLEQUEUE_REDIS_URL"]),
                              key_prefix=env.get("STYLEQUEUE_KEY_PREFIX", "sq:"))
        deadline = time.monotonic() + 900
        while not any(w.get("pid") == self.process.pid and w.get("ready") for w in Presence(store).workers().values()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)
        self.log.close()


def wait_all(client: Client, ids: list[str], timeout: float = 3600) -> float:
    """Block until every job is finished; returns when the last one finished (its own `finished_at`).

    Polls a few hundred of the oldest unfinished jobs twice a second, so the benchmark's own load on
    Redis and on the CPU stays negligible; the figure comes from the records, not from the polling.
    """
    from stylequeue.jobs import parse_iso

    remaining = list(ids)
    deadline = time.monotonic() + timeout
    while remaining:
        window = remaining[:256]
        pipe = client.store.redis.pipeline(transaction=False)
        for job_id in window:
            pipe.hget(client.store.job_key(job_id), "state")
        states = pipe.execute()
        done = {j for j, s in zip(window, states, strict=True) if s in (b'"succeeded"', b'"failed"', b'"cancelled"')}
        remaining = [j for j in remaining if j not in done]
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(remaining)} jobs unfinished after {timeout} s")
        if remaining and len(done) < len(window):
            time.sleep(0.5)
    last = max(parse_iso(job.finished_at) for job in client.get_many(ids) if job and job.finished_at)
    # finished_at is wall-clock; convert to this process's perf_counter timeline.
    return time.perf_counter() - (time.time() - last)


def count_failed(client: Client, ids: list[str]) -> int:
    return sum(1 for job in client.get_many(ids) if job is None or job.state != "succeeded")


def base_env(redis_url: str, registry: Path, storage_url: str, cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    env.update({"STYLEQUEUE_REDIS_URL": redis_url, "STYLEQUEUE_STYLES": str(registry),
                "STYLEQUEUE_STORAGE_URL": storage_url, "STYLEQUEUE_CACHE_DIR": str(cache_dir),
                "PYTHONUNBUFFERED": "1"})
    env.update({f"STYLEQUEUE_{k.upper()}": v for k, v in extra.items()})
    return env


# --- 1. the model path ---------------------------------------------------------------------------


def raw_runtime(registry: Path, cache_dir: Path, side: int, images: int,
                batches: tuple[int, ...]) -> tuple[float, dict]:
    """The raw runtime's img/s: the best of running `images` images `batch` at a time, for each batch size."""
    from stylequeue.config.styles import StyleCatalog
    from stylequeue.models.runtime import release, select_runtime

    spec = StyleCatalog(registry).get("bench")
    selection = select_runtime(spec, runtime="auto", cache_dir=cache_dir)
    runtime = selection.runtime
    single = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, side, side)).astype(np.float32)
    rates = {}
    for size in batches:
        batch = np.repeat(single, size, axis=0)
        runtime.run(batch)  # this shape's first run compiles/caches
        rounds = max(1, images // size)
        started = time.perf_counter()
        for _ in range(rounds):
            runtime.run(batch)
        rates[size] = rounds * size / (time.perf_counter() - started)
    release(runtime)
    return max(rates.values()), {"rates": rates, "runtime": selection.info["runtime"],
                                 "precision": selection.info["precision"]}


def model_seconds(port: int) -> tuple[float, float]:
    """(seconds inside the model, images run) so far, from the worker's own metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def total(name: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))

    return total("stylequeue_batch_seconds_sum"), total("stylequeue_batch_size_sum")


def worker_rate(env: dict[str, str], client: Client, uris: list[str], log: Path,
                max_batch: int) -> tuple[float, int, float, float]:
    """(img/s, failed, share of the wall time the model was running, ms per image inside the model)."""
    port = free_port()
    worker = Worker(env, log, "--max-batch", str(max_batch), "--metrics-port", str(port))
    try:
        wait_all(client, [j.id for j in client.submit_many(uris[:max_batch], style="bench")])  # warm this shape
        seconds_before, images_before = model_seconds(port)
        started = time.perf_counter()
        ids = [j.id for j in client.submit_many(uris, style="bench")]
        finished = wait_all(client, ids)
        seconds, images = (a - b for a, b in zip(model_seconds(port), (seconds_before, images_before), strict=True))
        wall = finished - started
        return len(ids) / wall, count_failed(client, ids), seconds / wall, 1000 * seconds / max(images, 1)
    finally:
        worker.stop()


def model_section(args: argparse.Namespace, work: Path, server: EmbeddedRedis) -> list[str]:
    registry = write_style(work, ngf=args.ngf, n_blocks=args.n_blocks, max_side=args.side, output="jpeg")
    cache_dir = work / "cache"
    before, raw_info = raw_runtime(registry, cache_dir, args.side, args.images, (1, args.max_batch))
    rates = raw_info["rates"]
    shm = Path(tempfile.mkdtemp(prefix="sq-bench-", dir="/dev/shm" if Path("/dev/shm").exists() else None))
    try:
        inputs = shm / "in"
        inputs.mkdir()
        uris = []
        for i in range(args.images):
            (inputs / f"{i}.jpg").write_bytes(photo(args.side, i))
            uris.append(f"file://{inputs}/{i}.jpg")
        storage = f"file://{shm}/store"
        env = base_env(server.url, registry, storage, cache_dir, input_roots=str(inputs))
        client = Client(redis_url=server.url, styles=registry, storage_url=storage, input_roots=str(inputs))
        workers = [("`stylequeue worker`, Redis + `file://` on tmpfs",
                    *worker_rate(env, client, uris, work / "worker-file.log", args.max_batch))]
        if not args.skip_s3:
            workers.append(("`stylequeue worker`, Redis + moto S3 server on this machine",
                            *s3_worker_rate(args, work, server, registry, cache_dir, inputs)))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    # Measured again after the workers, with the batch size that won: these machines drift by several
    # percent over minutes, so the baseline is the mean of a measurement before and one after.
    after, _ = raw_runtime(registry, cache_dir, args.side, args.images, (max(rates, key=rates.get),))
    raw = (before + after) / 2
    shown = ", ".join(f"batch {size} {rate:.2f}" for size, rate in rates.items())
    rows = [f"| raw runtime, in process ({raw_info['runtime']} {raw_info['precision']}; before the workers: "
            f"{shown}; after: {after:.2f}) | {raw:.2f} | 1.00 | {1000 / raw:.1f} | - | - |"]
    rows += [f"| {name} | {rate:.2f} | {rate / raw:.2f} | {per_image:.1f} | {100 * busy:.1f}% | {failed} |"
             for name, rate, failed, busy, per_image in workers]
    header = [f"### Model path: {args.side}x{args.side}, ngf {args.ngf} / {args.n_blocks} blocks, "
              f"{args.images} images, max batch {args.max_batch}\n",
              "| path | img/s | vs raw runtime | ms per image in the model | model busy | failed |",
              "|---|---|---|---|---|---|"]
    notes = ["", "*model busy*: the share of the worker's wall time spent inside the model (its own metrics). "
             "It does not depend on how fast the machine happened to be during the raw measurement."]
    return header + rows + notes


def s3_worker_rate(args: argparse.Namespace, work: Path, server: EmbeddedRedis, registry: Path, cache_dir: Path,
                   inputs: Path) -> tuple[float, int]:
    import boto3

    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
        for _ in range(100):
            try:
                s3.create_bucket(Bucket="bench-in")
                break
            except Exception:
                time.sleep(0.1)
        s3.create_bucket(Bucket="bench-out")
        uris = []
        for path in sorted(inputs.iterdir()):
            s3.put_object(Bucket="bench-in", Key=path.name, Body=path.read_bytes())
            uris.append(f"s3://bench-in/{path.name}")
        creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        env = base_env(server.url, registry, "s3://bench-out", cache_dir, s3_endpoint_url=endpoint,
                       s3_addressing_style="path") | creds
        os.environ.update(creds)
        client = Client(redis_url=server.url, styles=registry, storage_url="s3://bench-out",
                        s3_endpoint_url=endpoint, s3_addressing_style="path")
        return worker_rate(env, client, uris, work / "worker-s3.log", args.max_batch)
    finally:
        moto.terminate()
        moto.wait()


# --- 2. the queue path ---------------------------------------------------------------------------


def celery_noop_rate(server: EmbeddedRedis, tasks: int, work: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    url = server.url.rsplit("/", 1)[0] + "/5"
    env.update({"BENCH_REDIS_URL": url, "PYTHONPATH": str(HERE)})
    log = open(work / "celery-noop.log", "ab")  # noqa: SIM115
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "noop_app", "worker", "-P", "solo",
                               "--prefetch-multiplier", "1", "--without-mingle", "--without-gossip", "-l", "warning"],
                              env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    try:
        sys.path.insert(0, str(HERE))
        os.environ["BENCH_REDIS_URL"] = url
        import noop_app

        noop_app.noop.delay().get(timeout=120)  # the worker is up
        started = time.perf_counter()
        results = [noop_app.noop.delay() for _ in range(tasks)]
        for result in results:
            result.get(timeout=600)
        return tasks / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()


def queue_section(args: argparse.Namespace, work: Path, server: EmbeddedRedis) -> list[str]:
    fmt = args.null_format
    ext = {"jpeg": "jpg", "png": "png"}[fmt]
    registry = write_style(work, ngf=4, n_blocks=1, max_side=64, output=fmt)
    shm = Path(tempfile.mkdtemp(prefix="sq-bench-q-", dir="/dev/shm" if Path("/dev/shm").exists() else None))
    try:
        inputs = shm / "in"
        inputs.mkdir()
        for i in range(16):
            (inputs / f"{i}.{ext}").write_bytes(photo(64, i, fmt.upper()))
        uris = [f"file://{inputs}/{i % 16}.{ext}" for i in range(args.null_jobs)]
        storage = f"file://{shm}/store"
        env = base_env(server.url, registry, storage, work / "cache-null", input_roots=str(inputs), runtime="null",
                       key_prefix="sqnull:")
        client = Client(redis_url=server.url, styles=registry, storage_url=storage, input_roots=str(inputs),
                        key_prefix="sqnull:")
        worker = Worker(env, work / "worker-null.log", "--max-batch", "32")
        try:
            wait_all(client, [j.id for j in client.submit_many(uris[:64], style="bench")])
            started = time.perf_counter()
            ids = [j.id for j in client.submit_many(uris, style="bench")]
            bulk = len(ids) / (wait_all(client, ids) - started)
            bulk_failed = count_failed(client, ids)
            interactive, interactive_failed = float("nan"), 0
            if not args.skip_interactive:
                singles = uris[: args.null_jobs // 5]
                started = time.perf_counter()
                ids = [client.submit(u, style="bench").id for u in singles]
                interactive = len(ids) / (wait_all(client, ids) - started)
                interactive_failed = count_failed(client, ids)
        finally:
            worker.stop()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    noop = celery_noop_rate(server, args.noop_tasks, work)
    return [
        f"### Queue path: `null` runtime, 64 px {fmt.upper()} in and out, `file://` on tmpfs "
        f"({args.null_jobs} bulk jobs, {args.null_jobs // 5} interactive)\n",
        "| path | jobs/s | vs plain Celery no-op | failed |", "|---|---|---|---|",
        f"| bulk (`submit_many`, {BULK_CHUNK_SIZE} jobs/message) | {bulk:,.0f} | {bulk / noop:.1f}x | {bulk_failed} |",
        f"| interactive (`submit`, 1 job/message) | {interactive:,.0f} | {interactive / noop:.1f}x | "
        f"{interactive_failed} |",
        f"| plain Celery no-op task ({args.noop_tasks} tasks) | {noop:,.0f} | 1.0x | - |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--ngf", type=int, default=64,
                        help="model path: generator width (32 runs 4x faster: a stand-in for a faster CPU)")
    parser.add_argument("--n-blocks", type=int, default=9)
    parser.add_argument("--null-jobs", type=int, default=20000)
    parser.add_argument("--noop-tasks", type=int, default=1000)
    parser.add_argument("--null-format", choices=("jpeg", "png"), default="jpeg",
                        help="image format of the queue-path jobs (JPEG is the service's default output)")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--skip-queue", action="store_true")
    parser.add_argument("--skip-interactive", action="store_true", help="queue path: bulk jobs only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sq-e2e-"))
    lines = [f"## bench/e2e.py — {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}\n"]
    with EmbeddedRedis(persist=False) as server:
        if not args.skip_model:
            lines += model_section(args, work, server) + [""]
        if not args.skip_queue:
            lines += queue_section(args, work, server)
    print("\n".join(lines))
    print(f"\n(logs in {work})")


if __name__ == "__main__":
    main()
