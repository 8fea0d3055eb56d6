"""Static exports: dynamic shapes, cached by weights hash, published atomically (models/export.py)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from stylequeue.config.styles import StyleSpec, parse_registry, weights_sha256
from stylequeue.errors import ConfigError
from stylequeue.models import export
from stylequeue.models.export import export_dir, export_model, paddle_model_files
from stylequeue.models.weights import load_generator


@pytest.fixture
def spec(tiny_registry: Path) -> StyleSpec:
    return parse_registry(tiny_registry)["tiny"]


def _reference(spec: StyleSpec, x: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return load_generator(spec)(paddle.to_tensor(x)).numpy()


def test_paddle_export_is_cached_by_weights_hash(spec: StyleSpec, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    first = export_model(spec, fmt="paddle", cache_dir=tmp_path)
    assert first == tmp_path / "exports" / f"tiny-{weights_sha256(spec.weights)[:16]}-paddle"
    program, params = paddle_model_files(first)
    assert program.name == "model.json" and params.name == "model.pdiparams"

    def no_second_export(*_: object) -> None:
        raise AssertionError("a cached export was rebuilt")

    monkeypatch.setattr(export, "_export_paddle", no_second_export)
    assert export_model(spec, fmt="paddle", cache_dir=tmp_path) == first
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [first.name]  # no staging dirs left


def test_onnx_export_runs_at_any_batch_and_size(spec: StyleSpec, tmp_path: Path) -> None:
    import onnxruntime as ort

    directory = export_model(spec, fmt="onnx", cache_dir=tmp_path)
    assert directory.name.endswith("-onnx") and (tmp_path / "exports").is_dir()
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for shape in [(1, 3, 64, 64), (3, 3, 32, 48)]:
        x = np.random.default_rng(0).uniform(-1, 1, shape).astype("float32")
        out = session.run(None, {name: x})[0]
        assert out.shape == shape
        assert np.abs(out - _reference(spec, x)).max() < 1e-4


def test_exported_model_dir_can_be_registered_as_weights(spec: StyleSpec, tmp_path: Path) -> None:
    # A model exported elsewhere, with an input name of its own choosing.
    model = load_generator(spec)
    target = tmp_path / "exported"
    paddle.jit.save(model, str(target / "inference"),
                    input_spec=[paddle.static.InputSpec([-1, 3, -1, -1], "float32", "pixels")])
    registered = dataclasses.replace(spec, weights=str(target))
    assert export_model(registered, fmt="paddle", cache_dir=tmp_path / "cache") == target
    onnx_dir = export_model(registered, fmt="onnx", cache_dir=tmp_path / "cache")
    assert (onnx_dir / "model.onnx").is_file()


def test_losing_a_publish_race_keeps_the_winners_export(spec: StyleSpec, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    final = export_dir(spec, "paddle", tmp_path)
    real_export = export._export_paddle

    def export_while_another_process_publishes(spec_: StyleSpec, staging: Path) -> None:
        real_export(spec_, staging)
        shutil.copytree(staging, final)  # the other process renamed its copy into place first

    monkeypatch.setattr(export, "_export_paddle", export_while_another_process_publishes)
    assert export_model(spec, fmt="paddle", cache_dir=tmp_path) == final
    assert paddle_model_files(final)
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_bad_requests(spec: StyleSpec, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(spec, fmt="tflite", cache_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="s3 weights: download the file"):
        export_model(dataclasses.replace(spec, weights="s3://b/k.pdparams"), fmt="paddle", cache_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no exported Paddle model"):
        export_model(dataclasses.replace(spec, weights=str(empty)), fmt="paddle", cache_dir=tmp_path)
