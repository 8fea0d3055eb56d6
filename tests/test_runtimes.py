"""One table of runtimes that settings, selection, install checks and the worker's start all read
(models/runtimes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stylequeue.config.settings import load_settings
from stylequeue.config.styles import StyleSpec, parse_registry
from stylequeue.errors import ConfigError
from stylequeue.models import runtime_backends as backends
from stylequeue.models import runtimes
from stylequeue.models.export import export_dir
from stylequeue.models.runtime import _candidates


@pytest.fixture
def spec(tiny_registry: Path) -> StyleSpec:
    return parse_registry(tiny_registry)["tiny"]


def test_settings_accept_exactly_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in runtimes.RUNTIME_CHOICES:
        monkeypatch.setenv("STYLEQUEUE_RUNTIME", name)
        assert load_settings().runtime == name
    monkeypatch.setenv("STYLEQUEUE_RUNTIME", "tensorflow")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == ("invalid STYLEQUEUE_RUNTIME='tensorflow': must be one of auto, openvino, "
                               "paddle-inference, onnxruntime, torch, dygraph, null")


def test_hints_and_candidates_come_from_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backends.INSTALL_HINTS["torch"] == runtimes.runtime_kind("torch").install_hint
    assert "stylequeue[torch]" in backends.INSTALL_HINTS["torch"]
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: True)
    assert _candidates("auto", "auto", "gpu:0") == [("paddle-inference", "fp16"), ("paddle-inference", "fp32"),
                                                    ("onnxruntime", "fp32"), ("torch", "fp16"), ("torch", "bf16"),
                                                    ("torch", "fp32")]
    assert _candidates("auto", "bf16", "cpu") == [("openvino", "bf16"), ("paddle-inference", "bf16"),
                                                  ("torch", "bf16")]
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: False)
    assert all(p == "fp32" for _, p in _candidates("auto", "auto", "cpu"))
    with pytest.raises(ConfigError, match="unknown runtime 'tf'; one of auto, openvino"):
        runtimes.runtime_kind("tf")


def test_what_each_runtime_needs_to_serve(spec: StyleSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    present = {"onnxruntime", "openvino"}  # a machine with no Paddle and no PyTorch
    monkeypatch.setattr(runtimes, "module_found", lambda module: module in present)
    assert "stylequeue[torch]" in (runtimes.missing_for("torch", [spec], tmp_path) or "")
    problem = runtimes.missing_for("onnxruntime", [spec], tmp_path)
    assert problem is not None and "none is cached for style 'tiny'" in problem
    with pytest.raises(ConfigError) as info:
        runtimes.serving_runtimes("auto", "cpu", [spec], tmp_path)
    message = str(info.value)
    assert "stylequeue[torch]" in message and "stylequeue[cpu]" in message and "paddlepaddle-gpu" in message
    assert "\n" not in message
    export_dir(spec, "onnx", tmp_path).mkdir(parents=True)  # an export made earlier, on a machine with Paddle
    assert runtimes.serving_runtimes("auto", "cpu", [spec], tmp_path) == ["openvino", "onnxruntime"]
    assert runtimes.serving_runtimes("auto", "gpu:0", [spec], tmp_path) == ["onnxruntime"]  # openvino: CPU only
    with pytest.raises(ConfigError, match="STYLEQUEUE_RUNTIME=dygraph cannot run here: PaddlePaddle"):
        runtimes.serving_runtimes("dygraph", "cpu", [spec], tmp_path)
    present.add("torch")
    assert runtimes.serving_runtimes("torch", "gpu:0", [spec], tmp_path) == ["torch"]
    assert runtimes.serving_runtimes("null", "cpu", [spec], tmp_path) == ["null"]
