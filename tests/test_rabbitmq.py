"""stylequeue over RabbitMQ (STYLEQUEUE_BROKER_URL=amqp://...) with the job store on Redis, against a private
RabbitMQ node (tests/brokers.py): the end-to-end and kill tests the Redis broker passes, and consumer_timeout.

The node's consumer_timeout is 5 s, checked every second: a worker that held a message unacknowledged while a
job ran would lose its channel here within seconds.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import amqp
import pytest

from stylequeue import Client, JobState, verify_webhook
from stylequeue.broker import BULK_CHUNK_SIZE, BULK_QUEUE, INTERACTIVE_QUEUE
from stylequeue.embedded import EmbeddedRedis
from stylequeue.jobs import parse_iso
from stylequeue.pipeline.storage.uris import TEMP_SUFFIX
from tests.brokers import CONSUMER_TIMEOUT_MS, RabbitNode, rabbitmq  # noqa: F401 - rabbitmq is a fixture
from tests.conftest import write_tiny_style
from tests.workers import CallbackReceiver, WorkerProcess, make_image, serve_http, slow_image, wait_for, worker_env

pytestmark = pytest.mark.slow

SECRET = "whsec_" + "cmFiYml0LXRlc3Qtc2VjcmV0LW9mLTMyLWJ5dGVzISE="


@pytest.fixture(scope="module")
def store_redis() -> Iterator[EmbeddedRedis]:
    """The job store's Redis, private to this module."""
    with EmbeddedRedis(persist=False) as server:
        yield server


def setup(node: RabbitNode, vhost: str, redis_url: str, registry: Path, root: Path, style: str) -> dict:
    """Settings for a worker and a client over `vhost`, with file:// storage under `root`."""
    inputs = root / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(make_image(64, 48))
    storage = f"file://{root}/store"
    broker_url = node.url(vhost)
    # A visibility timeout far beyond any wait here: on RabbitMQ it plays no part, and nothing may wait for it.
    env = worker_env(redis_url, registry, storage, broker_url=broker_url, input_roots=f"{inputs},{root}/store",
                     webhook_secret=SECRET, visibility_timeout_s="600", max_batch="4")
    client = Client(redis_url=redis_url, broker_url=broker_url, styles=registry, storage_url=storage,
                    input_roots=str(inputs), allow_private_networks=True)
    return {"env": env, "client": client, "input": f"file://{inputs}/a.png", "out": root / "store" / "outputs" / style,
            "root": root, "node": node, "vhost": vhost}


