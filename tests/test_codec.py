"""The codec pool (worker/codec.py): real spawned child processes, file:// storage in a temp dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylequeue import JobState
from stylequeue.config.settings import Settings
from stylequeue.config.styles import StyleCatalog
from stylequeue.embedded import EmbeddedRedis
from stylequeue.errors import InternalError, InvalidInput, JobTimeout
from stylequeue.jobs import Job, RedisJobStore
from stylequeue.pipeline.images import working_size
from stylequeue.pipeline.process import Prepared
from stylequeue.producer.client import Client
from stylequeue.worker import codec
from stylequeue.worker.codec import CodecPool, Done, Fence, LoadItem, PromoteItem, StageItem
from tests.conftest import empty_database
from tests.workers import WorkerProcess, make_image, worker_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("codec")
    (base / "in").mkdir()
    (base / "out").mkdir()
    return base / "in", base / "out"


@pytest.fixture(scope="module")
def pool(roots: tuple[Path, Path]) -> Iterator[CodecPool]:
    inputs, outputs = roots
    settings = Settings(storage_url=f"file://{outputs}", input_roots=[inputs])
    codec = CodecPool(settings, 2, timeout_s=60)  # a replaced child starts (imports) within this, even under load
    codec.warm()
    yield codec
    codec.close()


@pytest.fixture(scope="module")
def spec(tiny_registry: Path):
    return StyleCatalog(tiny_registry).get("tiny")


# --- functions the children run in the crash and timeout tests (children import this module) ---


def exit_on_crash(items: list[str]) -> list[tuple[object, float]]:
    if "crash" in items:
        os._exit(3)  # what a segfaulting decoder looks like from the parent
    return [Done(item.upper()) for item in items]


def sleep_for(items: list[float]) -> list[Done]:
    time.sleep(max(items))
    return [Done(True) for _ in items]


# --- tests ------------------------------------------------------------------------------------


def test_load_and_store_a_group_with_one_bad_input(pool: CodecPool, roots: tuple[Path, Path], spec) -> None:
    inputs, outputs = roots
    (inputs / "a.png").write_bytes(make_image(40, 24))
    (inputs / "bad.png").write_bytes(b"not an image at all")
    (inputs / "b.jpg").write_bytes(make_image(64, 64, "JPEG"))
    uris = [f"file://{inputs}/{name}" for name in ("a.png", "bad.png", "b.jpg", "missing.png")]
    loaded = pool.load([LoadItem(uri, spec, 10**7) for uri in uris])
    a, bad, b, missing = (done.value for done in loaded)
    assert isinstance(a, Prepared) and (a.width, a.height) == (40, 24)
    assert a.pixels.dtype == np.uint8 and a.pixels.shape == (24, 40, 3)
    assert isinstance(b, Prepared) and b.pixels.shape == (64, 64, 3)
    assert isinstance(bad, InvalidInput)
    assert missing.code == "input_not_found"
    assert all(done.seconds >= 0 for done in loaded)

    written = outputs / "outputs"
    staged = pool.stage([StageItem(f"file://{written}/a.png", a.pixels, spec, "a1"),
                         StageItem(f"file://{written}/b.png", b.pixels, spec, "a1")])
    assert not (written / "a.png").exists()  # staged beside it, not yet in place
    errors = pool.promote([PromoteItem(done.value.staged_uri, f"file://{written}/{name}")
                           for done, name in zip(staged, ("a.png", "b.png"), strict=True)])
    assert [done.error for done in errors] == [None, None]
    assert [done.value.size for done in staged] == [(written / "a.png").stat().st_size,
                                                     (written / "b.png").stat().st_size]
    assert np.array_equal(np.asarray(Image.open(written / "a.png")), a.pixels)  # png: lossless round trip
    assert sorted(p.name for p in written.iterdir()) == ["a.png", "b.png"]  # nothing staged is left


def test_store_outside_the_storage_root_is_refused(pool: CodecPool, spec, tmp_path: Path) -> None:
    pixels = np.zeros((8, 8, 3), np.uint8)
    [done] = pool.stage([StageItem(f"file://{tmp_path}/elsewhere.png", pixels, spec, "a1")])
    assert done.error is not None and done.error.code == "input_forbidden"
    assert not (tmp_path / "elsewhere.png").exists()


def test_a_child_that_dies_costs_only_its_own_job(pool: CodecPool) -> None:
    outcomes = pool._call(exit_on_crash, ["a", "crash", "b"], crashed="it died")
    assert outcomes[0] == Done("A") and outcomes[2] == Done("B")
    assert isinstance(outcomes[1].value, InternalError) and "it died" in outcomes[1].value.message
    assert pool._call(exit_on_crash, ["c"], crashed="it died") == [Done("C")]  # the pool was rebuilt


def test_a_group_past_the_timeout_fails_with_timeout(roots: tuple[Path, Path]) -> None:
    inputs, outputs = roots
    codec = CodecPool(Settings(storage_url=f"file://{outputs}", input_roots=[inputs]), 1, timeout_s=0.5)
    try:
        outcomes = codec._call(sleep_for, [3.0, 0.0], crashed="")
        assert [type(done.value) for done in outcomes] == [JobTimeout, JobTimeout]
        assert outcomes[0].value.transient
        codec.warm()  # the replacement's start-up (imports) must not count against the 0.5 s under load
        assert codec._call(sleep_for, [0.0], crashed="") == [Done(True)]  # the stuck child was replaced
    finally:
        codec.close()


def test_children_exit_when_the_worker_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from stylequeue.config.settings import Settings
        from stylequeue.worker.codec import CodecPool, Done, LoadItem, PromoteItem, StageItem
        if __name__ == "__main__":
            pool = CodecPool(Settings(storage_url="file://{tmp_path}"), 2, timeout_s=5)
            pool.warm()
            print(" ".join(map(str, pool.pids())), flush=True)
            import time
            time.sleep(600)
    """)
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2 and parent.pid not in children
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), "codec processes outlived their worker"
    finally:
        parent.kill()
        parent.stdout.close()


