"""Faults cost no job and no callback (docs/jobs.md, "Retries and faults"; issue 10's table), tried for real:
real worker processes over a real Redis, a webhook receiver that goes away, a worker killed with SIGKILL,
moto behind a TCP forwarder that is switched off, and a receiver that never answers.

Each test asserts the outcome in the issue's terms: every job `succeeded` once, each callback delivered and
verified, and the worker that saw the fault still consuming. A Redis restart is tests/test_faults_redis.py's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from stylequeue import Client, JobState
from stylequeue.broker import BULK_CHUNK_SIZE, INTERACTIVE_QUEUE
from stylequeue.embedded import EmbeddedRedis
from stylequeue.jobs import DUE, SENT, parse_iso
from stylequeue.webhooks import BACKOFF_S, DEFAULT_TIMEOUT_S, JITTER
from stylequeue.worker.outage import OUTAGE_FAILURES
from tests.conftest import empty_database, write_tiny_style
from tests.faults import Fleet, HangingReceiver, TcpForwarder, WebhookReceiver, held_by, worker_id
from tests.workers import WorkerProcess, make_image, wait_for, worker_env

pytestmark = pytest.mark.slow

SECRET = "whsec_" + "c3R5bGVxdWV1ZS10ZXN0LXNlY3JldC0zMmJ5dGVzISE="
# The lease keeper drains the due sets every half second; a little more for a loaded 2-core machine.
DRAIN_SLACK_S = 5.0


@pytest.fixture(scope="module")
def slow_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A style heavy enough (ngf 16, 4 blocks, 128 px) that a run of jobs lasts several seconds."""
    return write_tiny_style(tmp_path_factory.mktemp("slow"), name="slow", ngf=16, n_blocks=4, max_side=128)