@pytest.fixture(scope="module")
def stack(rabbitmq: RabbitNode, store_redis: EmbeddedRedis, tiny_registry: Path,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One worker over the `e2e` vhost for the module."""
    found = setup(rabbitmq, "e2e", store_redis.url.rsplit("/", 1)[0] + "/1", tiny_registry,
                  tmp_path_factory.mktemp("amqp"), "tiny")
    worker = WorkerProcess(found["env"], found["root"] / "worker.log").wait_ready()
    yield found | {"worker": worker}
    found["client"].close()
    assert worker.stop() == 0, worker.output()[-3000:]


def test_interactive_job_overtakes_a_bulk_backlog(stack: dict) -> None:
    client = stack["client"]
    bulk = client.submit_many([stack["input"]] * 500, style="tiny")
    urgent = client.submit(stack["input"], style="tiny")
    done = client.wait(urgent.id, timeout=120)
    assert done.state == JobState.SUCCEEDED
    finished = [client.wait(j.id, timeout=300) for j in bulk]
    assert all(j.state == JobState.SUCCEEDED and j.attempts == 1 for j in finished)
    after = sum(1 for j in finished if j.finished_at > done.finished_at)
    assert after >= 400, f"only {after} of 500 bulk jobs finished after the interactive one"


def test_callbacks_are_delivered_signed(stack: dict) -> None:
    client = stack["client"]
    receiver = CallbackReceiver()
    try:
        jobs = [client.submit(stack["input"], style="tiny", callback_url=receiver.url, metadata={"n": n})
                for n in range(3)]
        assert all(client.wait(job.id, timeout=60).state == JobState.SUCCEEDED for job in jobs)
        assert wait_for(lambda: len(receiver.received) == 3, timeout=60)
        for delivery in receiver.received:
            verify_webhook(SECRET, delivery["headers"], delivery["body"])
        assert sorted(body["metadata"]["n"] for body in receiver.bodies()) == [0, 1, 2]
        assert all(client.get(job.id).callback["state"] == "delivered" for job in jobs)
    finally:
        receiver.close()


def test_a_job_longer_than_consumer_timeout_keeps_the_channel(stack: dict) -> None:
    """RabbitMQ closes a channel whose delivery stays unacknowledged past consumer_timeout. The worker
    acknowledges a message once its job is claimed, so a job that runs (here: fetches) for twice the
    timeout ends well, and the same consumer goes on taking jobs."""
    client, node = stack["client"], stack["node"]
    hold_s = 2 * CONSUMER_TIMEOUT_MS / 1000
    log_before = len(node.log_text())
    with serve_http(slow_image(make_image(32, 32), hold_s)) as url:
        began = time.monotonic()
        slow = client.wait(client.submit(f"{url}/slow.png", style="tiny").id, timeout=120)
    assert slow.state == JobState.SUCCEEDED and slow.attempts == 1
    assert time.monotonic() - began >= hold_s  # it really ran past the timeout
    after = client.wait(client.submit(stack["input"], style="tiny").id, timeout=60)
    assert after.state == JobState.SUCCEEDED
    new_log = node.log_text()[log_before:]
    assert "timed out" not in new_log and "precondition_failed" not in new_log.lower(), new_log[-2000:]
    assert "PRECONDITION_FAILED" not in stack["worker"].output()


def test_the_node_does_enforce_consumer_timeout(stack: dict) -> None:
    """The control for the test above: a consumer that sits on a delivery loses its channel on this node."""
    node = stack["node"]
    connection = amqp.Connection(f"127.0.0.1:{node.port}", userid=node.user, password=node.password,
                                 virtual_host="timeout")
    connection.connect()
    try:
        channel = connection.channel()
        channel.queue_declare("hold", durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        channel.basic_publish(amqp.Message("x"), routing_key="hold")
        channel.basic_qos(0, 1, False)
        channel.basic_consume("hold", callback=lambda message: None)  # never acknowledged
        deadline = time.monotonic() + 4 * CONSUMER_TIMEOUT_MS / 1000
        with pytest.raises(amqp.exceptions.PreconditionFailed, match="timed out"):
            while time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
    finally:
        connection.collect()


@pytest.fixture
def kill_setup(rabbitmq: RabbitNode, store_redis: EmbeddedRedis,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("amqp-kill")
    registry = write_tiny_style(root / "styles", name="slow", ngf=16, n_blocks=4, max_side=128)
    return setup(rabbitmq, "kill", store_redis.url.rsplit("/", 1)[0] + "/2", registry, root, "slow")


def test_sigkill_mid_run_loses_nothing_and_its_messages_come_back_at_once(kill_setup: dict) -> None:
    client, node = kill_setup["client"], kill_setup["node"]
    bulk = client.submit_many([kill_setup["input"]] * 140, style="slow")
    # Bulk jobs travel BULK_CHUNK_SIZE to a message over amqp too.
    assert node.ready_messages("kill", BULK_QUEUE) == math.ceil(140 / BULK_CHUNK_SIZE)
    first = WorkerProcess(kill_setup["env"], kill_setup["root"] / "w1.log").wait_ready()
    ids = [job.id for job in bulk]
    assert wait_for(lambda: sum(j.state == JobState.SUCCEEDED for j in client.get_many(ids)) >= 3, timeout=120), \
        first.output()[-2000:]
    # Frozen, the worker still counts as a consumer: RabbitMQ pushes it messages it will never acknowledge.
    first.process.send_signal(signal.SIGSTOP)
    urgent = [client.submit(kill_setup["input"], style="slow") for _ in range(20)]
    assert wait_for(lambda: node.ready_messages("kill", INTERACTIVE_QUEUE) < 20, timeout=10)
    first.kill()  # SIGKILL: its connection drops with those deliveries unacknowledged
    killed_at = time.time()
    assert wait_for(lambda: node.ready_messages("kill", INTERACTIVE_QUEUE) == 20, timeout=5), \
        "RabbitMQ did not hand the dead worker's unacknowledged messages back at once"
    held = [j for j in client.get_many(ids) if j.state == JobState.RUNNING]
    assert held, "the kill must land while jobs are running"
    second = WorkerProcess(kill_setup["env"], kill_setup["root"] / "w2.log").wait_ready()
    try:
        finished = [client.wait(j.id, timeout=240) for j in [*urgent, *bulk]]
    finally:
        assert second.stop() == 0, second.output()[-3000:]
    assert all(j.state == JobState.SUCCEEDED for j in finished), [j.error for j in finished if j.error]
    # One output per job. A SIGKILL between staging an output and fencing it leaves that attempt's staged file
    # (`.{name}.a1-{job id}.{random}.sqtmp`, which listings skip) beside the output the next attempt wrote.
    outputs = [p.name for p in kill_setup["out"].iterdir() if not p.name.endswith(TEMP_SUFFIX)]
    assert sorted(outputs) == sorted(f"{j.id}.png" for j in finished)
    # Taken over from the dead worker: claimed again after the kill (an attempt it never began is not charged).
    taken_over = [j for j in finished if j.id in {h.id for h in held}]
    assert all(parse_iso(j.started_at) > killed_at and j.attempts <= 2 for j in taken_over)
