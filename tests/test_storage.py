"""Storage by URI against real things: a moto S3 server, temp directories, a local HTTP server."""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import stat
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from stylequeue.config.settings import Settings
from stylequeue.embedded import free_port
from stylequeue.errors import InputForbidden, InputNotFound, InputTooLarge, StorageError
from stylequeue.pipeline.storage import (
    Storage,
    check_input_uri,
    check_output_prefix,
    check_output_uri,
    files,
    join_uri,
    netguard,
    redact_uri,
    walk,
)
from tests.workers import serve_http

PHOTO = bytes(range(256)) * 8  # 2 KiB


def s3_storage(endpoint: str, **overrides: Any) -> Storage:
    return Storage(Settings(s3_endpoint_url=endpoint, s3_addressing_style="path", storage_url="s3://out",
                            **overrides))


# --- s3:// ---------------------------------------------------------------------------------------


def test_s3_write_then_read_keeps_bytes_and_content_type(s3_endpoint: str, s3_bucket: str) -> None:
    storage = s3_storage(s3_endpoint)
    storage.write(f"s3://{s3_bucket}/out/ink/j_1.png", PHOTO, "image/png")
    assert storage.read(f"s3://{s3_bucket}/out/ink/j_1.png") == PHOTO
    head = storage.s3_client().head_object(Bucket=s3_bucket, Key="out/ink/j_1.png")
    assert head["ContentType"] == "image/png"
    assert storage.exists(f"s3://{s3_bucket}/out/ink/j_1.png")
    storage.delete(f"s3://{s3_bucket}/out/ink/j_1.png")
    assert not storage.exists(f"s3://{s3_bucket}/out/ink/j_1.png")


def test_s3_uploads_carry_no_checksum_headers_that_compatible_stores_reject(
        s3_endpoint: str, s3_bucket: str) -> None:
    storage = s3_storage(s3_endpoint)
    sent: list[dict[str, str]] = []
    storage.s3_client().meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))
    storage.write(f"s3://{s3_bucket}/a.jpg", PHOTO, "image/jpeg")
    names = {name.lower() for name in sent[0]}
    assert not any(name.startswith(("x-amz-checksum", "x-amz-sdk-checksum")) for name in names), names


@pytest.mark.parametrize("where", ["missing key", "missing bucket"])
def test_s3_missing_object_is_input_not_found(s3_endpoint: str, s3_bucket: str, where: str) -> None:
    uri = f"s3://{s3_bucket}/nope.jpg" if where == "missing key" else f"s3://no-such-bucket-{free_port()}/a.jpg"
    with pytest.raises(InputNotFound):
        s3_storage(s3_endpoint).read(uri)


def test_s3_write_to_a_missing_bucket_fails_permanently(s3_endpoint: str) -> None:
    with pytest.raises(StorageError, match="NoSuchBucket") as caught:
        s3_storage(s3_endpoint).write(f"s3://no-such-bucket-{free_port()}/a.png", b"x", "image/png")
    assert not caught.value.transient


def test_s3_oversized_object_is_input_too_large(s3_endpoint: str, s3_bucket: str) -> None:
    storage = s3_storage(s3_endpoint, max_input_bytes=1000)
    storage.write(f"s3://{s3_bucket}/big.jpg", PHOTO, "image/jpeg")
    with pytest.raises(InputTooLarge, match="2048 bytes"):
        storage.read(f"s3://{s3_bucket}/big.jpg")


def test_presigned_url_fetches_the_object_over_http(s3_endpoint: str, s3_bucket: str) -> None:
    storage = s3_storage(s3_endpoint)
    storage.write(f"s3://{s3_bucket}/p.jpg", PHOTO, "image/jpeg")
    url = storage.presign(f"s3://{s3_bucket}/p.jpg", 600)
    assert url is not None and "X-Amz-Expires=600" in url
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == PHOTO
    assert storage.presign("file:///tmp/x.jpg", 600) is None


def test_presign_names_the_public_endpoint(s3_endpoint: str, s3_bucket: str) -> None:
    port = urlsplit(s3_endpoint).port
    storage = s3_storage(s3_endpoint, s3_public_endpoint_url=f"http://localhost:{port}")
    storage.write(f"s3://{s3_bucket}/p.jpg", PHOTO, "image/jpeg")
    url = storage.presign(f"s3://{s3_bucket}/p.jpg", 60)
    assert url is not None and urlsplit(url).netloc == f"localhost:{port}"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == PHOTO
    # SigV4 signs the Host: the same request signed in the same second for the internal host differs.
    internal = s3_storage(s3_endpoint)
    for _ in range(3):
        public_query = parse_qs(urlsplit(storage.presign(f"s3://{s3_bucket}/p.jpg", 60) or "").query)
        internal_query = parse_qs(urlsplit(internal.presign(f"s3://{s3_bucket}/p.jpg", 60) or "").query)
        if public_query["X-Amz-Date"] == internal_query["X-Amz-Date"]:
            assert public_query["X-Amz-Signature"] != internal_query["X-Amz-Signature"]
            break
    else:
        pytest.fail("could not sign twice within one second")


def test_s3_list_pages_through_every_key_under_a_prefix(s3_endpoint: str, s3_bucket: str) -> None:
    storage = s3_storage(s3_endpoint)
    keys = [f"in/{i:02d}.jpg" for i in range(7)]
    for key in [*keys, "in2/x.jpg", "other/y.jpg"]:
        storage.write(f"s3://{s3_bucket}/{key}", b"x", "image/jpeg")
    calls: list[int] = []
    storage.s3_client().meta.events.register("before-call.s3.ListObjectsV2", lambda **_: calls.append(1))
    listed = list(storage.list(f"s3://{s3_bucket}/in/", page_size=3))
    assert listed == [f"s3://{s3_bucket}/{key}" for key in keys]
    assert len(calls) == 3