@pytest.fixture
def files(tmp_path: Path) -> dict:
    """An input photo and a file:// store, both under this test's directory."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(make_image(128, 96))
    return {"input": f"file://{inputs}/a.png", "roots": f"{inputs},{tmp_path}/store",
            "storage": f"file://{tmp_path}/store", "inputs": str(inputs), "out": tmp_path / "store"}


def fleet_for(redis_server: EmbeddedRedis, db: int, registry: Path, files: dict, tmp_path: Path,
              **extra: str) -> tuple[Fleet, Client]:
    url = empty_database(redis_server, db)
    env = worker_env(url, registry, files["storage"], input_roots=files["roots"], webhook_secret=SECRET, **extra)
    client = Client(redis_url=url, styles=registry, storage_url=files["storage"], input_roots=files["inputs"],
                    allow_private_networks=True)
    return Fleet(env, tmp_path), client


@pytest.fixture
def tiny_fleet(redis_server: EmbeddedRedis, tiny_registry: Path, files: dict, tmp_path: Path
               ) -> Iterator[tuple[Fleet, Client]]:
    fleet, client = fleet_for(redis_server, 10, tiny_registry, files, tmp_path)
    yield fleet, client
    client.close()
    fleet.stop_all()


def owed_callbacks(client: Client, ids: list[str]) -> list[dict]:
    return [job.callback or {} for job in client.get_many(ids) if job is not None]


def still_consuming(fleet: Fleet, client: Client, input_uri: str, style: str, alive: int) -> None:
    """`alive` worker processes (the ones that saw the fault) still run, and a new job goes through them."""
    assert len(fleet.live()) == alive, fleet.outputs()
    fresh = client.wait(client.submit(input_uri, style=style).id, timeout=60)
    assert fresh.state == JobState.SUCCEEDED and fresh.attempts == 1


def busy_worker(client: Client, ids: list[str], workers: list[WorkerProcess], *,
                done_at_least: int) -> WorkerProcess | None:
    """A worker holding running jobs, once `done_at_least` of `ids` succeeded; else None."""
    if sum(j.state == JobState.SUCCEEDED for j in client.get_many(ids) if j) < done_at_least:
        return None
    return next((w for w in workers if held_by(client.store.redis, worker_id(w))), None)


def test_callbacks_reach_a_receiver_that_refused_connections_once_it_is_back(
        tiny_fleet: tuple[Fleet, Client], files: dict) -> None:
    fleet, client = tiny_fleet
    receiver = WebhookReceiver(SECRET)
    receiver.refuse()  # down before the jobs finish: every first attempt is refused
    try:
        fleet.start(1)
        ids = [client.submit(files["input"], style="tiny", callback_url=receiver.url).id for _ in range(10)]
        assert all(client.wait(job_id, timeout=60).state == JobState.SUCCEEDED for job_id in ids)
        # Down through the ~5 s retry as well (issue 10's table: "pending, attempts 2"), then back.
        assert wait_for(lambda: all(c.get("attempts") == 2 for c in owed_callbacks(client, ids)),
                        timeout=BACKOFF_S[0] * (1 + JITTER) + 15), owed_callbacks(client, ids)
        assert not receiver.received()
        receiver.accept()
        # The next retry is the 30 s step: one backoff step after the receiver returned, all are through.
        one_step = BACKOFF_S[1] * (1 + JITTER) + DRAIN_SLACK_S
        assert wait_for(lambda: all(c.get("state") == "delivered" for c in owed_callbacks(client, ids)),
                        timeout=one_step), owed_callbacks(client, ids)
        delivered = receiver.by_job()
        assert sorted(delivered) == sorted(ids)
        for job_id, deliveries in delivered.items():
            assert len(deliveries) == 1, f"job {job_id} delivered {len(deliveries)} times"
            assert deliveries[0].verified, deliveries[0].error
            assert deliveries[0].record["state"] == "succeeded"
        for callback in owed_callbacks(client, ids):
            assert callback["attempts"] == 3 and callback["last_status"] == 200
        still_consuming(fleet, client, files["input"], "tiny", 1)
    finally:
        receiver.close()


def test_a_worker_killed_mid_run_leaves_no_job_and_no_callback_behind(
        redis_server: EmbeddedRedis, slow_registry: Path, files: dict, tmp_path: Path) -> None:
    fleet, client = fleet_for(redis_server, 11, slow_registry, files, tmp_path, max_batch="2")
    # A receiver that takes a while to answer, so finished jobs' callbacks queue up in the workers.
    receiver = WebhookReceiver(SECRET, delay_s=0.5)
    try:
        workers = fleet.start(2)
        ids = [j.id for j in client.submit_many([files["input"]] * 24, style="slow", priority="interactive",
                                                callback_url=receiver.url)]

        deadline, victim = time.monotonic() + 120, None
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.05)
            victim = busy_worker(client, ids, workers, done_at_least=4)
        assert victim is not None, fleet.outputs()
        survivor = next(w for w in workers if w is not victim)
        fleet.kill9(victim)
        killed_at = time.time()
        jobs = client.get_many(ids)
        owed = [j.id for j in jobs if j and j.finished and (j.callback or {}).get("state") == "pending"]
        assert any(j.state == JobState.RUNNING for j in jobs if j), "the kill must land while jobs run"
        assert owed, "the kill must land while finished jobs still owe their callbacks"

        finished = [client.wait(job_id, timeout=180) for job_id in ids]
        assert all(j.state == JobState.SUCCEEDED for j in finished), [j.error for j in finished]
        # A job the dead worker had begun (as its lease keeper reported) spent that attempt; one it had only
        # claimed, or begun too recently to report, got it back.
        assert all(j.attempts <= 2 for j in finished), [j.attempts for j in finished]
        written = sorted(p.name for p in (files["out"] / "outputs" / "slow").iterdir() if not p.name.startswith("."))
        assert written == sorted(f"{job_id}.png" for job_id in ids)  # one output per job

        # A callback the dead worker held comes due when its delivery lease ends (CALLBACK_LEASE_S).
        assert wait_for(lambda: all(c.get("state") == "delivered" for c in owed_callbacks(client, ids)),
                        timeout=120), [c for c in owed_callbacks(client, ids) if c.get("state") != "delivered"]
        delivered = receiver.by_job()
        assert sorted(delivered) == sorted(ids)
        for job_id, deliveries in delivered.items():
            assert all(d.verified for d in deliveries)
            assert len({d.webhook_id for d in deliveries}) == 1
            # A second POST is allowed only for a delivery the dead worker made but could not record.
            assert all(d.at <= killed_at for d in deliveries[:-1]), f"job {job_id} delivered twice by live workers"
        still_consuming(fleet, client, files["input"], "slow", 1)
        assert survivor.process.poll() is None
    finally:
        receiver.close()
        client.close()
        fleet.stop_all()


def test_a_message_a_dying_worker_popped_is_still_owed(
        redis_server: EmbeddedRedis, tiny_registry: Path, files: dict, tmp_path: Path) -> None:
    """The interleaving every kill -9 of a busy worker risks, made certain: kombu's BRPOP hands the message
    over (Redis pops it) and only then does the worker write it to the broker's `unacked` hash; a worker
    frozen in BRPOP takes the message and dies before that write. The job must still be owed somewhere
    (its message due on the due set, watched on `sent`, or the message itself in its queue or among the
    unacknowledged) rather than wait for the sweep, and another worker must run it within the watch's time."""
    fleet, client = fleet_for(redis_server, 14, tiny_registry, files, tmp_path)
    broker = client.store.redis
    try:
        first = fleet.start(1)[0]
        popped = None
        for _ in range(10):  # until the frozen worker's pending BRPOP is what took the message
            fleet.freeze(first)
            job = client.submit(files["input"], style="tiny")
            if wait_for(lambda: broker.llen(INTERACTIVE_QUEUE) == 0, timeout=2, interval=0.05):
                popped = job
                break
            fleet.thaw(first)  # it was between two BRPOPs: it takes the message now; try again
            assert client.wait(job.id, timeout=30).state == JobState.SUCCEEDED
        assert popped is not None, "the frozen worker never took a message"
        fleet.kill9(first)
        assert client.get(popped.id).state == JobState.QUEUED  # the frozen worker never claimed it
        messages = [*broker.lrange(INTERACTIVE_QUEUE, 0, -1), *broker.hvals("unacked")]
        owed = (popped.id in client.store.scheduled(DUE) or popped.id in client.store.scheduled(SENT)
                or any(popped.id.encode() in m for m in messages))
        assert owed, "nothing owes the job: only the sweep, 3 visibility periods later, can bring it back"
        fleet.start(1)  # lease 3 s: the watch calls a message lost 10 s after it went out
        assert client.wait(popped.id, timeout=60).state == JobState.SUCCEEDED
        assert client.store.stats().get("sweep_found", 0) == 0
    finally:
        client.close()
        fleet.stop_all()


