"""The callback outbox's deliverer (worker/callbacks.py): one attempt by token, what it records, and the
dispatcher's per-host limit. Real receivers and real workers are in test_worker.py and test_faults.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import fakeredis
import pytest

from stylequeue.jobs import CALLBACKS_DUE, Job, JobState, RedisJobStore, new_job_id
from stylequeue.worker.callbacks import CallbackDispatcher, Delivery, deliver_one, host_of
from tests.workers import serve_http, wait_for


@pytest.fixture
def store() -> Iterator[RedisJobStore]:
    client = fakeredis.FakeRedis()
    yield RedisJobStore(client, key_prefix="cb:", job_ttl_s=100)
    client.close()


def finished_with_callback(store: RedisJobStore, url: str) -> tuple[Job, int]:
    """A job that finished owing a callback to `url` (created without the Client's submit-time checks)."""
    job = Job(id=new_job_id(), style="s", input_uri="s3://a/b.jpg", output_uri="s3://o/c.jpg", callback_url=url)
    store.create(job)
    store.claim(job.id, "w1", lease_s=30)
    moved = store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w1")
    return job, moved.callback_token


def render(job: Job) -> dict:
    return job.to_dict()


def test_a_refused_callback_url_records_why_in_the_job(store: RedisJobStore) -> None:
    """Issue 17.5: the reason a callback failed is in the record, not only in the worker's log."""
    job, token = finished_with_callback(store, "http://127.0.0.1:9/hook")
    record = deliver_one(store, Delivery(job.id, token), secret_for=lambda j: None, allow_private=False,
                         render=render)
    assert record is not None and record["state"] == "failed" and record["last_status"] is None
    stored = store.get(job.id).callback
    assert stored["state"] == "failed" and "loopback" in stored["last_error"]
    assert job.id not in store.scheduled(CALLBACKS_DUE)  # given up: nothing owed any more


def test_a_stale_token_delivers_nothing(store: RedisJobStore) -> None:
    posts: list[bytes] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serve_http(Receiver) as base:
        job, token = finished_with_callback(store, f"{base}/hook")
        assert deliver_one(store, Delivery(job.id, token - 1), secret_for=lambda j: None, allow_private=True,
                           render=render) is None
        assert posts == []
        record = deliver_one(store, Delivery(job.id, token), secret_for=lambda j: None, allow_private=True,
                             render=render)
        assert record is not None and record["state"] == "delivered" and len(posts) == 1
        # a duplicate message for the same delivery finds it done
        assert deliver_one(store, Delivery(job.id, token), secret_for=lambda j: None, allow_private=True,
                           render=render) is None
        assert len(posts) == 1


def test_one_slow_host_gets_its_share_of_the_pool_not_all_of_it() -> None:
    release = threading.Event()
    started: dict[str, int] = {"slow": 0, "fast": 0}
    lock = threading.Lock()

    def deliver(delivery: Delivery) -> None:
        host = delivery.job_id.split("-")[0]
        with lock:
            started[host] += 1
        if host == "slow":
            release.wait(10)

    dispatcher = CallbackDispatcher(deliver, threads=6, per_host=2)
    try:
        for i in range(20):
            assert dispatcher.submit(Delivery(f"slow-{i}", 1), "slow.example")
        time.sleep(0.2)
        assert started["slow"] == 2  # two threads wait on the slow host; four stay free
        for i in range(5):
            dispatcher.submit(Delivery(f"fast-{i}", 1), "fast.example")
        assert wait_for(lambda: started["fast"] == 5, 5)
        assert started["slow"] == 2
    finally:
        release.set()
        dispatcher.close()


def test_host_of() -> None:
    assert host_of("https://API.example.com:8443/x?y=1") == "api.example.com"
    assert host_of(None) == "" and host_of("not a url") == ""
