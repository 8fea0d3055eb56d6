"""Redis CPU per job for each job-store step a bulk job goes through, measured on the Redis server process.

    python bench/store_steps.py [--jobs 12800] [--group 128] [--rounds 3]

The steps, each over every job in groups as a worker meets them: `create_many` (the producer's records, with
their due entries), `dispatched` (their messages sent: due -> sent), `claim_many`, `fence_many` (the owner
check that records the staged output and results) and the success transition. No worker, no broker and no
files: only the job store's scripts on a private Redis without persistence, so a change to a script shows
here alone. CPU is the server's user + system time (psutil, 10 ms ticks: about 0.8 us per job at 12,800
jobs). Each step's figure is the median over the rounds. Run it with PYTHONPATH on another checkout to
compare two versions of the scripts in one sitting.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

from stylequeue.embedded import EmbeddedRedis
from stylequeue.jobs import Job, JobState, Priority, RedisJobStore
from stylequeue.jobs.record import new_job_id
from stylequeue.jobs.store import Change

RESULTS = {"width": 64, "height": 64, "model": "bench", "output_bytes": 1000,
           "timings_ms": {"queued": 1.0, "fetch": 0.2, "infer": 0.5, "store": 0.3}}


def one_round(store: RedisJobStore, server: psutil.Process, jobs: int, group: int) -> dict[str, float]:
    """Server CPU seconds per step for `jobs` new jobs."""
    made = [Job(id=new_job_id(), style="bench", input_uri=f"file:///in/{i % 16}.jpg",
                output_uri=f"file:///out/{i}.jpg", priority=Priority.BULK) for i in range(jobs)]
    groups = [made[i:i + group] for i in range(0, jobs, group)]
    used: dict[str, float] = {}

    def step(name: str, run: Callable[[], object]) -> None:
        before = sum(server.cpu_times()[:2])
        run()
        used[name] = sum(server.cpu_times()[:2]) - before

    tokens: list[int] = []
    step("create_many", lambda: tokens.extend(store.create_many(g) for g in groups))
    step("dispatched", lambda: [store.dispatched([j.id for j in g], t) for g, t in zip(groups, tokens, strict=True)])
    step("claim_many", lambda: [store.claim_many([j.id for j in g], "w1", lease_s=60) for g in groups])
    step("fence_many", lambda: [store.fence_many("w1", [(j.id, 1, f"file:///out/.{j.id}.a1.x.sqtmp", RESULTS)
                                                        for j in g], lease_s=60) for g in groups])
    step("succeed", lambda: [store.transition_many([Change(j.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w1",
                                                           attempt=1) for j in g]) for g in groups])
    store.redis.flushdb()
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=12800)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    with EmbeddedRedis(persist=False) as server:
        store = RedisJobStore.from_url(server.url, key_prefix="steps:")
        process = psutil.Process(server.process.pid)
        one_round(store, process, args.group, args.group)  # scripts loaded, server warm
        rounds = [one_round(store, process, args.jobs, args.group) for _ in range(args.rounds)]
    print(f"## bench/store_steps.py — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.jobs:,} jobs in groups of {args.group}, {args.rounds} rounds, code from "
          f"{Path(sys.modules['stylequeue'].__file__ or '').parent.parent}\n")
    print("| step | Redis CPU us per job (median) | rounds |")
    print("|---|---|---|")
    total = 0.0
    for name in rounds[0]:
        values = [r[name] * 1e6 / args.jobs for r in rounds]
        total += statistics.median(values)
        print(f"| {name} | {statistics.median(values):.1f} | {' / '.join(f'{v:.1f}' for v in values)} |")
    print(f"| **all** | **{total:.1f}** | |")


if __name__ == "__main__":
    main()
