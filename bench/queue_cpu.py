"""Where the CPU goes on the null-model bulk path: seconds of CPU per process, per job.

    python bench/queue_cpu.py [--jobs 20000] [--codec-procs N] [--runs 3]

The same path as `bench/e2e.py --skip-model` (a real `stylequeue worker` with the `null` runtime,
64 px JPEGs in and out, `file://` on tmpfs, jobs sent with `submit_many`), with the CPU time of every
process involved read before and after: the worker, its codec processes, Redis, and this producer
(which submits, then polls for the end; its last read of every record is after the clock stops, but
counted). On a machine with two cores the total per job is what bounds jobs/s; the split says
which process to work on. Prints a Markdown table per run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import Worker, base_env, count_failed, cpu_name, cpu_seconds, photo, wait_all, write_style  # noqa: E402

from stylequeue.embedded import EmbeddedRedis  # noqa: E402
from stylequeue.producer.client import Client  # noqa: E402


def one_run(work: Path, jobs: int, worker_args: list[str]) -> list[str]:
    with EmbeddedRedis(persist=False) as server:
        registry = write_style(work, ngf=4, n_blocks=1, max_side=64, output="jpeg")
        shm = Path(tempfile.mkdtemp(prefix="sq-cpu-", dir="/dev/shm" if Path("/dev/shm").exists() else None))
        try:
            inputs = shm / "in"
            inputs.mkdir()
            for i in range(16):
                (inputs / f"{i}.jpg").write_bytes(photo(64, i, "JPEG"))
            uris = [f"file://{inputs}/{i % 16}.jpg" for i in range(jobs)]
            storage = f"file://{shm}/store"
            env = base_env(server.url, registry, storage, work / "cache", input_roots=str(inputs), runtime="null",
                           key_prefix="sqcpu:")
            client = Client(redis_url=server.url, styles=registry, storage_url=storage, input_roots=str(inputs),
                            key_prefix="sqcpu:")
            worker = Worker(env, work / "worker.log", "--max-batch", "32", *worker_args)
            try:
                wait_all(client, [j.id for j in client.submit_many(uris[:128], style="bench")])
                main = psutil.Process(worker.process.pid)
                processes = {"worker (Celery, claims, batcher, finishing)": main,
                             "Redis": psutil.Process(server.process.pid), "producer (this process)": psutil.Process()}
                children = [c for c in main.children(recursive=True) if cpu_seconds(c) > 0.05]
                for index, child in enumerate(children, 1):
                    processes[f"codec process {index}"] = child
                stats = redis.Redis.from_url(server.url)
                commands_before = stats.info("commandstats")  # the embedded Redis has no CONFIG RESETSTAT
                before = {name: cpu_seconds(p) for name, p in processes.items()}
                started = time.perf_counter()
                ids = [j.id for j in client.submit_many(uris, style="bench")]
                elapsed = wait_all(client, ids) - started
                used = {name: cpu_seconds(p) - before[name] for name, p in processes.items()}
                commands = {name: {key: value[key] - commands_before.get(name, {}).get(key, 0)
                                   for key in ("calls", "usec")}
                            for name, value in stats.info("commandstats").items()}
                failed = count_failed(client, ids)
            finally:
                worker.stop()
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    total = sum(used.values())
    lines = [f"{jobs:,} jobs in {elapsed:.2f} s: **{jobs / elapsed:,.0f} jobs/s**, {failed} failed\n",
             "| process | CPU s | ms per job | share |", "|---|---|---|---|"]
    lines += [f"| {name} | {seconds:.2f} | {1000 * seconds / jobs:.3f} | {100 * seconds / total:.0f}% |"
              for name, seconds in used.items()]
    lines.append(f"| **all** | {total:.2f} | **{1000 * total / jobs:.3f}** | 100% |")
    # Inside Redis: time per command (a script's own commands count apart too; evalsha's time includes theirs).
    lines += ["", "| Redis command | calls per job | µs per job |", "|---|---|---|"]
    ranked = sorted(commands.items(), key=lambda item: -item[1]["usec"])
    lines += [f"| {name.removeprefix('cmdstat_')} | {value['calls'] / jobs:.3f} | {value['usec'] / jobs:.1f} |"
              for name, value in ranked[:12]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--codec-procs", type=int, default=None)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    worker_args = [] if args.codec_procs is None else ["--codec-procs", str(args.codec_procs)]
    print(f"## bench/queue_cpu.py — {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
    for run in range(1, args.runs + 1):
        work = Path(tempfile.mkdtemp(prefix="sq-cpu-"))
        try:
            print(f"### run {run}\n")
            print("\n".join(one_run(work, args.jobs, worker_args)) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
