"""`stylequeue bulk` over a real worker, Redis (database 6) and a moto S3 server: outputs, bounds, resume, failures."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from PIL import Image

from stylequeue import Client
from stylequeue.embedded import EmbeddedRedis
from stylequeue.errors import ConfigError
from stylequeue.pipeline.images import working_size
from stylequeue.producer.bulk import BulkReport, is_image_key, output_keys, run_bulk, run_id
from tests.conftest import empty_database
from tests.workers import WorkerProcess, make_image, wait_for, worker_env

pytestmark = pytest.mark.slow

FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("JPG", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP"), ("PNG", "PNG"))


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, s3_endpoint: str, tiny_registry: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One worker for the module on Redis database 6; inputs may also come from a local folder."""
    url = empty_database(redis_server, 6)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bulk-store")
    local = tmp_path_factory.mktemp("bulk-local")
    settings = {"s3_endpoint_url": s3_endpoint, "s3_addressing_style": "path", "input_roots": str(local)}
    env = worker_env(url, tiny_registry, "s3://bulk-store", **settings)
    worker = WorkerProcess(env, tmp_path_factory.mktemp("worker") / "worker.log").wait_ready()
    client = Client(redis_url=url, styles=tiny_registry, storage_url="s3://bulk-store", s3_endpoint_url=s3_endpoint,
                    s3_addressing_style="path", input_roots=str(local))
    yield {"client": client, "s3": s3, "url": url, "env": env, "local": local, "redis": redis.Redis.from_url(url)}
    client.close()
    assert worker.stop() == 0, worker.output()[-3000:]


def put_photos(s3, bucket: str, count: int, prefix: str = "photos/") -> dict[str, tuple[int, int]]:
    """`count` small images of several formats and sizes in nested folders; returns key -> (width, height)."""
    sizes = {}
    for i in range(count):
        suffix, fmt = FORMATS[i % len(FORMATS)]
        key = f"{prefix}{'2024/' if i % 3 else ''}img{i:02d}.{suffix}"
        sizes[key] = (40 + i % 7 * 4, 30 + i % 5 * 6)
        s3.put_object(Bucket=bucket, Key=key, Body=make_image(*sizes[key], fmt=fmt, seed=i))
    return sizes