def test_unreachable_endpoint_is_a_transient_storage_error() -> None:
    storage = s3_storage(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError) as caught:
        storage.read("s3://bucket/a.jpg")
    assert caught.value.transient
    with pytest.raises(StorageError) as caught:
        storage.write("s3://bucket/a.jpg", b"x", "image/jpeg")
    assert caught.value.transient


def test_s3_errors_say_what_happened_without_the_endpoint(s3_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    bucket = f"no-such-bucket-{free_port()}"
    with pytest.raises(StorageError) as caught:
        s3_storage(s3_endpoint).write(f"s3://{bucket}/a.png", b"x", "image/png")
    assert caught.value.message == f"S3 answered 404 NoSuchBucket for s3://{bucket}/a.png"
    port = free_port()
    caplog.set_level(logging.INFO, logger="stylequeue.pipeline.storage")
    with pytest.raises(StorageError) as caught:
        s3_storage(f"http://127.0.0.1:{port}").read("s3://bucket/a.jpg")
    assert caught.value.transient and caught.value.message.startswith("S3 did not answer for s3://bucket/a.jpg")
    assert str(port) not in caught.value.message and "127.0.0.1" not in caught.value.message
    assert f"127.0.0.1:{port}" in caplog.text  # the whole story stays in the worker's own log


def test_one_client_per_storage_even_under_concurrent_first_use(s3_endpoint: str) -> None:
    storage = s3_storage(s3_endpoint)
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(storage.s3_client())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(client) for client in seen}) == 1
    assert storage.s3_client().meta.config.max_pool_connections >= 32


# --- file:// -------------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(inputs root, outside dir) with inputs/a.jpg and outside/secret.txt."""
    inside, outside = tmp_path / "inputs", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.jpg").write_bytes(PHOTO)
    (outside / "secret.txt").write_text("secret")
    return inside, outside


def file_storage(inputs: Path, **overrides: Any) -> Storage:
    return Storage(Settings(storage_url=f"file://{inputs.parent / 'data'}", input_roots=[str(inputs)], **overrides))


