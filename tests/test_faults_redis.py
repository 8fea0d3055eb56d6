"""A Redis restart never ends a worker, and jobs flow again after it (docs/jobs.md: outages).

Each test runs its own Redis (AOF on, a fixed port and data directory), stopped cleanly and started
again on the same port as an operator's restart does; the slow ones run a real `stylequeue worker`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from stylequeue import Client, JobState
from stylequeue.broker import CALLBACK_QUEUE
from stylequeue.broker_transport import TRANSPORT
from stylequeue.errors import StyleQueueError
from tests.conftest import write_tiny_style
from tests.faults import RestartableRedis
from tests.workers import CallbackReceiver, WorkerProcess, make_image, wait_for, worker_env


@pytest.fixture
def redis_restartable(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def setup(redis_restartable: RestartableRedis, tiny_registry: Path, tmp_path: Path) -> dict:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(make_image(96, 64))
    storage = f"file://{tmp_path}/store"
    env = worker_env(redis_restartable.url, tiny_registry, storage, input_roots=f"{inputs},{tmp_path}/store")
    client = Client(redis_url=redis_restartable.url, styles=tiny_registry, storage_url=storage,
                    input_roots=str(inputs))
    return {"env": env, "client": client, "input": f"file://{inputs}/a.png", "tmp": tmp_path,
            "redis": redis_restartable, "registry": tiny_registry, "storage": storage, "inputs": inputs}


def lose_connection_with_a_message_unacked(url: str, transport: str | None, stop: Callable[[], None]) -> Connection:
    """Celery's consumer state when Redis stops under it: a task channel holding a delivered, unacknowledged
    message with its next BRPOP in flight, beside a remote-control channel (an auto-delete fanout queue)."""
    connection = Connection(url, transport=transport, transport_options={"polling_interval": 0.1,
                                                                          "visibility_timeout": 1})
    tasks = connection.default_channel
    tasks.basic_qos(0, 8, False)
    queue = Queue("tasks")
    connection.Producer().publish({"job": 1}, routing_key="tasks", declare=[queue])
    received: list = []
    connection.Consumer([queue], channel=tasks, callbacks=[lambda body, message: received.append(body)]).consume()
    control = Queue("node.pidbox", Exchange("pidbox", type="fanout"), auto_delete=True)
    connection.Consumer([control], channel=connection.channel(), callbacks=[lambda body, message: None]).consume()
    assert drain_until(connection, lambda: bool(received), timeout=5)
    connection.transport.cycle.on_poll_start()  # what the event loop does every tick: BRPOP sent again
    stop()
    return connection


def close_as_celery_does(connection: Connection) -> None:
    """Consumer.on_connection_error_after_connected: collect(), then close() (connection errors ignored)."""
    connection.collect(socket_timeout=5)
    try:
        connection.close()
    except connection.connection_errors + connection.channel_errors:
        pass


def test_closing_a_lost_broker_connection_raises_nothing_and_loses_no_message(
        redis_restartable: RestartableRedis) -> None:
    connection = lose_connection_with_a_message_unacked(redis_restartable.url, TRANSPORT, redis_restartable.stop)
    close_as_celery_does(connection)  # kombu's own transport raises AttributeError here, ending the worker
    redis_restartable.start()
    again: list = []
    with Connection(redis_restartable.url, transport=TRANSPORT,
                    transport_options={"polling_interval": 0.1, "visibility_timeout": 1}) as fresh:
        fresh.Consumer([Queue("tasks")], callbacks=[lambda body, message: again.append(body)]).consume()
        assert drain_until(fresh, lambda: bool(again), timeout=15)
    assert again == [{"job": 1}]  # the message that was never acknowledged came back once


def test_kombus_own_transport_still_crashes_there(redis_restartable: RestartableRedis) -> None:
    """The upstream bug our transport works around; when this fails, kombu fixed it and
    stylequeue/broker_transport.py can go."""
    connection = lose_connection_with_a_message_unacked(redis_restartable.url, None, redis_restartable.stop)
    with pytest.raises(AttributeError, match="hostname"):
        close_as_celery_does(connection)


def test_a_channel_shares_one_client_per_pool_across_a_restart(redis_restartable: RestartableRedis) -> None:
    """Our transport hands out one redis-py client per connection pool (kombu builds one per command); it
    still publishes after Redis restarts, and a pool kombu replaces gets a client of its own."""
    options = {"polling_interval": 0.1, "visibility_timeout": 1}
    queue = Queue("shared")
    with Connection(redis_restartable.url, transport=TRANSPORT, transport_options=options) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.connection_pool is channel.pool
        producer = connection.Producer()
        producer.publish({"n": 1}, routing_key="shared", declare=[queue], retry=True)
        redis_restartable.stop()
        redis_restartable.start()
        producer.publish({"n": 2}, routing_key="shared", declare=[queue], retry=True)
        channel._disconnect_pools()  # what kombu does after a fork
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool
        producer.publish({"n": 3}, routing_key="shared", declare=[queue], retry=True)
    got: list = []
    with Connection(redis_restartable.url, transport=TRANSPORT, transport_options=options) as fresh:
        fresh.Consumer([queue], callbacks=[lambda body, message: (got.append(body), message.ack())]).consume()
        assert drain_until(fresh, lambda: len(got) == 3, timeout=15)
    assert sorted(body["n"] for body in got) == [1, 2, 3]


def drain_until(connection: Connection, predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        try:
            connection.drain_events(timeout=0.2)
        except TimeoutError:
            pass
    return predicate()


def all_succeeded(client: Client, job_ids: list[str], timeout: float) -> bool:
    return wait_for(lambda: all(j is not None and j.state == JobState.SUCCEEDED for j in client.get_many(job_ids)),
                    timeout=timeout, interval=0.25)


class Flood:
    """Threads submitting interactive jobs as fast as they can, so messages are in flight at any instant;
    `ids` holds the jobs whose submit returned."""

    def __init__(self, setup: dict, threads: int = 3) -> None:
        self.setup = setup
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._submit, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _submit(self) -> None:
        client = Client(redis_url=self.setup["redis"].url, styles=self.setup["registry"],
                        storage_url=self.setup["storage"], input_roots=str(self.setup["inputs"]))
        while not self._stop.is_set():
            try:
                self.ids.append(client.submit(self.setup["input"], style="tiny").id)
            except StyleQueueError:  # Redis is down: nothing was created, or the job was failed
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.mark.slow
def test_worker_survives_redis_restarts_under_load_and_consumes_again(setup: dict) -> None:
    client, redis_server = setup["client"], setup["redis"]
    worker = WorkerProcess(setup["env"], setup["tmp"] / "worker.log").wait_ready()
    submitted: list[str] = []
    held: list[str] = []
    try:
        for _ in range(3):  # the crash needed messages in flight and a lucky order of socket events
            flood = Flood(setup)
            time.sleep(1.5)
            running = [j.id for j in client.get_many(list(flood.ids)) if j is not None and j.state == JobState.RUNNING]
            redis_server.stop()
            flood.stop()
            submitted += flood.ids
            held += running
            time.sleep(2)
            assert worker.process.poll() is None, worker.output()[-4000:]
            redis_server.start()
            # Jobs running at the stop finish: their leases renewed, or reaped and run again.
            assert all_succeeded(client, running, timeout=120), worker.output()[-4000:]
        assert held, "no job was running at any of the stops"

        after = [client.submit(setup["input"], style="tiny").id for _ in range(3)]
        after += [j.id for j in client.submit_many([setup["input"]] * 20, style="tiny")]
        assert all_succeeded(client, after, timeout=60), worker.output()[-4000:]
        # And every job submitted: one whose message kombu had popped as Redis stopped is lost to the broker;
        # the job store's sweep (a minute apart) sends it again.
        assert all_succeeded(client, submitted, timeout=180), worker.output()[-4000:]
        assert worker.process.poll() is None  # the same process served them all
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]


@pytest.mark.slow
def test_a_worker_that_stops_taking_messages_is_restarted_and_they_flow_again(setup: dict) -> None:
    """The silent stall (celery #10205: a worker up but never reading again). No fault given to this stack
    produced one (CLIENT KILL of every connection, of the BRPOP or of the pub/sub one; CLIENT PAUSE; kill -9
    and restart twice; five restarts in a row: each recovered within 3 s), so Celery's own remote control
    makes it: the consumer is told to stop taking the callbacks queue. (Backpressure reconciles the job
    queues on every heartbeat; nothing else in the worker brings the callbacks queue back.)"""
    client = Client(redis_url=setup["redis"].url, styles=setup["registry"], storage_url=setup["storage"],
                    input_roots=str(setup["inputs"]), allow_private_networks=True)
    receiver = CallbackReceiver()
    worker = WorkerProcess(setup["env"], setup["tmp"] / "worker.log").wait_ready()
    try:
        assert client.app.control.cancel_consumer(CALLBACK_QUEUE, reply=True, limit=1, timeout=10)
        jobs = [client.submit(setup["input"], style="tiny", callback_url=receiver.url).id for _ in range(3)]
        assert all_succeeded(client, jobs, timeout=60), worker.output()[-4000:]
        assert wait_for(lambda: len(receiver.received) >= 3, timeout=120), worker.output()[-4000:]
        assert sorted(body["id"] for body in receiver.bodies()) == sorted(jobs)  # each delivered, once
        assert "restarting its consumer" in worker.output()  # the watchdog saw the messages wait, and acted
        assert worker.process.poll() is None
    finally:
        receiver.close()
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]


@pytest.fixture(scope="module")
def slow_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A style heavy enough (ngf 16, 4 blocks, 128 px) that a run of jobs is still going when Redis stops."""
    return write_tiny_style(tmp_path_factory.mktemp("slow"), name="slow", ngf=16, n_blocks=4, max_side=128)


@pytest.mark.slow
def test_jobs_running_when_redis_stops_finish_after_it_returns(
        redis_restartable: RestartableRedis, slow_registry: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(make_image(128, 96))
    store = tmp_path / "store"
    env = worker_env(redis_restartable.url, slow_registry, f"file://{store}", input_roots=f"{inputs},{store}",
                     max_batch="2")
    client = Client(redis_url=redis_restartable.url, styles=slow_registry, storage_url=f"file://{store}",
                    input_roots=str(inputs))
    worker = WorkerProcess(env, tmp_path / "worker.log").wait_ready()
    try:
        jobs = [j.id for j in client.submit_many([f"file://{inputs}/a.png"] * 40, style="slow")]
        assert wait_for(lambda: sum(j.state == JobState.SUCCEEDED for j in client.get_many(jobs)) >= 3, timeout=120)
        assert JobState.RUNNING in [j.state for j in client.get_many(jobs)], "the stop must land mid-run"
        redis_restartable.stop()
        time.sleep(10)  # the reviewer's outage: the job threads meet Redis errors while finishing jobs
        assert worker.process.poll() is None, worker.output()[-4000:]
        redis_restartable.start()
        assert all_succeeded(client, jobs, timeout=180), worker.output()[-4000:]
        assert worker.process.poll() is None
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    written = sorted(p.name for p in (store / "outputs" / "slow").iterdir())
    assert written == sorted(f"{job_id}.png" for job_id in jobs)  # one output per job, no strays
