"""The fleet's backlog by priority and style (jobs/backlog.py), and the worker metrics an autoscaler reads from it."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
import redis

from stylequeue.embedded import EmbeddedRedis, free_port
from stylequeue.jobs import Job, JobState, Priority, RedisJobStore, new_job_id
from stylequeue.jobs.backlog import read_backlog
from stylequeue.producer.client import Client
from stylequeue.worker.metrics import WorkerMetrics
from tests.conftest import empty_database
from tests.workers import WorkerProcess, wait_for, worker_env


def jobs(style: str, priority: Priority, count: int) -> list[Job]:
    return [Job(id=new_job_id(), style=style, input_uri="file:///in.png", output_uri=f"file:///out/{n}.png",
                priority=priority) for n in range(count)]


@pytest.fixture
def store(redis_url: str) -> RedisJobStore:
    return RedisJobStore(redis.Redis.from_url(redis_url))


def test_a_small_backlog_is_counted_exactly_and_running_jobs_apart(store: RedisJobStore) -> None:
    store.create_many(jobs("ink", Priority.BULK, 30) + jobs("oil", Priority.BULK, 5))
    store.create_many(jobs("ink", Priority.INTERACTIVE, 7))
    first = jobs("oil", Priority.INTERACTIVE, 2)
    store.create_many(first)
    store.claim(first[0].id, "w1", lease_s=30)
    backlog = read_backlog(store)
    assert backlog.exact and backlog.total == 43 and backlog.running == 1
    assert backlog.waiting == {(Priority.BULK, "ink"): 30, (Priority.BULK, "oil"): 5,
                               (Priority.INTERACTIVE, "ink"): 7, (Priority.INTERACTIVE, "oil"): 1}


def test_a_large_backlog_is_split_by_a_sample_scaled_to_the_exact_total(store: RedisJobStore) -> None:
    store.create_many(jobs("ink", Priority.BULK, 1500) + jobs("oil", Priority.BULK, 500))
    backlog = read_backlog(store, sample=256)
    assert not backlog.exact and backlog.total == 2000
    assert sum(backlog.waiting.values()) == pytest.approx(2000)
    # The standard error of a share from 256 of 2000 is about 2.5% of the total (50 jobs): allow 4 of them.
    assert backlog.waiting[(Priority.BULK, "oil")] == pytest.approx(500, abs=200)


def test_an_empty_store_has_no_backlog(store: RedisJobStore) -> None:
    assert read_backlog(store).total == 0 and read_backlog(store).waiting == {}
    moved = jobs("ink", Priority.BULK, 1)
    store.create_many(moved)
    store.transition(moved[0].id, JobState.QUEUED, JobState.CANCELLED)
    assert read_backlog(store).total == 0


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_a_style_no_longer_waiting_reads_zero_not_its_last_value() -> None:
    metrics = WorkerMetrics()
    server, _ = metrics.serve(free_port())
    try:
        port = server.server_address[1]
        metrics.set_backlog({("bulk", "ink"): 40, ("interactive", "oil"): 2}, running=3)
        metrics.set_backlog({("bulk", "ink"): 10}, running=1)
        text = scrape(port)
        assert 'stylequeue_jobs_waiting{priority="bulk",style="ink"} 10.0' in text
        assert 'stylequeue_jobs_waiting{priority="interactive",style="oil"} 0.0' in text
        assert "stylequeue_jobs_running 1.0" in text
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_running_worker_exposes_the_backlog_by_priority_and_style(redis_server: EmbeddedRedis,
                                                                    tiny_registry: Path, tmp_path: Path) -> None:
    """A callbacks-only worker takes no job, so the backlog it reports stays put: 200 bulk and 4 interactive."""
    url = empty_database(redis_server, 14)
    storage = f"file://{tmp_path}/store"
    client = Client(redis_url=url, styles=tiny_registry, storage_url=storage, input_roots=str(tmp_path))
    client.submit_many([f"file://{tmp_path}/a.png"] * 200, style="tiny")
    for _ in range(4):
        client.submit(f"file://{tmp_path}/a.png", style="tiny")
    port = free_port()
    worker = WorkerProcess(worker_env(url, tiny_registry, storage), tmp_path / "worker.log", "--callbacks-only",
                           "--metrics-port", str(port)).wait_ready(timeout=60)
    try:
        def waiting() -> dict[str, float]:
            found = re.findall(r'^stylequeue_jobs_waiting{priority="(\w+)",style="tiny"} ([0-9.e+]+)$', scrape(port),
                               re.M)
            return {priority: float(value) for priority, value in found}

        assert wait_for(lambda: waiting() == {"bulk": 200, "interactive": 4}, timeout=30), scrape(port)
        assert re.search(r"^stylequeue_jobs_running 0\.0$", scrape(port), re.M)
    finally:
        client.close()
        assert worker.stop() == 0