def test_file_read_inside_the_roots(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    assert file_storage(inside).read(f"file://{inside}/a.jpg") == PHOTO


@pytest.mark.parametrize("relative", ["outside/secret.txt", "inputs/../outside/secret.txt",
                                      "inputs/link.txt", "inputs/linkdir/secret.txt"])
def test_file_reads_escaping_the_roots_are_forbidden(roots: tuple[Path, Path], relative: str) -> None:
    inside, outside = roots
    (inside / "link.txt").symlink_to(outside / "secret.txt")
    (inside / "linkdir").symlink_to(outside)
    with pytest.raises(InputForbidden):
        file_storage(inside).read(f"file://{inside.parent}/{relative}")


def test_a_symlink_that_stays_inside_the_root_is_read(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    (inside / "alias.jpg").symlink_to(inside / "a.jpg")
    assert file_storage(inside).read(f"file://{inside}/alias.jpg") == PHOTO


def test_file_inputs_need_input_roots(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    storage = Storage(Settings(storage_url="s3://out"))
    with pytest.raises(InputForbidden, match="STYLEQUEUE_INPUT_ROOTS"):
        storage.read(f"file://{inside}/a.jpg")


def test_missing_directory_and_oversized_files(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    storage = file_storage(inside, max_input_bytes=1000)
    with pytest.raises(InputNotFound):
        storage.read(f"file://{inside}/missing.jpg")
    (inside / "sub").mkdir()
    with pytest.raises(InputNotFound):
        storage.read(f"file://{inside}/sub")
    with pytest.raises(InputTooLarge):
        storage.read(f"file://{inside}/a.jpg")


def test_file_write_is_atomic_and_leaves_no_temp_files(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    storage = file_storage(inside)
    data_dir = inside.parent / "data"
    uri = join_uri(f"file://{data_dir}", "outputs", "ink", "j_1.png")
    storage.write(uri, b"first", "image/png")
    storage.write(uri, b"second", "image/png")
    assert (data_dir / "outputs/ink/j_1.png").read_bytes() == b"second"
    (data_dir / "outputs/ink/taken").mkdir()
    with pytest.raises(StorageError):  # the rename onto a directory fails after the temp file was written
        storage.write(join_uri(f"file://{data_dir}", "outputs/ink/taken"), b"x", "image/png")
    assert sorted(os.listdir(data_dir / "outputs/ink")) == ["j_1.png", "taken"]
    assert storage.exists(uri)
    storage.delete(uri)
    assert not storage.exists(uri)


def test_a_write_after_its_directory_was_removed_makes_it_again(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    storage = file_storage(inside)
    data_dir = inside.parent / "data"
    first, second = (join_uri(f"file://{data_dir}", "outputs", "ink", name) for name in ("j_1.png", "j_2.png"))
    storage.write(first, b"one", "image/png")
    shutil.rmtree(data_dir / "outputs")  # an operator's cleanup while the worker runs
    storage.write(second, b"two", "image/png")
    assert sorted(os.listdir(data_dir / "outputs" / "ink")) == ["j_2.png"]
    assert (data_dir / "outputs" / "ink" / "j_2.png").read_bytes() == b"two"
    assert stat.S_IMODE((data_dir / "outputs" / "ink" / "j_2.png").stat().st_mode) == 0o644


def test_a_large_file_reads_back_whole(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    blob = os.urandom(3 << 20)
    (inside / "big.bin").write_bytes(blob)
    assert file_storage(inside).read(f"file://{inside}/big.bin") == blob
    with pytest.raises(InputTooLarge):
        file_storage(inside, max_input_bytes=len(blob) - 1).read(f"file://{inside}/big.bin")


def test_a_retried_write_sweeps_the_temp_files_a_killed_writer_left(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    storage = file_storage(inside)
    folder = inside.parent / "data" / "outputs" / "ink"
    folder.mkdir(parents=True)
    stray = folder / ".j_1.png.k1ll3d.sqtmp"  # what a writer killed between write and rename leaves
    other = folder / ".j_2.png.alive.sqtmp"  # another job's write in progress: not ours to touch
    stray.write_bytes(b"half")
    other.write_bytes(b"half")
    uri = join_uri(f"file://{inside.parent / 'data'}", "outputs", "ink", "j_1.png")
    storage.write(uri, b"first attempt", "image/png")
    assert stray.exists()  # a first attempt does not list the directory
    storage.write(uri, b"retry", "image/png", sweep=True)
    assert sorted(os.listdir(folder)) == [".j_2.png.alive.sqtmp", "j_1.png"]
    assert (folder / "j_1.png").read_bytes() == b"retry"


def test_file_outputs_go_only_under_the_output_directory(roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    storage = file_storage(inside)
    data = inside.parent / "data"
    (data / "redis").mkdir(parents=True)
    (data / "redis" / "appendonly.aof").write_bytes(b"*2\r\n")  # the job store's own file under `serve`
    (data / "outputs").mkdir()
    (data / "outputs" / "escape").symlink_to(outside)
    refused = [f"file://{data}/redis/appendonly.aof", f"file://{data}/x.png", f"file://{inside}/x.png",
               f"file://{outside}/x.png", f"file://{data}/outputs/../redis/appendonly.aof",
               f"file://{data}/outputs", f"file://{data}/outputs/ink/"]
    for uri in refused:
        with pytest.raises(InputForbidden):
            check_output_uri(uri, storage.settings)  # the producer refuses what the worker refuses
        with pytest.raises(InputForbidden):
            storage.write(uri, b"x", "image/png")
    with pytest.raises(InputForbidden):  # only the worker can see a symlink
        storage.write(f"file://{data}/outputs/escape/x.png", b"x", "image/png")
    assert (data / "redis" / "appendonly.aof").read_bytes() == b"*2\r\n"
    assert sorted(os.listdir(outside)) == ["secret.txt"] and sorted(os.listdir(inside)) == ["a.jpg"]
    accepted = f"file://{data}/outputs/ink/x.png"
    check_output_uri(accepted, storage.settings)
    storage.write(accepted, b"x", "image/png")
    assert (data / "outputs" / "ink" / "x.png").read_bytes() == b"x"
    with pytest.raises(InputForbidden):
        storage.write("https://example.com/x.png", b"x", "image/png")


def test_file_outputs_need_a_file_storage_url(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    storage = Storage(Settings(storage_url="s3://out", input_roots=[str(inside)]))
    with pytest.raises(InputForbidden, match="STYLEQUEUE_STORAGE_URL is not a file:// URI"):
        storage.write(f"file://{inside}/outputs/x.png", b"x", "image/png")
    assert sorted(os.listdir(inside)) == ["a.jpg"]


def test_a_refused_output_says_which_setting_decides_and_names_no_query(tmp_path: Path) -> None:
    settings = Settings(storage_url=f"file://{tmp_path}/data")
    with pytest.raises(InputForbidden) as caught:
        check_output_uri(f"file://{tmp_path}/elsewhere/x.png", settings)
    assert "STYLEQUEUE_STORAGE_URL" in caught.value.message and "/outputs/" in caught.value.message
    assert f"file://{tmp_path}/elsewhere/x.png is outside" in caught.value.message
    assert str(tmp_path / "data") not in caught.value.message  # HTTP callers must not learn server directories
    # A prefix is judged as a prefix: the message names it, not a made-up key under it.
    with pytest.raises(InputForbidden) as caught:
        check_output_prefix(f"file://{tmp_path}/elsewhere/", settings)
    assert caught.value.message.startswith(f"file://{tmp_path}/elsewhere/ is outside")
    check_output_prefix(f"file://{tmp_path}/data/outputs", settings)
    check_output_prefix(f"file://{tmp_path}/data/outputs/run1/", settings)
    check_output_prefix("s3://out", settings)
    with pytest.raises(InputForbidden):
        check_output_prefix("https://u:p@example.com/out/?X-Amz-Signature=abc", settings)


def test_writes_refuse_a_symlink_anywhere_below_the_output_directory(roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    storage = file_storage(inside)
    outputs = inside.parent / "data" / "outputs"
    (outputs / "ink").mkdir(parents=True)
    (outputs / "ink" / "taken.png").symlink_to(outside / "secret.txt")
    (outputs / "ink" / "deep").symlink_to(outside)
    for name in ("taken.png", "deep/x.png", "deep/new/x.png"):
        with pytest.raises(InputForbidden, match="symbolic link"):
            storage.write(f"file://{outputs}/ink/{name}", b"x", "image/png")
    assert (outside / "secret.txt").read_text() == "secret" and sorted(os.listdir(outside)) == ["secret.txt"]
    # The output directory itself replaced by a symlink after the storage was made: refused as well.
    os.rename(outputs, inside.parent / "data" / "old-outputs")
    outputs.symlink_to(outside)
    with pytest.raises(InputForbidden, match="symbolic link"):
        storage.write(f"file://{outputs}/ink/x.png", b"x", "image/png")
    assert sorted(os.listdir(outside)) == ["secret.txt"]


def swap_mid_walk(monkeypatch: pytest.MonkeyPatch, before: str, directory: Path, target: Path) -> list[str]:
    """Make the next walk, just before it opens a directory named `before`, swap `directory` for a symlink
    to `target` (once). Returns the list of swaps made, to show the race really ran."""
    swaps: list[str] = []

    def race(root: str, parts: list[str], index: int) -> None:
        if parts[index] == before and not swaps:
            swaps.append(str(directory))
            directory.rename(directory.with_name(directory.name + ".orig"))
            directory.symlink_to(target, target_is_directory=True)

    monkeypatch.setattr(walk, "_before_open", race)
    return swaps


def test_a_directory_swapped_for_a_symlink_mid_write_cannot_redirect_it(
        roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    inside, outside = roots
    outputs = inside.parent / "data" / "outputs"
    (outputs / "ink" / "sub").mkdir(parents=True)
    # Exactly between the walk's steps, the next directory becomes a symlink to a directory outside.
    swaps = swap_mid_walk(monkeypatch, "sub", outputs / "ink" / "sub", outside)
    with pytest.raises(InputForbidden, match="symbolic link"):
        file_storage(inside).write(f"file://{outputs}/ink/sub/second.jpg", b"x", "image/jpeg")
    assert swaps and sorted(os.listdir(outside)) == ["secret.txt"]


def test_a_directory_swapped_after_it_was_entered_keeps_the_write_where_it_was(
        roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    inside, outside = roots
    outputs = inside.parent / "data" / "outputs"
    (outputs / "ink" / "sub").mkdir(parents=True)
    swaps = swap_mid_walk(monkeypatch, "sub", outputs / "ink", outside)  # the walk holds `ink` open already
    file_storage(inside).write(f"file://{outputs}/ink/sub/second.jpg", b"x", "image/jpeg")
    assert swaps and (outputs / "ink.orig" / "sub" / "second.jpg").read_bytes() == b"x"
    assert sorted(os.listdir(outside)) == ["secret.txt"]


def test_a_directory_swapped_for_a_symlink_mid_read_cannot_redirect_it(
        roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    inside, outside = roots
    (inside / "sub").mkdir()
    (inside / "sub" / "secret.txt").write_text("inside")
    swaps = swap_mid_walk(monkeypatch, "sub", inside / "sub", outside)
    with pytest.raises(InputForbidden, match="outside STYLEQUEUE_INPUT_ROOTS"):
        file_storage(inside).read(f"file://{inside}/sub/secret.txt")
    assert swaps


def test_a_symlinked_directory_inside_the_roots_is_read_through(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    (inside / "albums" / "2024").mkdir(parents=True)
    (inside / "albums" / "2024" / "b.jpg").write_bytes(PHOTO)
    (inside / "latest").symlink_to("albums/2024")  # relative, as `ln -s` users write them
    (inside / "loop").symlink_to("loop")
    storage = file_storage(inside)
    assert storage.read(f"file://{inside}/latest/b.jpg") == PHOTO
    assert storage.exists(f"file://{inside}/latest/b.jpg")
    with pytest.raises(InputForbidden, match="symbolic links"):
        storage.read(f"file://{inside}/loop")


def test_file_list_and_delete_follow_the_same_roots(roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    storage = file_storage(inside)
    data = inside.parent / "data"
    for name in ("j_1.png", "j_2.png"):
        storage.write(f"file://{data}/outputs/ink/{name}", b"x", "image/png")
    (data / "outputs" / "ink" / ".j_3.png.0123456789ab.sqtmp").write_bytes(b"half")
    assert list(storage.list(f"file://{data}/outputs/ink/")) == [
        f"file://{data}/outputs/ink/j_1.png", f"file://{data}/outputs/ink/j_2.png"]
    assert list(storage.list(f"file://{data}/outputs/ink/j_2")) == [f"file://{data}/outputs/ink/j_2.png"]
    assert list(storage.list(f"file://{data}/outputs/none/")) == []
    storage.delete(f"file://{data}/outputs/ink/j_1.png")
    storage.delete(f"file://{data}/outputs/gone/j_9.png")  # missing: nothing to do
    assert not storage.exists(f"file://{data}/outputs/ink/j_1.png")
    for uri in (f"file://{inside}/a.jpg", f"file://{outside}/secret.txt"):
        with pytest.raises(InputForbidden):
            storage.delete(uri)  # inputs are never a job's to delete
    assert (inside / "a.jpg").exists() and (outside / "secret.txt").exists()
    with pytest.raises(InputForbidden):
        list(storage.list(f"file://{outside}/"))


def test_file_list_walks_recursively(roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    (inside / "b" / "c").mkdir(parents=True)
    (inside / "b" / "c" / "d.jpg").write_bytes(b"d")
    (inside / "b" / "e.jpg").write_bytes(b"e")
    (inside / "escape.jpg").symlink_to(outside / "secret.txt")
    storage = file_storage(inside)
    assert list(storage.list(f"file://{inside}")) == [
        f"file://{inside}/a.jpg", f"file://{inside}/b/e.jpg", f"file://{inside}/b/c/d.jpg"]
    assert list(storage.list(f"file://{inside}/b/")) == [f"file://{inside}/b/e.jpg", f"file://{inside}/b/c/d.jpg"]
    assert all(storage.read(uri) for uri in storage.list(f"file://{inside}"))


# --- staged writes (an attempt stages its output; only promote puts it at the job's URI) ----------


@pytest.fixture(params=["file", "s3"])
def staging(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    """A Storage and an output URI in it, over file:// and over the moto S3 server."""
    if request.param == "file":
        return Storage(Settings(storage_url=f"file://{tmp_path}/data")), f"file://{tmp_path}/data/outputs/ink/j_1.png"
    bucket = request.getfixturevalue("s3_bucket")
    return s3_storage(request.getfixturevalue("s3_endpoint")), f"s3://{bucket}/outputs/ink/j_1.png"


def test_stage_then_promote_puts_the_bytes_at_the_uri_and_twice_is_once(staging: tuple[Storage, str]) -> None:
    storage, uri = staging
    staged = storage.stage(uri, PHOTO, "image/png", tag="a2")
    assert staged.startswith(uri.rpartition("/")[0] + "/") and ".a2." in staged and staged.endswith(".sqtmp")
    assert not storage.exists(uri)
    assert list(storage.list(uri.rpartition("/")[0] + "/")) == []  # staged copies are not results
    storage.promote(staged, uri)
    assert storage.read(uri) == PHOTO and not storage.exists(staged)
    storage.promote(staged, uri)  # a second promote (a retried finish) finds it done and changes nothing
    assert storage.read(uri) == PHOTO
    assert list(storage.list(uri.rpartition("/")[0] + "/")) == [uri]
    if uri.startswith("s3://"):
        bucket, key = uri[len("s3://"):].split("/", 1)
        assert storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentType"] == "image/png"


def test_another_attempts_staged_object_never_replaces_the_promoted_one(staging: tuple[Storage, str]) -> None:
    storage, uri = staging
    stale = storage.stage(uri, b"attempt 2", "image/png", tag="a2")
    winner = storage.stage(uri, b"attempt 3", "image/png", tag="a3")
    storage.promote(winner, uri)
    assert storage.read(uri) == b"attempt 3"
    assert list(storage.list(uri.rpartition("/")[0] + "/")) == [uri]  # the stale copy is there, unlisted
    storage.discard(stale)
    storage.discard(stale)  # already gone: fine
    storage.promote(winner, uri)
    assert storage.read(uri) == b"attempt 3"


def test_staged_copies_lists_every_attempts_copy_of_one_output_only(staging: tuple[Storage, str]) -> None:
    storage, uri = staging
    assert storage.staged_copies(uri) == []  # nothing yet (for files: not even its directory)
    first = storage.stage(uri, b"attempt 1", "image/png", tag="a1")
    second = storage.stage(uri, b"attempt 1 again", "image/png", tag="a1")
    neighbour = storage.stage(uri.replace("j_1.png", "j_1.png2.png"), b"another job", "image/png", tag="a1")
    assert sorted(storage.staged_copies(uri)) == sorted([first, second])
    storage.promote(second, uri)
    assert storage.staged_copies(uri) == [first] and neighbour not in storage.staged_copies(uri)


def test_promote_with_both_objects_gone_fails_permanently(staging: tuple[Storage, str]) -> None:
    storage, uri = staging
    staged = storage.stage(uri, b"x", "image/png", tag="a1")
    storage.discard(staged)
    with pytest.raises(StorageError, match="it is gone") as caught:
        storage.promote(staged, uri)
    assert not caught.value.transient and not storage.exists(uri)


def test_staging_refuses_bad_tags_and_names_that_are_not_staged(staging: tuple[Storage, str]) -> None:
    storage, uri = staging
    storage.write(uri, b"result", "image/png")
    for tag in ("", "a/2", "a.2", "x" * 33):
        with pytest.raises(ValueError):
            storage.stage(uri, b"x", "image/png", tag=tag)
    with pytest.raises(ValueError):
        storage.discard(uri)  # a result is never discarded as if it were a staged copy
    other = storage.stage(uri.replace("j_1", "j_2"), b"x", "image/png", tag="a1")
    with pytest.raises(ValueError):
        storage.promote(other, uri)  # a staged copy of another output
    assert storage.read(uri) == b"result"


def test_promote_compares_directories_not_spellings(tmp_path: Path) -> None:
    """file:// promote takes the staged copy's directory from the output URI when their prefixes match (what
    stage returns); another spelling of the same directory still works, another directory is still refused."""
    storage = Storage(Settings(storage_url=f"file://{tmp_path}/data"))
    directory = f"file://{tmp_path}/data/outputs/ink"
    uri = f"{directory}/j_1.png"
    respelled = storage.stage(uri, b"new", "image/png", tag="a1").replace(directory, f"{directory}/.", 1)
    storage.promote(respelled, uri)
    assert storage.read(uri) == b"new"
    elsewhere = storage.stage(f"{directory}/sub/j_1.png", b"x", "image/png", tag="a2")
    with pytest.raises(ValueError):
        storage.promote(elsewhere.replace("/sub/", "/sub/../sub/"), uri)  # the right name in another directory
    assert storage.read(uri) == b"new"


def test_a_staged_file_is_a_hidden_private_file_beside_its_output(tmp_path: Path) -> None:
    storage = Storage(Settings(storage_url=f"file://{tmp_path}/data"))
    uri = f"file://{tmp_path}/data/outputs/ink/j_1.png"
    staged = Path(storage.stage(uri, b"x", "image/png", tag="a7").removeprefix("file://"))
    assert staged.parent == tmp_path / "data/outputs/ink" and staged.name.startswith(".j_1.png.a7.")
    storage.write(uri, b"retry", "image/png", sweep=True)  # a retry's sweep leaves a live attempt's copy alone
    assert staged.read_bytes() == b"x"
    with pytest.raises(InputForbidden):
        storage.stage(f"file://{tmp_path}/data/j_1.png", b"x", "image/png", tag="a1")


# --- batch scopes (a group's stages and promotes share the walk of their directory) ------------------


def count_walks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Record the components of every walk the file backend makes from now on."""
    walks: list[tuple[str, ...]] = []
    real = files.walk

    def counting(root: walk.Root, parts: list[str], **options: bool) -> int:
        walks.append(tuple(parts))
        return real(root, parts, **options)

    monkeypatch.setattr(files, "walk", counting)
    return walks


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) - {"0", "1", "2"}


def test_a_batch_walks_each_output_directory_once_and_writes_every_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(Settings(storage_url=f"file://{tmp_path}/data"))
    outputs = tmp_path / "data" / "outputs"
    uris = [f"file://{outputs}/ink/j_{i}.png" for i in range(6)] + [f"file://{outputs}/ink/sub/j_9.png"]
    walks = count_walks(monkeypatch)
    with storage.batch():
        staged = [storage.stage(uri, f"photo {i}".encode(), "image/png", tag="a1") for i, uri in enumerate(uris)]
    assert walks == [("ink",), ("ink", "sub")]
    walks.clear()
    with storage.batch():
        for staged_uri, uri in zip(staged, uris, strict=True):
            storage.promote(staged_uri, uri)
    assert walks == [("ink",), ("ink", "sub")]
    assert sorted(os.listdir(outputs / "ink")) == [f"j_{i}.png" for i in range(6)] + ["sub"]
    assert [storage.read_output(uri) for uri in uris] == [f"photo {i}".encode() for i in range(len(uris))]
    walks.clear()
    storage.write(uris[0], b"again", "image/png")  # outside a scope every call walks, as before
    storage.write(uris[1], b"again", "image/png")
    assert walks == [("ink",), ("ink",)]


def test_a_batch_changes_nothing_a_group_sees(staging: tuple[Storage, str]) -> None:
    storage, uri = staging  # s3:// ignores the scope; file:// writes the same objects through fewer walks
    uris = [uri.replace("j_1", f"j_{i}") for i in range(3)]
    with storage.batch():
        staged = [storage.stage(u, u.encode(), "image/png", tag="a1") for u in uris]
        with storage.batch():  # nested: the inner scope ends without closing what the outer one holds
            storage.promote(staged[0], uris[0])
        for staged_uri, u in zip(staged[1:], uris[1:], strict=True):
            storage.promote(staged_uri, u)
        storage.promote(staged[0], uris[0])  # twice is once, in a scope as outside
    assert [storage.read(u) for u in uris] == [u.encode() for u in uris]
    assert list(storage.list(uri.rpartition("/")[0] + "/")) == sorted(uris)


def test_a_symlink_at_the_name_is_refused_inside_a_batch_as_outside(roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    storage = file_storage(inside)
    ink = inside.parent / "data" / "outputs" / "ink"
    with storage.batch():
        storage.stage(f"file://{ink}/j_1.png", b"x", "image/png", tag="a1")  # the scope now holds `ink`
        (ink / "j_2.png").symlink_to(outside / "secret.txt")
        with pytest.raises(InputForbidden, match="symbolic link"):
            storage.stage(f"file://{ink}/j_2.png", b"x", "image/png", tag="a1")
        with pytest.raises(InputForbidden, match="symbolic link"):
            storage.write(f"file://{ink}/j_2.png", b"x", "image/png")
        staged = storage.stage(f"file://{ink}/j_3.png", b"x", "image/png", tag="a1")
        (ink / "j_3.png").symlink_to(outside / "secret.txt")  # placed between stage and promote
        with pytest.raises(InputForbidden, match="symbolic link"):
            storage.promote(staged, f"file://{ink}/j_3.png")
        with pytest.raises(InputForbidden, match="names a directory"):
            storage.write(f"file://{ink}/", b"x", "image/png")
        with pytest.raises(InputForbidden, match="outside the output directory"):
            storage.write(f"file://{outside}/x.png", b"x", "image/png")
        storage.write(f"file://{ink}/j_4.png", b"fine", "image/png")  # the held directory still serves others
    assert (outside / "secret.txt").read_text() == "secret" and sorted(os.listdir(outside)) == ["secret.txt"]
    assert (ink / "j_2.png").is_symlink() and (ink / "j_3.png").is_symlink()
    assert (ink / "j_4.png").read_bytes() == b"fine"


def test_a_directory_swapped_for_a_symlink_during_a_batch_keeps_its_writes_in_the_directory_held(
        roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    storage = file_storage(inside)
    outputs = inside.parent / "data" / "outputs"
    with storage.batch():
        storage.write(f"file://{outputs}/ink/j_1.png", b"one", "image/png")
        (outputs / "ink").rename(outputs / "ink.orig")
        (outputs / "ink").symlink_to(outside, target_is_directory=True)
        storage.write(f"file://{outputs}/ink/j_2.png", b"two", "image/png")  # as one walk holding its fd does
    assert sorted(os.listdir(outputs / "ink.orig")) == ["j_1.png", "j_2.png"]
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    with pytest.raises(InputForbidden, match="symbolic link"):  # a new scope walks again and sees the link
        with storage.batch():
            storage.write(f"file://{outputs}/ink/j_3.png", b"three", "image/png")


def test_directories_removed_between_two_items_of_a_batch_are_walked_and_made_again(tmp_path: Path) -> None:
    storage = Storage(Settings(storage_url=f"file://{tmp_path}/data"))
    outputs = tmp_path / "data" / "outputs"
    first, second = (f"file://{outputs}/ink/sub/{name}" for name in ("j_1.png", "j_2.png"))
    with storage.batch():
        old = storage.stage(first, b"one", "image/png", tag="a1")
        storage.promote(old, first)  # the scope holds ink/sub for create=True and for create=False
        (outputs / "ink" / "sub" / "j_1.png").rename(tmp_path / "j_1.png")  # a cleanup moves the files away
        os.rmdir(outputs / "ink" / "sub")
        os.rmdir(outputs / "ink")
        staged = storage.stage(second, b"two", "image/png", tag="a1")
        storage.promote(staged, second)
        with pytest.raises(StorageError, match="it is gone") as caught:  # walked again, and nothing is there
            storage.promote(old, first)
        assert not caught.value.transient
    assert sorted(os.listdir(outputs / "ink" / "sub")) == ["j_2.png"]
    assert (outputs / "ink" / "sub" / "j_2.png").read_bytes() == b"two"


def test_a_directory_missing_for_one_item_of_a_batch_is_not_missing_for_the_next(tmp_path: Path) -> None:
    storage = Storage(Settings(storage_url=f"file://{tmp_path}/data"))
    uri = f"file://{tmp_path}/data/outputs/new/j_1.png"
    staged = storage.stage(uri, b"x", "image/png", tag="a1")
    shutil.rmtree(tmp_path / "data" / "outputs" / "new")
    with storage.batch():
        with pytest.raises(StorageError, match="it is gone"):  # a walk without create finds no directory
            storage.promote(staged, uri)
        assert not storage.exists(uri) and storage.staged_copies(uri) == []
        staged = storage.stage(uri, b"made", "image/png", tag="a2")  # a walk with create makes it
        storage.promote(staged, uri)  # and a walk without create now finds it
    assert storage.read_output(uri) == b"made"


def test_a_batch_closes_every_directory_it_held_even_when_it_ends_in_an_exception(tmp_path: Path) -> None:
    storage = Storage(Settings(storage_url=f"file://{tmp_path}/data"))
    outputs = tmp_path / "data" / "outputs"
    before = open_fds()
    with storage.batch():
        for folder in range(3):
            for i in range(3):
                uri = f"file://{outputs}/d{folder}/j_{i}.png"
                storage.promote(storage.stage(uri, b"x", "image/png", tag="a1"), uri)
        assert len(open_fds() - before) == 6  # one per directory, for stage and for promote
    assert open_fds() == before
    with pytest.raises(RuntimeError, match="a job failed"):
        with storage.batch():
            storage.write(f"file://{outputs}/d0/j_9.png", b"x", "image/png")
            raise RuntimeError("a job failed")
    assert open_fds() == before
    with storage.batch():  # a scope holds at most MAX_BATCH_DIRS directories
        for folder in range(files.MAX_BATCH_DIRS + 8):
            storage.write(f"file://{outputs}/many/d{folder}/j.png", b"x", "image/png")
        assert len(open_fds() - before) == files.MAX_BATCH_DIRS
    assert open_fds() == before
    assert len(os.listdir(outputs / "many")) == files.MAX_BATCH_DIRS + 8


def test_a_batch_is_its_own_threads_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(Settings(storage_url=f"file://{tmp_path}/data"))
    uris = [f"file://{tmp_path}/data/outputs/ink/j_{i}.png" for i in range(4)]
    walks = count_walks(monkeypatch)
    with storage.batch():
        storage.write(uris[0], b"x", "image/png")
        other = threading.Thread(target=lambda: [storage.write(uri, b"x", "image/png") for uri in uris[1:3]])
        other.start()
        other.join()
        storage.write(uris[3], b"x", "image/png")
    assert len(walks) == 3  # the scope's one walk, and one per write of the thread outside it
    assert all(storage.exists(uri) for uri in uris)


# --- http(s):// ----------------------------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    """/photo.jpg, redirects (/hop/N, /loop, /to?u=...), /huge (no length), /lying (declares 1 GB), /status/N."""

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/photo.jpg":
            self._answer(200, PHOTO)
        elif path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            self._answer(302, location="/photo.jpg" if left == 0 else f"/hop/{left - 1}")
        elif path == "/loop":
            self._answer(301, location="/loop")
        elif path == "/to":
            self._answer(307, location=unquote(query.removeprefix("u=")))
        elif path == "/huge":
            self.send_response(200)
            self.end_headers()  # HTTP/1.0, no Content-Length: the body ends when the connection closes
            for _ in range(64):
                self.wfile.write(b"x" * 1024)
        elif path == "/lying":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(b"x" * 10)
        else:
            self._answer(int(path.rsplit("/", 1)[1]), b"status")

    def _answer(self, status: int, body: bytes = b"", location: str | None = None) -> None:
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    with serve_http(_Files) as url:
        yield url


def http_storage(**overrides: Any) -> Storage:
    return Storage(Settings(storage_url="s3://out", **({"allow_private_networks": True} | overrides)))


def test_http_read_and_redirect_chain(web: str) -> None:
    storage = http_storage()
    assert storage.read(f"{web}/photo.jpg") == PHOTO
    assert storage.read(f"{web}/hop/4") == PHOTO  # 5 redirects: the most that are followed
    with pytest.raises(InputForbidden, match="redirects"):
        storage.read(f"{web}/hop/5")
    with pytest.raises(InputForbidden, match="redirects"):
        storage.read(f"{web}/loop")


@pytest.mark.parametrize(("target", "reason"), [
    ("http://169.254.169.254/latest/meta-data/", "link-local"), ("http://10.0.0.1/x.jpg", "private"),
    ("http://[::1]:1/x.jpg", "loopback"), ("file:///etc/passwd", "scheme 'file' is not allowed"),
])
def test_redirect_to_a_forbidden_address_is_refused(web: str, target: str, reason: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = netguard.refusal
    # Production policy, except that the test server's own address is let through.
    monkeypatch.setattr(netguard, "refusal", lambda address, *, allow_private: (
        None if str(address) == "127.0.0.1" else real(address, allow_private=allow_private)))
    storage = http_storage(allow_private_networks=False)
    assert storage.read(f"{web}/photo.jpg") == PHOTO
    # The reason, not just the type: a server at the refused address could answer 403 itself.
    with pytest.raises(InputForbidden, match=reason):
        storage.read(f"{web}/to?u={target}")


def test_http_body_over_the_cap_is_input_too_large(web: str) -> None:
    storage = http_storage(max_input_bytes=10_000)
    with pytest.raises(InputTooLarge):
        storage.read(f"{web}/huge")
    with pytest.raises(InputTooLarge):
        storage.read(f"{web}/lying")


def test_http_status_codes_map_to_job_errors(web: str) -> None:
    storage = http_storage()
    with pytest.raises(InputNotFound):
        storage.read(f"{web}/status/404")
    with pytest.raises(InputForbidden):
        storage.read(f"{web}/status/403")
    for status in (500, 503, 429):
        with pytest.raises(StorageError) as caught:
            storage.read(f"{web}/status/{status}")
        assert caught.value.transient


def test_http_errors_name_the_url_without_its_query(web: str) -> None:
    storage = http_storage()
    secret = "X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature=0123abcd"
    for path, error in (("status/404", InputNotFound), ("status/503", StorageError), ("status/403", InputForbidden)):
        with pytest.raises(error) as caught:
            storage.read(f"{web}/{path}?{secret}")
        assert caught.value.message.startswith(f"{web}/{path}: ") and "X-Amz" not in caught.value.message
    with pytest.raises(StorageError) as caught:
        storage.read(f"http://127.0.0.1:{free_port()}/a.jpg?{secret}")
    assert "X-Amz" not in caught.value.message
    with pytest.raises(InputTooLarge) as caught:
        http_storage(max_input_bytes=10).read(f"{web}/photo.jpg?{secret}")
    assert "X-Amz" not in caught.value.message


@pytest.mark.parametrize(("uri", "shown"), [
    ("https://user:pw@photos.example.com:8443/a.jpg?X-Amz-Signature=abc#frag", "https://photos.example.com:8443/a.jpg"),
    ("http://h.example?token=1", "http://h.example"),
    ("s3://bucket/odd?name.jpg", "s3://bucket/odd?name.jpg"),  # a key is literal: '?' is part of it
    ("file:///data/outputs/a?.png", "file:///data/outputs/a?.png"),
    ("not a uri?token=1", "not a uri"),
])
def test_redact_uri_drops_userinfo_and_queries(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_a_host_label_over_63_characters_is_refused_at_submit_and_at_read() -> None:
    uri = f"https://{'a' * 64}.example.com/a.jpg"
    with pytest.raises(InputForbidden, match="host name"):
        check_input_uri(uri, Settings(storage_url="s3://out"))
    with pytest.raises(InputForbidden, match="host name"):
        http_storage().read(uri)


def test_http_private_addresses_refused_without_the_setting(web: str) -> None:
    with pytest.raises(InputForbidden, match="loopback"):
        http_storage(allow_private_networks=False).read(f"{web}/photo.jpg")


def test_http_connection_refused_is_transient() -> None:
    with pytest.raises(StorageError) as caught:
        http_storage().read(f"http://127.0.0.1:{free_port()}/a.jpg")
    assert caught.value.transient


def test_other_schemes_are_forbidden() -> None:
    for uri in ["ftp://example.com/a.jpg", "data:image/png;base64,AAAA", "/etc/passwd", "gs://bucket/a.jpg"]:
        with pytest.raises(InputForbidden):
            http_storage().read(uri)


# --- URI checks without I/O ----------------------------------------------------------------------


def test_check_input_uri(tmp_path: Path) -> None:
    settings = Settings(storage_url=f"file://{tmp_path}/data", input_roots=[str(tmp_path / "in")])
    check_input_uri(f"file://{tmp_path}/in/a.jpg", settings)
    check_input_uri("s3://photos/a b.jpg", settings)
    check_input_uri("https://example.com/a.jpg", settings)
    for uri in [f"file://{tmp_path}/in/../etc/passwd", f"file://{tmp_path}/data/a.jpg", "s3://photos",
                "s3:///a.jpg", "ftp://example.com/a.jpg", "no-scheme.jpg", "http://127.0.0.1/a.jpg",
                "http://localhost:8080/a.jpg", "http://[::ffff:10.0.0.1]/a.jpg", "s3://photos/a\n.jpg"]:
        with pytest.raises(InputForbidden):
            check_input_uri(uri, settings)
    check_input_uri("http://127.0.0.1/a.jpg", Settings(storage_url="s3://out", allow_private_networks=True))
    with pytest.raises(InputForbidden, match="STYLEQUEUE_INPUT_ROOTS"):
        check_input_uri(f"file://{tmp_path}/in/a.jpg", Settings(storage_url="s3://out"))


def test_check_output_uri(tmp_path: Path) -> None:
    settings = Settings(storage_url=f"file://{tmp_path}/data")
    check_output_uri(f"file://{tmp_path}/data/outputs/x.png", settings)
    check_output_uri("s3://out/ink/x.png", settings)
    for uri in [f"file://{tmp_path}/elsewhere/x.png", "https://example.com/x.png", "s3://out"]:
        with pytest.raises(InputForbidden):
            check_output_uri(uri, settings)


@pytest.mark.parametrize(("prefix", "parts", "joined"), [
    ("s3://out/results/", ("ink", "j_1.jpg"), "s3://out/results/ink/j_1.jpg"),
    ("s3://out", ("/outputs/", "ink/j_1.jpg"), "s3://out/outputs/ink/j_1.jpg"),
    ("file:///", ("data", "a.png"), "file:///data/a.png"),
    ("file://./stylequeue-data", ("outputs",), "file://./stylequeue-data/outputs"),
    ("s3://out/x/", (), "s3://out/x"),
])
def test_join_uri(prefix: str, parts: tuple[str, ...], joined: str) -> None:
    assert join_uri(prefix, *parts) == joined
