"""A highly available Redis through Sentinel: one `redis+sentinel://` STYLEQUEUE_REDIS_URL serves the job store and
the broker, and a failover mid-run (the primary stopped, the sentinel promotes the replica) loses no job, ends no
worker, and jobs flow again within seconds. Servers: tests/brokers.py's SentinelGroup (primary, replica, sentinel).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stylequeue import Client, JobState
from stylequeue.config.settings import load_settings
from stylequeue.errors import ConfigError, RedisUnavailable
from stylequeue.jobs import Job, Priority, RedisJobStore, new_job_id, parse_iso
from tests.brokers import SentinelGroup, sentinel_group  # noqa: F401 - sentinel_group is a fixture
from tests.conftest import write_tiny_style
from tests.workers import WorkerProcess, make_image, wait_for, worker_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A style slow enough (ngf 16, 4 blocks, 128 px) that a run of jobs spans the failover."""
    return write_tiny_style(tmp_path_factory.mktemp("slow"), name="slow", ngf=16, n_blocks=4, max_side=128)


@pytest.fixture
def group(sentinel_group: SentinelGroup) -> Iterator[SentinelGroup]:  # noqa: F811
    yield sentinel_group


def answers(client: Client) -> bool:
    try:
        client.store.ping()
        return True
    except RedisUnavailable:
        return False


def test_a_bad_sentinel_url_is_one_line_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEQUEUE_REDIS_URL", "redis+sentinel://h1:26379,h2:26379")
    with pytest.raises(ConfigError, match="STYLEQUEUE_REDIS_URL.*service name"):
        load_settings()


def test_a_demoted_primary_refusing_writes_is_redis_unavailable(group: SentinelGroup) -> None:
    """What a client still connected to a primary that failover turned into a replica meets: READONLY."""
    store = RedisJobStore(group.client("replica"))
    with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
        store.create(Job(id=new_job_id(), style="slow", input_uri="file:///x.png", output_uri="file:///y.png",
                         priority=Priority.BULK))


def test_failover_mid_run_loses_nothing_and_jobs_flow_again_within_seconds(group: SentinelGroup, registry: Path,
                                                                          tmp_path: Path) -> None:
    url = group.url(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(make_image(128, 96))
    storage = f"file://{tmp_path}/store"
    # The worker's broker is the same redis+sentinel:// URL (STYLEQUEUE_BROKER_URL unset).
    env = worker_env(url, registry, storage, input_roots=f"{inputs},{tmp_path}/store", max_batch="4")
    client = Client(redis_url=url, styles=registry, storage_url=storage, input_roots=str(inputs))
    source = f"file://{inputs}/a.png"
    worker = WorkerProcess(env, tmp_path / "worker.log").wait_ready()
    try:
        before = client.submit_many([source] * 100, style="slow")
        ids = [job.id for job in before]
        assert wait_for(lambda: sum(j.state == JobState.SUCCEEDED for j in client.get_many(ids)) >= 10,
                        timeout=120), worker.output()[-2000:]
        old_primary = group.primary_port()
        stopped_at = time.time()
        group.stop_server("primary")
        # Promoted: the sentinel names the replica, and says it is up (redis-py asks for both before connecting).
        assert wait_for(lambda: group.primary_port() != old_primary and answers(client), timeout=30), \
            "the sentinel promoted no replica"
        promoted_at = time.time()
        unfinished = [j for j in client.get_many(ids) if j.state != JobState.SUCCEEDED]
        assert len(unfinished) > 20, "the failover must land mid-run"
        # New work after the failover: messages through the new primary, taken by the same worker's consumer.
        after = [client.submit(source, style="slow") for _ in range(10)]
        finished = [client.wait(j.id, timeout=180) for j in [*before, *after]]
        assert worker.process.poll() is None, "the worker exited at the failover"
    finally:
        client.close()
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    assert all(j.state == JobState.SUCCEEDED for j in finished), [j.error for j in finished if j.error]
    outputs = sorted(p.name for p in (tmp_path / "store" / "outputs" / "slow").iterdir())
    assert outputs == sorted(f"{j.id}.png" for j in finished)  # each job's output once, no strays
    first_after = min(parse_iso(j.finished_at) for j in finished if parse_iso(j.finished_at) > stopped_at)
    assert first_after - promoted_at < 15, f"jobs flowed again only {first_after - promoted_at:.1f} s after promotion"