def test_a_child_whose_worker_died_stages_nothing_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child busy with a group when its worker is killed finishes that group on its own; any output it staged
    then would belong to jobs other workers have taken over, and nothing would delete it. Once its parent is
    not the worker that started it, it writes nothing."""
    from stylequeue.pipeline.storage import Storage
    from stylequeue.worker import codec

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    monkeypatch.setattr(codec, "_storage", Storage(Settings(storage_url=f"file://{tmp_path}")))
    item = (f"file://{outputs}/j_1.png", b"png bytes", "image/png", "a1")
    monkeypatch.setattr(codec, "_parent", os.getppid())  # the worker is alive: the output is staged
    staged = codec._stage_one(item)
    assert isinstance(staged, codec.Staged) and len(list(outputs.iterdir())) == 1
    monkeypatch.setattr(codec, "_parent", os.getppid() + 1)  # the worker is gone (the child was re-parented)
    refused = codec._stage_one(item)
    assert isinstance(refused, InternalError) and "gone" in str(refused)
    assert len(list(outputs.iterdir())) == 1, "a child staged an output after its worker died"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def test_a_worker_without_codec_processes_runs_bulk_jobs_on_its_threads(
        redis_server: EmbeddedRedis, tiny_registry: Path, tmp_path: Path) -> None:
    url = empty_database(redis_server, 7)
    inputs = tmp_path / "in"
    inputs.mkdir()
    uris = []
    for i in range(12):
        (inputs / f"{i}.png").write_bytes(make_image(20 + i, 30, seed=i))
        uris.append(f"file://{inputs}/{i}.png")
    (inputs / "bad.png").write_bytes(b"GIF89a broken")
    uris.append(f"file://{inputs}/bad.png")
    storage = f"file://{tmp_path}/store"
    env = worker_env(url, tiny_registry, storage, input_roots=str(inputs))
    worker = WorkerProcess(env, tmp_path / "worker.log", "--codec-procs", "0", "--max-batch", "4").wait_ready()
    client = Client(redis_url=url, styles=tiny_registry, storage_url=storage, input_roots=str(inputs))
    try:
        jobs = [client.wait(job.id, timeout=60) for job in client.submit_many(uris, style="tiny")]
        assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 12 + [JobState.FAILED]
        assert jobs[-1].error["code"] == "invalid_input"
        for i, job in enumerate(jobs[:12]):
            assert Image.open(job.output_uri[len("file://"):]).size == working_size(20 + i, 30, 64)
        assert "codec processes" not in worker.output()
    finally:
        client.close()
        assert worker.stop() == 0, worker.output()[-3000:]


@pytest.mark.parametrize(("runtime", "device", "expected"),
                         [("auto", "cpu", 0), ("null", "cpu", 2), ("auto", "gpu:0", 2)])
def test_codec_processes_by_default_only_where_the_model_leaves_the_cpu_free(
        runtime: str, device: str, expected: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from stylequeue.worker import codec as codec_module
    from stylequeue.worker.service import WorkerOptions, WorkerService

    monkeypatch.setattr(codec_module, "default_processes", lambda: 2)
    settings = Settings(redis_url="redis://127.0.0.1:1/0", storage_url=f"file://{tmp_path}", runtime=runtime,
                        device=device)
    service = WorkerService(settings, WorkerOptions(), app=None)  # type: ignore[arg-type]
    warming = service._start_codec()
    try:
        assert (service.codec.processes if service.codec else 0) == expected
        if warming is not None:
            warming.join()
            assert len(service.codec.pids()) == expected
    finally:
        if service.codec is not None:
            service.codec.close()


def test_a_worker_holds_a_group_for_each_of_its_codec_processes(tmp_path: Path) -> None:
    """Backpressure's floor rises with the codec pool: each process takes a whole group, so holding fewer jobs
    than a group apiece (and a message arriving) would leave processes idle on slow photos."""
    from stylequeue.broker import BULK_CHUNK_SIZE
    from stylequeue.worker.service import WorkerOptions, WorkerService

    settings = Settings(redis_url="redis://127.0.0.1:1/0", storage_url=f"file://{tmp_path}", runtime="null",
                        max_batch=64)
    service = WorkerService(settings, WorkerOptions(codec_processes=6), app=None)  # type: ignore[arg-type]
    before = service.backpressure.min_water
    warming = service._start_codec()
    try:
        assert before < 6 * 64 + BULK_CHUNK_SIZE
        assert service.backpressure.min_water == service.backpressure.high_water == 6 * 64 + BULK_CHUNK_SIZE
    finally:
        if warming is not None:
            warming.join()
        if service.codec is not None:
            service.codec.close()


# --- a group staged, fenced and promoted by its codec process ------------------------------------------


def _held_jobs(url: str, outputs: Path, holders: list[str]) -> tuple[RedisJobStore, list[str]]:
    """One running job per holder (claimed by that worker id), each with its own output under `outputs`."""
    store = RedisJobStore.from_url(url)
    ids = []
    for index, holder in enumerate(holders):
        job = Job(id=f"j_fence{index}", style="tiny", input_uri="file:///in.png",
                  output_uri=f"file://{outputs}/outputs/fenced/{index}.png", priority="bulk")
        store.create(job)
        assert store.claim_many([job.id], holder, lease_s=60)[0].job is not None
        ids.append(job.id)
    return store, ids


def _fence(job_id: str, owner: str) -> Fence:
    results = {"width": 8, "height": 8, "model": "tiny@test", "timings_ms": {"fetch": 1.0}, "output_bytes": 0,
               "error": None}
    return Fence(job_id, 1, owner, 60, results)


def test_a_group_is_fenced_and_promoted_by_the_process_that_staged_it(
        redis_server: EmbeddedRedis, roots: tuple[Path, Path], spec) -> None:
    _, outputs = roots
    url = empty_database(redis_server, 7)
    store, (mine, taken) = _held_jobs(url, outputs, ["w-me", "w-other"])
    pool = CodecPool(Settings(redis_url=url, storage_url=f"file://{outputs}"), 1, timeout_s=60)
    pixels = np.full((8, 8, 3), 200, np.uint8)
    try:
        done = pool.stage([StageItem(f"file://{outputs}/outputs/fenced/{i}.png", pixels, spec, f"a1-{job_id}",
                                     _fence(job_id, "w-me"))
                           for i, job_id in enumerate((mine, taken))])
    finally:
        pool.close()
    won, lost = (outcome.value for outcome in done)
    assert (won.fenced, won.promote_error) == (True, None)
    assert (outputs / "outputs" / "fenced" / "0.png").stat().st_size == won.size  # promoted in place
    record = store.get(mine)
    assert record.staged_uri == won.staged_uri and record.output_bytes == won.size  # fenced with its results
    assert record.model == "tiny@test" and set(record.timings_ms) == {"fetch", "store"}
    assert lost.fenced is False  # another worker holds that job: nothing promoted, its copy left to the worker
    assert not (outputs / "outputs" / "fenced" / "1.png").exists()
    assert Path(lost.staged_uri[len("file://"):]).exists()
    assert store.get(taken).staged_uri is None


def test_a_job_store_the_codec_process_cannot_reach_leaves_the_fence_to_the_worker(
        roots: tuple[Path, Path], spec) -> None:
    _, outputs = roots
    pool = CodecPool(Settings(redis_url="redis://127.0.0.1:1/0", storage_url=f"file://{outputs}"), 1, timeout_s=60)
    try:
        pixels = np.zeros((8, 8, 3), np.uint8)
        [done] = pool.stage([StageItem(f"file://{outputs}/outputs/fenced/unreachable.png", pixels, spec, "a1-j_x",
                                       _fence("j_x", "w-me"))])
    finally:
        pool.close()
    assert done.error is None and done.value.fenced is None  # not fenced, so not promoted: the worker fences it
    assert not (outputs / "outputs" / "fenced" / "unreachable.png").exists()
    assert Path(done.value.staged_uri[len("file://"):]).exists()


def test_the_pipe_framing_carries_large_and_many_arrays_and_reports_a_peer_gone_mid_message() -> None:
    """_send/_recv over a real pipe: arrays far larger than the pipe's buffer (the writer blocks part way),
    more arrays than one writev takes, empty ones, and a writer that dies half way through a message."""
    import multiprocessing

    ours, theirs = multiprocessing.Pipe()
    rng = np.random.default_rng(3)
    big = [rng.integers(0, 255, (700, 900, 3), np.uint8) for _ in range(3)]  # ~5.7 MB
    many = [np.full((2,), i, np.int32) for i in range(codec._IOV_MAX + 50)] + [np.zeros((0,), np.uint8)]
    received: list[object] = []
    reader = threading.Thread(target=lambda: received.extend([codec._recv(theirs), codec._recv(theirs)]))
    reader.start()
    codec._send(ours, ("big", big))
    codec._send(ours, {"many": many, "text": "ok"})
    reader.join(30)
    (name, got_big), got_many = received
    assert name == "big" and all(np.array_equal(a, b) for a, b in zip(big, got_big, strict=True))
    assert got_many["text"] == "ok" and len(got_many["many"]) == len(many)
    assert all(np.array_equal(a, b) for a, b in zip(many, got_many["many"], strict=True))
    # A peer that dies mid-message: the frame promises more bytes than ever come.
    os.write(ours.fileno(), (1 << 20).to_bytes(8, "little") + b"partial")
    ours.close()
    with pytest.raises(EOFError):
        codec._recv(theirs)
    theirs.close()
