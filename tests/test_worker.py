"""A real `stylequeue worker` process over a real Redis, a moto S3 server and an HTTP callback receiver."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from PIL import Image

from stylequeue import Client, JobState, verify_webhook
from stylequeue.embedded import EmbeddedRedis, free_port
from stylequeue.pipeline.images import working_size
from tests.conftest import empty_database
from tests.workers import CallbackReceiver, WorkerProcess, make_image, serve_http, wait_for, worker_env

pytestmark = pytest.mark.slow

SECRET = "whsec_" + "c3R5bGVxdWV1ZS10ZXN0LXNlY3JldC0zMmJ5dGVzISE="


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, s3_endpoint: str, tiny_registry: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One worker for the module, on its own Redis database, writing to S3."""
    url = empty_database(redis_server, 1)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="worker-in")
    s3.create_bucket(Bucket="worker-out")
    metrics_port = free_port()
    env = worker_env(url, tiny_registry, "s3://worker-out", s3_endpoint_url=s3_endpoint,
                     s3_addressing_style="path", webhook_secret=SECRET)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    # Bulk jobs go through two codec processes here (a CPU worker's default is none), so the pool
    # path runs over the real components on any machine.
    worker = WorkerProcess(env, log, "--metrics-port", str(metrics_port), "--max-batch", "8",
                           "--codec-procs", "2").wait_ready()
    client = Client(redis_url=url, styles=tiny_registry, storage_url="s3://worker-out",
                    s3_endpoint_url=s3_endpoint, s3_addressing_style="path", allow_private_networks=True)
    yield {"client": client, "s3": s3, "worker": worker, "metrics": metrics_port, "url": url}
    client.close()
    assert worker.stop() == 0, worker.output()[-3000:]


def put(s3, key: str, data: bytes) -> str:
    s3.put_object(Bucket="worker-in", Key=key, Body=data)
    return f"s3://worker-in/{key}"


def output_size(s3, uri: str) -> tuple[int, int]:
    bucket, key = uri[len("s3://"):].split("/", 1)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    import io

    return Image.open(io.BytesIO(body)).size


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def test_fifty_jobs_of_mixed_sizes_succeed_with_correct_sizes(stack: dict) -> None:
    client, s3 = stack["client"], stack["s3"]
    sizes = [(64, 48), (48, 64), (30, 30), (100, 20), (7, 9), (64, 64), (200, 150), (33, 65), (12, 80), (1, 1)]
    uris = [put(s3, f"mixed/{i}.png", make_image(*sizes[i % 10], seed=i)) for i in range(50)]
    bulk = client.submit_many(uris[:25], style="tiny")
    single = [client.submit(u, style="tiny") for u in uris[25:]]
    for i, job in enumerate(bulk + single):
        done = client.wait(job.id, timeout=120)
        assert done.state == JobState.SUCCEEDED, done.error
        expected = working_size(*sizes[i % 10], 64)
        assert (done.width, done.height) == expected
        assert output_size(s3, done.output_uri) == expected
        assert done.output_uri == f"s3://worker-out/outputs/tiny/{job.id}.png"
        assert done.attempts == 1 and done.model.startswith("tiny@")
        assert set(done.timings_ms) == {"queued", "fetch", "infer", "store"}
        record = client.to_json(done)
        assert record["output_url"].startswith(stack["s3"].meta.endpoint_url)
        assert urllib.request.urlopen(record["output_url"], timeout=5).status == 200


def test_jobs_arriving_together_are_batched(stack: dict) -> None:
    client, s3 = stack["client"], stack["s3"]
    before_count = metric(stack["metrics"], "stylequeue_batch_size_count")
    before_sum = metric(stack["metrics"], "stylequeue_batch_size_sum")
    uri = put(s3, "batch/a.png", make_image(64, 64))
    jobs = client.submit_many([uri] * 32, style="tiny")
    for job in jobs:
        assert client.wait(job.id, timeout=60).state == JobState.SUCCEEDED
    batches = metric(stack["metrics"], "stylequeue_batch_size_count") - before_count
    images = metric(stack["metrics"], "stylequeue_batch_size_sum") - before_sum
    assert images == 32
    # The worker times one image against a batch at load and batches only where that pays; on a loaded CPU
    # it may find that it does not. Either way the batcher must do what the published choice says.
    chosen = next(iter(stack["client"].presence.runtimes()["tiny"].values()))["batch"]
    if chosen > 1:
        assert batches < 32, "batching pays here, yet no batch of more than one image formed"
    else:
        assert batches == 32, "batching does not pay here, yet images were batched"


