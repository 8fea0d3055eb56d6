"""Styles load lazily, once per process, LRU-bounded, shared by threads (models/registry.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylequeue.config.styles import StyleCatalog, model_label
from stylequeue.errors import ConfigError, UnknownStyle, WeightsError
from stylequeue.models import registry as registry_module
from stylequeue.models.registry import LoadedStyle, ModelRegistry
from stylequeue.models.runtime import probe_input
from stylequeue.pipeline.images import from_array, to_array, working_size
from tests.conftest import write_tiny_style


@pytest.fixture
def three_styles(tmp_path: Path) -> StyleCatalog:
    for seed, name in enumerate(["a", "b", "c"]):
        write_tiny_style(tmp_path / name, name=name, seed=seed)
    text = "\n".join((tmp_path / n / "styles.toml").read_text().replace(f'"{n}.pdparams"', f'"{n}/{n}.pdparams"')
                     for n in ["a", "b", "c"])
    (tmp_path / "styles.toml").write_text(text)
    return StyleCatalog(tmp_path / "styles.toml")


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every real load; each is slowed a little so concurrent callers really overlap."""
    calls: list[str] = []
    real = registry_module.select_runtime

    def counting(spec, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(spec.name)
        time.sleep(0.2)
        return real(spec, **kwargs)

    monkeypatch.setattr(registry_module, "select_runtime", counting)
    return calls


def test_a_loaded_style_restyles_an_image(tiny_registry: Path, tmp_path: Path) -> None:
    catalog = StyleCatalog(tiny_registry)
    registry = ModelRegistry(catalog, cache_dir=tmp_path)
    loaded = registry.get("tiny")
    assert isinstance(loaded, LoadedStyle)
    assert loaded.model == model_label(catalog.get("tiny")) and loaded.model.startswith("tiny@")
    assert loaded.load_ms > 0 and loaded.info["runtime"] == loaded.runtime.name
    image = Image.new("RGB", (90, 60), (200, 120, 40))
    size = working_size(*image.size, loaded.spec.max_side)
    out = from_array(loaded.runtime.run(to_array(image, size)[None])[0])
    assert out.size == size == (64, 44)
    # A restarted worker (a new registry on the same cache) reuses the timing decision.
    again = ModelRegistry(StyleCatalog(tiny_registry), cache_dir=tmp_path).get("tiny")
    assert again.info["cached"] is True and again.runtime.name == loaded.runtime.name


def test_eight_threads_share_one_load(three_styles: StyleCatalog, tmp_path: Path, load_calls: list[str]) -> None:
    registry = ModelRegistry(three_styles, runtime="dygraph", cache_dir=tmp_path)
    results: list[LoadedStyle] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(registry.get("a"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert load_calls == ["a"]
    assert len(results) == 8 and all(result is results[0] for result in results)
    assert registry.get("a") is results[0] and load_calls == ["a"]


def test_least_recently_used_style_is_dropped(three_styles: StyleCatalog, tmp_path: Path,
                                              load_calls: list[str]) -> None:
    registry = ModelRegistry(three_styles, runtime="dygraph", cache_dir=tmp_path, max_loaded=2)
    registry.warm_up(["a", "b"])
    registry.get("a")  # b is now the least recently used
    registry.get("c")
    assert registry.loaded_names() == ["a", "c"]
    registry.get("b")
    assert load_calls == ["a", "b", "c", "b"]
    assert registry.loaded_names() == ["c", "b"]


def test_unknown_style(three_styles: StyleCatalog, tmp_path: Path) -> None:
    registry = ModelRegistry(three_styles, cache_dir=tmp_path)
    with pytest.raises(UnknownStyle, match="registered styles: a, b, c"):
        registry.get("watercolour")


def test_a_failed_load_reaches_every_waiter_and_is_retried(tiny_registry: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[int] = []

    def failing(spec, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(1)
        time.sleep(0.2)
        raise WeightsError("broken weights")

    monkeypatch.setattr(registry_module, "select_runtime", failing)
    registry = ModelRegistry(StyleCatalog(tiny_registry), cache_dir=tmp_path)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            registry.get("tiny")
        except WeightsError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 4 and len(attempts) == 1
    with pytest.raises(WeightsError):
        registry.get("tiny")
    assert len(attempts) == 2 and registry.loaded_names() == []


def test_s3_and_missing_weights_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "styles.toml").write_text(
        '[styles.remote]\nweights = "s3://models/ink.pdparams"\n[styles.gone]\nweights = "gone.pdparams"\n'
    )
    registry = ModelRegistry(StyleCatalog(tmp_path / "styles.toml"), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="s3 weights: download the file and register its path"):
        registry.get("remote")
    with pytest.raises(WeightsError, match="gone.pdparams not found"):
        registry.get("gone")


def test_an_edited_registry_entry_is_loaded_again(tmp_path: Path, load_calls: list[str]) -> None:
    path = write_tiny_style(tmp_path, max_side=64)
    registry = ModelRegistry(StyleCatalog(path, recheck_s=0), runtime="dygraph", cache_dir=tmp_path)
    first = registry.get("tiny")
    path.write_text(path.read_text().replace("max_side = 64", "max_side = 32"))
    os.utime(path, (time.time() + 5, time.time() + 5))  # a visible mtime change on coarse filesystems
    second = registry.get("tiny")
    assert second.spec.max_side == 32 and second is not first and load_calls == ["tiny", "tiny"]
    assert np.isfinite(second.runtime.run(np.zeros((1, 3, 16, 16), np.float32))).all()


def test_model_modules_import_no_engine_until_used() -> None:
    """The CLI and producers may import these modules: no Paddle, OpenVINO, ONNX Runtime or torch yet."""
    import subprocess
    import sys

    code = ("import sys, stylequeue.models.registry, stylequeue.models.runtime, stylequeue.models.export, "
            "stylequeue.models.weights; "
            "print(','.join(m for m in ('paddle', 'openvino', 'onnxruntime', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_different_styles_load_side_by_side(three_styles: StyleCatalog, tmp_path: Path) -> None:
    registry = ModelRegistry(three_styles, cache_dir=tmp_path)  # auto: exports and timing for each
    loaded: dict[str, LoadedStyle] = {}

    def load(name: str) -> None:
        loaded[name] = registry.get(name)

    threads = [threading.Thread(target=load, args=(name,)) for name in ["a", "b"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(loaded) == ["a", "b"] and loaded["a"].model != loaded["b"].model
    x = probe_input(16)
    assert not np.allclose(loaded["a"].runtime.run(x), loaded["b"].runtime.run(x))  # each has its own weights


def test_registries_combine_and_a_new_style_is_found_at_once(tmp_path: Path, tiny_registry: Path) -> None:
    """Issue 17.4: the bundled styles stay when STYLEQUEUE_STYLES names a file, and a style added to that file
    a moment ago (what `models import` tells the user to do) is found by a running worker's catalog."""
    import shutil

    registry = tmp_path / "styles.toml"
    shutil.copy(tiny_registry, registry)
    shutil.copy(tiny_registry.parent / "tiny.pdparams", tmp_path / "tiny.pdparams")
    catalog = StyleCatalog(registry, recheck_s=3600)  # no periodic look within this test
    assert {"tiny", "ink-demo"} <= set(catalog.all()) and set(catalog.own()) == {"tiny"}
    registry.write_text(registry.read_text() + registry.read_text().replace("[styles.tiny]", "[styles.tiny2]"))
    assert catalog.get("tiny2").name == "tiny2"  # looked again at once instead of failing
    with pytest.raises(UnknownStyle, match="registered styles: .*tiny2"):
        catalog.get("nope")