def test_a_killed_worker_costs_no_attempt_to_jobs_it_never_started(
        redis_server: EmbeddedRedis, tiny_registry: Path, files: dict, tmp_path: Path) -> None:
    # max batch 2: 2 * 2 + 2 = 6 job threads taking bulk groups of 2, so at most 12 jobs are under way at once;
    # the rest of the chunk (one message of BULK_CHUNK_SIZE) waits, claimed, in the worker's own queue.
    fleet, client = fleet_for(redis_server, 13, tiny_registry, files, tmp_path, max_batch="2")
    in_progress_at_most = (2 * 2 + 2) * 2
    try:
        first = fleet.start(1)[0]
        ids = [j.id for j in client.submit_many([files["input"]] * BULK_CHUNK_SIZE, style="tiny")]
        assert wait_for(lambda: sum(j.state == JobState.SUCCEEDED for j in client.get_many(ids) if j) >= 4,
                        timeout=120), fleet.outputs()
        held = held_by(client.store.redis, worker_id(first))
        fleet.kill9(first)
        assert len(held) > in_progress_at_most, "the kill must land while jobs wait unstarted"
        fleet.start(1)
        finished = [client.wait(job_id, timeout=180) for job_id in ids]
        assert all(j.state == JobState.SUCCEEDED for j in finished)
        charged = [j.id for j in finished if j.attempts > 1]
        assert len(charged) <= in_progress_at_most, f"{len(charged)} jobs charged an attempt for one kill"
    finally:
        client.close()
        fleet.stop_all()