def test_a_poison_input_fails_alone(stack: dict) -> None:
    client, s3 = stack["client"], stack["s3"]
    good = put(s3, "poison/good.png", make_image(40, 40))
    text = put(s3, "poison/notes.png", b"this is not an image")
    empty = put(s3, "poison/empty.jpg", b"")
    truncated = put(s3, "poison/cut.jpg", make_image(64, 64, "JPEG")[:300])
    jobs = client.submit_many([good, text, good, empty, good, truncated, good], style="tiny")
    states = [client.wait(j.id, timeout=60) for j in jobs]
    assert [s.state for s in states] == ["succeeded", "failed", "succeeded", "failed", "succeeded", "failed",
                                          "succeeded"]
    for failed in (states[1], states[3], states[5]):
        assert failed.error["code"] == "invalid_input" and failed.attempts == 1


def test_missing_input_fails_with_input_not_found(stack: dict) -> None:
    client = stack["client"]
    job = client.wait(client.submit("s3://worker-in/nope.png", style="tiny").id, timeout=60)
    assert job.state == JobState.FAILED and job.error["code"] == "input_not_found"


def test_interactive_job_overtakes_a_bulk_backlog(stack: dict) -> None:
    client, s3 = stack["client"], stack["s3"]
    uri = put(s3, "backlog/a.png", make_image(64, 64))
    bulk = client.submit_many([uri] * 500, style="tiny")
    urgent = client.submit(uri, style="tiny")
    done = client.wait(urgent.id, timeout=120)
    assert done.state == JobState.SUCCEEDED
    finished = [client.wait(j.id, timeout=300) for j in bulk]
    after = sum(1 for j in finished if j.finished_at > done.finished_at)
    assert after >= 400, f"only {after} of 500 bulk jobs finished after the interactive one"


def test_cancelling_a_queued_job_is_honoured(stack: dict) -> None:
    client, s3 = stack["client"], stack["s3"]
    uri = put(s3, "cancel/a.png", make_image(64, 64))
    # Enough ahead that backpressure (plus up to 8 prefetched messages of 64) stops short of the victim.
    ahead = client.submit_many([uri] * 1200, style="tiny")
    victim = client.submit_many([uri], style="tiny")[0]
    assert client.cancel(victim.id).state == JobState.CANCELLED
    for job in ahead:
        client.wait(job.id, timeout=120)
    final = client.get(victim.id)
    assert final.state == JobState.CANCELLED and final.attempts == 0
    key = victim.output_uri.split("/", 3)[3]
    assert "Contents" not in s3.list_objects_v2(Bucket="worker-out", Prefix=key)


def test_callback_retried_after_500_and_signed(stack: dict) -> None:
    client, s3 = stack["client"], stack["s3"]
    receiver = CallbackReceiver(statuses=[500, 200])
    try:
        uri = put(s3, "hook/a.png", make_image(32, 32))
        job = client.submit(uri, style="tiny", callback_url=receiver.url, metadata={"order": 7})
        assert client.wait(job.id, timeout=60).state == JobState.SUCCEEDED
        assert wait_for(lambda: client.get(job.id).callback["state"] == "delivered", timeout=60)
        assert [r["status"] for r in receiver.received] == [500, 200]
        first, second = receiver.received
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
        assert second["at"] - first["at"] >= 3  # the ~5 s backoff, never an immediate hammering
        for delivery in receiver.received:
            verify_webhook(SECRET, delivery["headers"], delivery["body"])
        body = receiver.bodies()[-1]
        assert body["id"] == job.id and body["state"] == "succeeded" and body["metadata"] == {"order": 7}
        assert body["output_url"].startswith("http")
        callback = client.get(job.id).callback
        assert callback["attempts"] == 2 and callback["last_status"] == 200
        assert client.get(job.id).state == JobState.SUCCEEDED  # delivery never changes the job's state
    finally:
        receiver.close()


def test_transient_input_errors_are_retried(stack: dict) -> None:
    receiver_statuses = [503, 503]

    from http.server import BaseHTTPRequestHandler

    image = make_image(20, 20)

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            status = receiver_statuses.pop(0) if receiver_statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", str(len(image) if status == 200 else 0))
            self.end_headers()
            if status == 200:
                self.wfile.write(image)

        def log_message(self, *args: object) -> None:
            pass

    with serve_http(Flaky) as url:
        client = stack["client"]
        job = client.submit(f"{url}/a.png", style="tiny")
        done = client.wait(job.id, timeout=60)
        assert done.state == JobState.SUCCEEDED and done.attempts == 3


def test_the_worker_log_names_its_host_and_holds_no_paddle_noise(stack: dict) -> None:
    log = stack["worker"].output()
    assert f"@{socket.gethostname()} ready" in log and "%h" not in log  # the Celery node name, expanded
    assert not re.search(r"No ccache found|!!!!!|^[IWE]\d{4} \d\d:\d\d|OMP_NUM_THREADS", log, re.MULTILINE), log
