"""A worker on a machine without Paddle serves with the torch runtime, end to end through Redis
(worker/service.py's runtime check, models/runtimes.py, models/torch_runtime.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from stylequeue import Client, JobState
from stylequeue.embedded import EmbeddedRedis
from tests.conftest import empty_database
from tests.workers import WorkerProcess, make_image, worker_env

pytestmark = pytest.mark.slow
pytest.importorskip("torch", reason="PyTorch is not installed: `make torch` or pip install 'stylequeue[torch]'")


def test_a_worker_without_paddle_serves_with_torch(redis_server: EmbeddedRedis, tiny_registry: Path,
                                                   tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # `import paddle` fails in the worker and in every process it spawns, as on a PyTorch-only GPU machine.
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['paddle'] = None\n")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jpg").write_bytes(make_image(90, 60, "JPEG"))
    url = empty_database(redis_server, 9)
    storage = f"file://{tmp_path / 'store'}"
    env = worker_env(url, tiny_registry, storage, runtime="auto", input_roots=str(inputs),
                     cache_dir=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    worker = WorkerProcess(env, tmp_path / "worker.log", "--codec-procs", "1").wait_ready()
    client = Client(redis_url=url, styles=tiny_registry, storage_url=storage, input_roots=str(inputs))
    try:
        job = client.wait(client.submit(f"file://{inputs / 'a.jpg'}", style="tiny").id, timeout=120)
        bulk = client.submit_many([f"file://{inputs / 'a.jpg'}"] * 3, style="tiny")  # the codec process path
        finished = [client.wait(j.id, timeout=120) for j in bulk]
        assert job.state == JobState.SUCCEEDED, job.error
        assert all(j.state == JobState.SUCCEEDED for j in finished), [j.error for j in finished]
        with open(job.output_uri.removeprefix("file://"), "rb") as fh:
            assert Image.open(io.BytesIO(fh.read())).size == (job.width, job.height) == (64, 44)
        chosen = next(iter(next(s for s in client.styles() if s["name"] == "tiny")["workers"].values()))
        assert chosen["runtime"] == "torch" and chosen["candidates"][0]["runtime"] == "torch"  # torch fp32 is the ref
    finally:
        client.close()
        log = worker.output()
        code = worker.stop()
    assert code == 0, log[-3000:]