def test_an_object_store_outage_spends_no_attempts(
        redis_server: EmbeddedRedis, s3_endpoint: str, slow_registry: Path, tmp_path: Path) -> None:
    host, port = s3_endpoint.rsplit("//", 1)[1].split(":")
    store = TcpForwarder(host, int(port))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"outage-{port}-{store.port}"
    s3.create_bucket(Bucket=bucket)
    for i in range(8):
        s3.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=make_image(128, 96, seed=i))
    url = empty_database(redis_server, 12)
    storage = f"s3://{bucket}/store"
    env = worker_env(url, slow_registry, storage, s3_endpoint_url=store.url, s3_addressing_style="path",
                     outage_s="120", max_batch="4")
    client = Client(redis_url=url, styles=slow_registry, storage_url=storage, s3_endpoint_url=s3_endpoint,
                    s3_addressing_style="path")
    fleet = Fleet(env, tmp_path)
    try:
        fleet.start(1)
        ids = [j.id for j in client.submit_many([f"s3://{bucket}/in/{i % 8}.png" for i in range(80)], style="slow")]
        assert wait_for(lambda: sum(j.state == JobState.SUCCEEDED for j in client.get_many(ids) if j) >= 10,
                        timeout=120), fleet.outputs()
        store.off()
        unfinished = [j for j in client.get_many(ids) if j and not j.finished]
        assert unfinished, "the outage must begin mid-run"
        time.sleep(12)
        store.on()
        finished = [client.wait(job_id, timeout=240) for job_id in ids]
        assert [j.error for j in finished if j.state != JobState.SUCCEEDED] == []
        # Only the jobs whose failures revealed the outage spent an attempt (the guard calls a dependency down
        # after OUTAGE_FAILURES jobs in a row failed on it); none spent two, none failed.
        charged = [(j.id, j.attempts) for j in finished if j.attempts != 1]
        assert len(charged) <= OUTAGE_FAILURES and all(n == 2 for _, n in charged), f"the outage cost {charged}"
        keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="store/")
                for o in page.get("Contents", [])}
        assert keys == {f"store/outputs/slow/{job_id}.png" for job_id in ids}
        still_consuming(fleet, client, f"s3://{bucket}/in/0.png", "slow", 1)
    finally:
        client.close()
        fleet.stop_all()
        store.close()


def test_a_receiver_that_never_answers_delays_no_interactive_job(tiny_fleet: tuple[Fleet, Client],
                                                                 files: dict) -> None:
    fleet, client = tiny_fleet
    hanging = HangingReceiver()
    try:
        fleet.start(1)
        ids = [j.id for j in client.submit_many([files["input"]] * 40, style="tiny", priority="interactive",
                                                callback_url=hanging.url)]
        assert all(client.wait(job_id, timeout=60).state == JobState.SUCCEEDED for job_id in ids)
        assert wait_for(lambda: len(hanging.accepted_at) >= 1, timeout=30)
        # Another tenant's interactive job, submitted while the 40 callbacks hang.
        urgent = client.wait(client.submit(files["input"], style="tiny").id, timeout=60)
        assert urgent.state == JobState.SUCCEEDED
        # It finished before the first hanging delivery could even time out: no callback held it up.
        assert parse_iso(urgent.finished_at) < hanging.accepted_at[0] + DEFAULT_TIMEOUT_S
        assert all(c.get("state") == "pending" for c in owed_callbacks(client, ids))
        assert hanging.open_connections() >= 1  # they are still hanging now
    finally:
        hanging.close()
