"""A fleet on one box: three workers with distinct node names on one Redis, one scaled in (SIGTERM) mid-run while
another is scaled out. Every job succeeds once, and the scaled-in worker's unstarted jobs are given back with
their messages due at once: each is claimed again within one lease period, never left for its lease to run out.

Jobs here cost no CPU (the null runtime) but time: each input is served after HOLD_S, so a worker holds a
backlog of claimed, unstarted jobs when it is told to stop.
"""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from stylequeue import Client, JobState
from stylequeue.embedded import EmbeddedRedis, free_port
from stylequeue.jobs import Presence, parse_iso
from tests.conftest import empty_database
from tests.workers import WorkerProcess, make_image, serve_http, slow_image, wait_for, worker_env

pytestmark = pytest.mark.slow

HOLD_S = 0.25
LEASE_S = 3.0
JOBS = 384  # three bulk messages of 128


def jobs_done(metrics_port: int) -> float:
    """A worker's stylequeue_jobs_total, all states and styles."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(value) for value in re.findall(r"^stylequeue_jobs_total{[^}]*} ([0-9.e+-]+)$", text, re.M))


@pytest.fixture
def fleet(redis_server: EmbeddedRedis, tiny_registry: Path, tmp_path: Path) -> Iterator[dict]:
    url = empty_database(redis_server, 15)
    storage = f"file://{tmp_path}/store"
    env = worker_env(url, tiny_registry, storage, runtime="null", lease_s=str(LEASE_S), max_batch="2",
                     visibility_timeout_s="600")
    client = Client(redis_url=url, styles=tiny_registry, storage_url=storage, allow_private_networks=True)
    workers: list[WorkerProcess] = []

    def start(name: str, *args: str) -> WorkerProcess:
        # Distinct Celery node names, as on distinct hosts; no codec processes (bulk jobs run on job threads,
        # two to a group, so a stopped worker has unstarted groups to give back).
        worker = WorkerProcess(env, tmp_path / f"{name}.log", "--hostname", f"{name}@%h", "--codec-procs", "0",
                               *args)
        workers.append(worker)
        return worker

    with serve_http(slow_image(make_image(32, 32), HOLD_S)) as base:
        yield {"client": client, "start": start, "input": f"{base}/a.png", "out": tmp_path / "store",
               "newcomer_metrics": free_port()}
        client.close()
        for worker in workers:
            worker.stop()


def test_scale_in_and_out_mid_run_every_job_succeeds_once_none_left_for_a_lease(fleet: dict) -> None:
    client: Client = fleet["client"]
    first = [fleet["start"](f"fleet-{n}") for n in (1, 2, 3)]
    for worker in first:
        worker.wait_ready()
    assert len(Presence(client.store).workers()) == 3
    jobs = client.submit_many([fleet["input"]] * JOBS, style="tiny")
    ids = [job.id for job in jobs]
    # Wait until work is spread and under way, then stop the worker holding the most jobs it has not finished.
    assert wait_for(lambda: sum(j.state == JobState.SUCCEEDED for j in client.get_many(ids)) >= 12, timeout=60)
    running = [j for j in client.get_many(ids) if j.state == JobState.RUNNING]
    owners = {j.owner for j in running}
    victim_id = max(owners, key=lambda owner: sum(j.owner == owner for j in running))
    (victim,) = [w for w in first if victim_id.endswith(f"-{w.process.pid}")]
    held = {j.id for j in running if j.owner == victim_id}
    stopped_at = time.time()
    victim.process.send_signal(signal.SIGTERM)
    newcomer = fleet["start"]("fleet-4", "--metrics-port", str(fleet["newcomer_metrics"]))  # scale-out meanwhile
    assert victim.process.wait(60) == 0, victim.output()[-3000:]
    newcomer.wait_ready()
    # More work once the newcomer is in: one message a job, so all three live workers share it.
    ids += [client.submit(fleet["input"], style="tiny").id for _ in range(60)]
    finished = [client.wait(job_id, timeout=180) for job_id in ids]

    assert all(j.state == JobState.SUCCEEDED for j in finished), [j.error for j in finished if j.error]
    # Once: one output per job, and no attempt was ever lost and taken over.
    assert sorted(p.name for p in (fleet["out"] / "outputs" / "tiny").iterdir()) == sorted(f"{i}.png" for i in ids)
    assert {j.attempts for j in finished} == {1}
    # A finished record names no owner; a given-back job is one the victim held that was claimed after the stop.
    given_back = [j for j in finished if j.id in held and parse_iso(j.started_at) > stopped_at]
    assert given_back, "the stopped worker gave nothing back: it must stop with unstarted jobs in hand"
    late = {j.id: round(parse_iso(j.started_at) - stopped_at, 2) for j in given_back
            if parse_iso(j.started_at) - stopped_at > LEASE_S}
    assert not late, f"given-back jobs claimed again more than one lease period after the stop: {late}"
    assert "gave back" in victim.output()
    assert jobs_done(fleet["newcomer_metrics"]) > 0, "the new worker took no work"
    for worker in (*first, newcomer):
        assert "lease of" not in worker.output(), "a job waited for its lease to run out"
