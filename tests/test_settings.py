"""Settings resolve file:// storage and input roots once, at load, so every process means the same directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from stylequeue.config.settings import Settings, file_uri_absolute, load_settings


def test_relative_storage_and_roots_resolve_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings.model_fields["storage_url"].default == "file://./stylequeue-data"  # as the docs show it
    settings = load_settings()
    assert settings.storage_url == f"file://{tmp_path}/stylequeue-data"
    assert settings.input_roots == [tmp_path / "stylequeue-data"]
    monkeypatch.setenv("STYLEQUEUE_STORAGE_URL", "file://./out/")
    monkeypatch.setenv("STYLEQUEUE_INPUT_ROOTS", "photos,~/pics")
    settings = load_settings()
    assert settings.storage_url == f"file://{tmp_path}/out"
    assert settings.input_roots == [tmp_path / "photos", Path("~/pics").expanduser()]
    monkeypatch.setenv("STYLEQUEUE_STORAGE_URL", "s3://bucket/prefix/")
    assert load_settings().storage_url == "s3://bucket/prefix"


def test_file_uri_absolute_keeps_a_prefix_slash_and_other_schemes() -> None:
    assert file_uri_absolute("file:///a/b/") == "file:///a/b/"
    assert file_uri_absolute("file://~/x.jpg") == f"file://{Path('~').expanduser()}/x.jpg"
    assert file_uri_absolute("s3://b/k") == "s3://b/k"
    assert file_uri_absolute("https://h/p") == "https://h/p"
