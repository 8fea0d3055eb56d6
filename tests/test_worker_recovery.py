"""Workers that die or are told to stop lose nothing: SIGKILL mid-run, SIGTERM with work in hand."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from stylequeue import Client, JobState
from stylequeue.embedded import EmbeddedRedis
from tests.conftest import empty_database, write_tiny_style
from tests.workers import WorkerProcess, make_image, wait_for, worker_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slow_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A style heavy enough (ngf 16, 4 blocks, 128 px) that a run of jobs takes a few seconds."""
    return write_tiny_style(tmp_path_factory.mktemp("slow"), name="slow", ngf=16, n_blocks=4, max_side=128)


@pytest.fixture
def setup(redis_server: EmbeddedRedis, slow_registry: Path, tmp_path: Path, request: pytest.FixtureRequest) -> dict:
    db = 2 if "kill" in request.node.name else 3
    url = empty_database(redis_server, db)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(make_image(128, 96))
    storage = f"file://{tmp_path}/store"
    env = worker_env(url, slow_registry, storage, input_roots=f"{inputs},{tmp_path}/store", max_batch="2")
    client = Client(redis_url=url, styles=slow_registry, storage_url=storage, input_roots=str(inputs))
    return {"env": env, "client": client, "input": f"file://{inputs}/a.png", "out": tmp_path / "store", "tmp": tmp_path}


def outputs(root: Path) -> list[str]:
    folder = root / "outputs" / "slow"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_sigkill_mid_run_loses_nothing(setup: dict) -> None:
    client = setup["client"]
    jobs = client.submit_many([setup["input"]] * 60, style="slow")
    first = WorkerProcess(setup["env"], setup["tmp"] / "w1.log").wait_ready()
    assert wait_for(lambda: sum(j.state == JobState.SUCCEEDED for j in client.get_many([j.id for j in jobs])) >= 5,
                    timeout=120), first.output()[-2000:]
    first.kill()  # SIGKILL: no shutdown code runs
    states = [j.state for j in client.get_many([j.id for j in jobs])]
    assert JobState.RUNNING in states, "the kill must land while jobs are running"
    second = WorkerProcess(setup["env"], setup["tmp"] / "w2.log").wait_ready()
    try:
        finished = [client.wait(j.id, timeout=180) for j in jobs]
    finally:
        assert second.stop() == 0
    assert all(j.state == JobState.SUCCEEDED for j in finished), [j.error for j in finished if j.error]
    assert outputs(setup["out"]) == sorted(f"{j.id}.png" for j in jobs)  # one output per job, no strays
    # The jobs running at the kill were taken over: each charged its attempt (attempts 2) if the dead worker had
    # recorded that it began it, or got it back (given_back) if the kill came before the lease keeper's first
    # renewal recorded that; a job fenced before the kill was only promoted (attempts 1, nothing given back).
    assert all(j.attempts <= 2 for j in finished)
    assert any(j.attempts == 2 or (j.given_back or 0) >= 1 for j in finished)
    assert not [p for p in (setup["out"] / "outputs" / "slow").iterdir() if p.name.startswith(".")]


def test_sigterm_finishes_work_in_hand_and_gives_back_the_rest(setup: dict) -> None:
    client = setup["client"]
    jobs = client.submit_many([setup["input"]] * 80, style="slow")
    worker = WorkerProcess(setup["env"], setup["tmp"] / "w1.log").wait_ready()
    assert wait_for(lambda: sum(j.state == JobState.SUCCEEDED for j in client.get_many([j.id for j in jobs])) >= 3,
                    timeout=120)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(120) == 0, worker.output()[-3000:]
    worker.log.close()
    after = client.get_many([j.id for j in jobs])
    assert not [j for j in after if j.state == JobState.RUNNING], "a stopped worker left jobs running"
    queued = [j for j in after if j.state == JobState.QUEUED]
    assert queued and all(j.attempts == 0 for j in queued)  # given back, not counted as attempts
    second = WorkerProcess(setup["env"], setup["tmp"] / "w2.log").wait_ready()
    try:
        assert all(client.wait(j.id, timeout=180).state == JobState.SUCCEEDED for j in jobs)
    finally:
        second.stop()
    assert len(outputs(setup["out"])) == 80
    assert os.path.exists(setup["out"])