def keys(s3, bucket: str, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def unfinished_jobs(db: redis.Redis, input_prefix: str) -> int:
    """Jobs in Redis whose input lies under `input_prefix` and that are queued or running."""
    job_keys = list(db.scan_iter("sq:job:*", count=1000))
    pipe = db.pipeline(transaction=False)
    for key in job_keys:
        pipe.hmget(key, "state", "input_uri")
    return sum(1 for state, uri in pipe.execute()
               if uri and json.loads(uri).startswith(input_prefix) and json.loads(state) in ("queued", "running"))


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stylequeue", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


# --- pure parts ----------------------------------------------------------------------------------


def test_outputs_take_the_style_extension_and_never_collide() -> None:
    assert output_keys(["a/cat.JPG", "b/dog.jpeg", "c.webp"], "png") == {
        "a/cat.JPG": "a/cat.png", "b/dog.jpeg": "b/dog.png", "c.webp": "c.png"}
    # Two inputs that would share an output both keep their own suffix, and so does one that would then
    # land on such a name.
    clash = output_keys(["x.jpeg", "x.png", "x.jpeg.gif", "y.png"], "png")
    assert clash == {"x.jpeg": "x.jpeg.png", "x.png": "x.png.png", "x.jpeg.gif": "x.jpeg.gif.png", "y.png": "y.png"}
    assert [is_image_key(k) for k in ("a.JPG", "b.tiff", "c.Gif", "notes.txt", "folder/", ".jpg", "jpg")] == [
        True, True, True, False, False, False, False]
    assert run_id("s3://b/p", "ink", "s3://b/o") == run_id("s3://b/p/", "ink", "s3://b/o/")
    assert run_id("s3://b/p", "ink", "s3://b/o") != run_id("s3://b/p", "ink", "s3://b/o2")


def test_an_output_inside_the_source_is_refused(stack: dict) -> None:
    with pytest.raises(ConfigError, match="inside SRC_PREFIX"):
        run_bulk(stack["client"], "s3://bulk-store/photos", style="tiny", dst_prefix="s3://bulk-store/photos/out")


# --- a real worker -------------------------------------------------------------------------------


def test_bulk_restyles_every_image_to_its_key_with_bounded_jobs_in_flight(stack: dict, s3_bucket: str) -> None:
    s3, db = stack["s3"], stack["redis"]
    sizes = put_photos(s3, s3_bucket, 58)
    for key, fmt in (("photos/twin.png", "PNG"), ("photos/twin.jpg", "JPEG")):
        sizes[key] = (64, 48)
        s3.put_object(Bucket=s3_bucket, Key=key, Body=make_image(64, 48, fmt=fmt))
    s3.put_object(Bucket=s3_bucket, Key="photos/notes.txt", Body=b"not a photo")
    s3.put_object(Bucket=s3_bucket, Key="photosets/elsewhere.png", Body=make_image(8, 8))  # not under photos/
    seen: list[int] = []

    def sample(report: BulkReport) -> None:
        seen.append(unfinished_jobs(db, f"s3://{s3_bucket}/"))

    report = run_bulk(stack["client"], f"s3://{s3_bucket}/photos", style="tiny", dst_prefix=f"s3://{s3_bucket}/out",
                      max_in_flight=8, poll_s=0.05, on_progress=sample)
    assert (report.total, report.ignored, report.submitted, report.succeeded, report.failed) == (60, 1, 60, 60, 0)
    assert report.exit_code == 0 and report.in_flight == 0 and report.not_submitted == 0
    assert max(seen) <= 8, f"{max(seen)} jobs were unfinished at once"
    assert max(seen) >= 4, "never more than a few jobs in flight: the bound was not used"
    expected = {"out/" + key.removeprefix("photos/").rsplit(".", 1)[0] + ".png" for key in sizes
                if "twin" not in key} | {"out/twin.png.png", "out/twin.jpg.png"}
    assert keys(s3, s3_bucket, "out/") == expected
    body = s3.get_object(Bucket=s3_bucket, Key="out/2024/img01.png")["Body"].read()
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG" and image.size == working_size(*sizes["photos/2024/img01.jpg"], 64)


def test_a_limited_run_resumes_with_only_the_rest(stack: dict, s3_bucket: str) -> None:
    client, s3, db = stack["client"], stack["s3"], stack["redis"]
    put_photos(s3, s3_bucket, 30)
    src, dst = f"s3://{s3_bucket}/photos/", f"s3://{s3_bucket}/restyled/"
    first = run_bulk(client, src, style="tiny", dst_prefix=dst, limit=10, poll_s=0.05)
    assert (first.submitted, first.succeeded, first.not_submitted) == (10, 10, 20)
    assert len(keys(s3, s3_bucket, "restyled/")) == 10
    with pytest.raises(ConfigError, match="pass --resume"):
        run_bulk(client, src, style="tiny", dst_prefix=dst)
    # Two finished jobs' records expire (TTL): their inputs must be done again.
    recorded = {k.decode(): v.decode() for k, v in db.hgetall(f"sq:bulk:{first.run_id}:jobs").items()}
    assert len(recorded) == 10
    expired = sorted(recorded)[:2]
    db.delete(*[f"sq:job:{recorded[k]}" for k in expired])
    second = run_bulk(client, src, style="tiny", dst_prefix=dst, resume=True, poll_s=0.05)
    assert (second.skipped, second.submitted, second.succeeded, second.failed) == (8, 22, 22, 0)
    assert second.resumed and second.exit_code == 0
    assert len(keys(s3, s3_bucket, "restyled/")) == 30
    after = {k.decode(): v.decode() for k, v in db.hgetall(f"sq:bulk:{first.run_id}:jobs").items()}
    assert len(after) == 30
    assert all(after[k] == recorded[k] for k in recorded if k not in expired), "a succeeded input was redone"
    assert all(after[k] != recorded[k] for k in expired)


def test_local_folder_sources(stack: dict, s3_bucket: str) -> None:
    folder = stack["local"] / "album"
    (folder / "trip").mkdir(parents=True)
    for name in ("a.png", "trip/b.jpg", "trip/c.gif"):
        Image.open(io.BytesIO(make_image(32, 32))).save(folder / name)
    (folder / "trip" / "list.csv").write_text("a,b\n")
    report = run_bulk(stack["client"], f"file://{folder}", style="tiny", dst_prefix=f"s3://{s3_bucket}/album",
                      poll_s=0.05)
    assert (report.total, report.ignored, report.succeeded) == (3, 1, 3)
    assert keys(stack["s3"], s3_bucket, "album/") == {
        "album/a.png", "album/trip/b.png", "album/trip/c.png"}


def test_cli_interrupt_refusal_and_resume(stack: dict, s3_bucket: str, tmp_path: Path) -> None:
    s3, db = stack["s3"], stack["redis"]
    put_photos(s3, s3_bucket, 12)
    src, dst = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/ink"
    args = ("bulk", src, "--style", "tiny", "--output", dst)
    run_jobs = f"sq:bulk:{run_id(src, 'tiny', dst)}:jobs"
    with EmbeddedRedis(persist=False) as unheard:
        # Messages go to a broker no worker listens to: the first jobs stay queued until the resume.
        stalled_env = stack["env"] | {"STYLEQUEUE_BROKER_URL": unheard.url}
        first = subprocess.Popen([sys.executable, "-m", "stylequeue", *args, "--max-in-flight", "5"],
                                 env=stalled_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: db.hlen(run_jobs) == 5, timeout=60), first.stderr
            busy = cli(*args, "--resume", env=stack["env"])
            assert busy.returncode == 2 and "already running" in busy.stderr
            first.send_signal(signal.SIGINT)
            stdout, stderr = first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 130, stderr
    assert f"--output {dst}/ --resume" in stdout and "5 still running, 7 not submitted" in stdout
    refused = cli(*args, env=stack["env"])
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "pass --resume" in refused.stderr
    resumed = cli(*args, "--resume", "--json", env=stack["env"])
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert (report["total"], report["skipped"], report["submitted"], report["succeeded"]) == (12, 0, 7, 12)
    assert len(keys(s3, s3_bucket, "ink/")) == 12


def test_cli_reports_failed_inputs_with_their_codes(stack: dict, s3_bucket: str, tmp_path: Path) -> None:
    s3 = stack["s3"]
    put_photos(s3, s3_bucket, 5)
    s3.put_object(Bucket=s3_bucket, Key="photos/broken.jpg", Body=b"\xff\xd8\xff\xe0 not really a jpeg")
    failures = tmp_path / "failures.jsonl"
    result = cli("bulk", f"s3://{s3_bucket}/photos/", "--style", "tiny", "--output", f"s3://{s3_bucket}/out/",
                 "--failures", str(failures), env=stack["env"])
    assert result.returncode == 1, result.stderr
    assert "failed     1 (invalid_input 1)" in result.stdout
    assert f"FAILED s3://{s3_bucket}/photos/broken.jpg: invalid_input" in result.stdout
    lines = [json.loads(line) for line in failures.read_text().splitlines()]
    assert len(lines) == 1
    assert lines[0]["input_uri"] == f"s3://{s3_bucket}/photos/broken.jpg" and lines[0]["code"] == "invalid_input"
    assert lines[0]["output_uri"] == f"s3://{s3_bucket}/out/broken.png" and lines[0]["job_id"].startswith("j_")
    assert keys(s3, s3_bucket, "out/") == {f"out/{'2024/' if i % 3 else ''}img{i:02d}.png" for i in range(5)}
