"""Client (docs/python.md) against a real Redis: jobs are recorded and their messages really enqueued."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from stylequeue import Client, ConfigError, InputForbidden, JobNotFound, JobState, UnknownStyle, WaitTimeout
from stylequeue.broker import BULK_CHUNK_SIZE, BULK_QUEUE, INTERACTIVE_QUEUE
from stylequeue.embedded import free_port
from stylequeue.errors import RedisUnavailable


@pytest.fixture
def client(redis_url: str, tiny_registry: Path, tmp_path: Path) -> Client:
    c = Client(redis_url=redis_url, styles=tiny_registry, storage_url=f"file://{tmp_path}/store")
    yield c
    c.close()


def queued_messages(redis_url: str, queue: str) -> list[dict]:
    """Celery messages waiting in a kombu Redis queue (a list), decoded."""
    raw = redis.Redis.from_url(redis_url).lrange(queue, 0, -1)
    messages = []
    for item in raw:
        envelope = json.loads(item)
        body = json.loads(base64.b64decode(envelope["body"]))
        messages.append({"task": envelope["headers"]["task"], "args": body[0]})
    return messages


def test_submit_records_and_enqueues(client: Client, redis_url: str, tmp_path: Path) -> None:
    job = client.submit("s3://photos/a.jpg", style="tiny", metadata={"user": "u1"})
    assert job.state == JobState.QUEUED and job.priority == "interactive"
    assert job.output_uri == f"file://{tmp_path}/store/outputs/tiny/{job.id}.png"
    stored = client.get(job.id)
    assert stored.metadata == {"user": "u1"} and stored.input_uri == "s3://photos/a.jpg"
    assert queued_messages(redis_url, INTERACTIVE_QUEUE) == [{"task": "stylequeue.interactive", "args": [job.id]}]


def test_submit_rejects_before_enqueueing(client: Client, redis_url: str) -> None:
    with pytest.raises(UnknownStyle, match="tiny"):
        client.submit("s3://photos/a.jpg", style="nope")
    with pytest.raises(InputForbidden):
        client.submit("ftp://host/a.jpg", style="tiny")
    with pytest.raises(ConfigError):
        client.submit("s3://photos/a.jpg", style="tiny", priority="urgent")
    with pytest.raises(ConfigError):
        client.submit("s3://photos/a.jpg", style="tiny", callback_url="ftp://x")
    assert redis.Redis.from_url(redis_url).llen(INTERACTIVE_QUEUE) == 0


def test_idempotent_submit_returns_the_same_job_once(client: Client, redis_url: str) -> None:
    first = client.submit("s3://photos/a.jpg", style="tiny", idempotency_key="upload-1")
    second = client.submit("s3://photos/a.jpg", style="tiny", idempotency_key="upload-1")
    assert second.id == first.id
    assert len(queued_messages(redis_url, INTERACTIVE_QUEUE)) == 1


def test_submit_many_chunks_bulk_messages(client: Client, redis_url: str) -> None:
    uris = [f"s3://photos/{i}.jpg" for i in range(BULK_CHUNK_SIZE + 6)]
    jobs = client.submit_many(uris, style="tiny", output_prefix="s3://out/run1/")
    assert [j.input_uri for j in jobs] == uris
    assert all(j.priority == "bulk" and j.output_uri == f"s3://out/run1/{j.id}.png" for j in jobs)
    messages = queued_messages(redis_url, BULK_QUEUE)
    raw = redis.Redis.from_url(redis_url).lrange(BULK_QUEUE, 0, -1)
    shown = sorted(json.loads(m)["headers"]["argsrepr"] for m in raw)
    assert sorted(len(m["args"][0]) for m in messages) == [6, BULK_CHUNK_SIZE]
    assert sorted(i for m in messages for i in m["args"][0]) == sorted(j.id for j in jobs)
    assert all(j is not None and j.state == JobState.QUEUED for j in client.get_many([j.id for j in jobs]))
    # Flower shows a summary, not every id.
    assert shown == sorted(f"[[{m['args'][0][0]!r}, ... {len(m['args'][0])} job ids]]" for m in messages)


def test_get_unknown_job(client: Client) -> None:
    with pytest.raises(JobNotFound):
        client.get("j_unknown")


def test_wait_returns_when_finished_and_times_out_otherwise(client: Client) -> None:
    job = client.submit("s3://photos/a.jpg", style="tiny")
    with pytest.raises(WaitTimeout, match="no worker is consuming"):  # none runs in this test (issue 17.5)
        client.wait(job.id, timeout=0.3)
    client.presence.heartbeat("w-elsewhere-1", {"ready": True})
    with pytest.raises(WaitTimeout) as timed_out:
        client.wait(job.id, timeout=0.1)
    assert "no worker" not in str(timed_out.value)  # a live worker: nothing to add
    # TimeoutError is what the docs promise; WaitTimeout is one
    with pytest.raises(TimeoutError):
        client.wait(job.id, timeout=0.05)
    threading.Timer(0.3, lambda: client.cancel(job.id)).start()
    started = time.monotonic()
    finished = client.wait(job.id, timeout=10)
    assert finished.state == JobState.CANCELLED
    assert time.monotonic() - started < 5


def test_cancel_is_idempotent(client: Client) -> None:
    job = client.submit("s3://photos/a.jpg", style="tiny")
    assert client.cancel(job.id).state == JobState.CANCELLED
    again = client.cancel(job.id)
    assert again.state == JobState.CANCELLED and again.finished_at
    with pytest.raises(JobNotFound):
        client.cancel("j_unknown")


def test_unreachable_redis_is_reported_with_its_url(tiny_registry: Path) -> None:
    port = free_port()
    c = Client(redis_url=f"redis://127.0.0.1:{port}/0", styles=tiny_registry)
    with pytest.raises(RedisUnavailable, match=str(port)):
        c.submit("s3://photos/a.jpg", style="tiny")


def test_producer_import_stays_light() -> None:
    import subprocess

    code = ("import sys, stylequeue; from stylequeue import Client; "
            "print(','.join(m for m in ('paddle', 'torch', 'onnxruntime', 'openvino', 'celery.worker') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_a_submit_the_broker_refuses_leaves_nothing_behind(redis_url: str, tiny_registry: Path,
                                                          tmp_path: Path) -> None:
    """Issue 17.1: the job store is up, the broker is not: the submit raises the error an unreachable Redis
    raises (naming the broker), and leaves no record, no owed message and no idempotency key behind."""
    from stylequeue.errors import BrokerUnavailable

    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    client = Client(redis_url=redis_url, styles=tiny_registry, storage_url=f"file://{tmp_path}/store",
                    broker_url=dead_broker)
    try:
        with pytest.raises(RedisUnavailable, match="broker") as refused:
            client.submit("s3://photos/a.jpg", style="tiny", idempotency_key="retry-me")
        assert isinstance(refused.value, BrokerUnavailable) and "guest:guest" not in str(refused.value)
        with pytest.raises(BrokerUnavailable):
            client.submit_many(["s3://photos/b.jpg", "s3://photos/c.jpg"], style="tiny")
        leftovers = redis.Redis.from_url(redis_url).keys("sq:*")
        assert leftovers == [], leftovers  # no job, no due entry, no idempotency key
    finally:
        client.close()


def test_a_record_is_shown_without_a_link_when_no_s3_credentials_are_at_hand(client: Client,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    """`status --json` printed a traceback where boto3 had no credentials to sign `output_url` with."""
    job = client.submit("s3://photos/a.jpg", style="tiny", output_uri="s3://out/a.png")
    client.store.claim(job.id, "w1", lease_s=30)
    client.store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    record = Client(settings=client.settings).to_json(client.get(job.id))
    assert record["state"] == "succeeded" and record["output_url"] is None
