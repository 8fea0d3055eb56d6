"""Every runtime matches fp32 dygraph; `auto` picks the fastest that passes the 40 dB gate (models/runtime.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from pathlib import Path

import numpy as np
import paddle
import pytest

from stylequeue.config.styles import StyleSpec, parse_registry
from stylequeue.errors import ConfigError
from stylequeue.models import runtime as runtime_module
from stylequeue.models import runtime_backends as backends
from stylequeue.models.runtime import (
    PSNR_GATE_DB,
    Runtime,
    build_runtime,
    cached_choices,
    probe_input,
    psnr_db,
    select_runtime,
)
from stylequeue.models.weights import load_generator

FP32 = [("dygraph", "fp32"), ("paddle-inference", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")]
BF16 = [("paddle-inference", "bf16"), ("openvino", "bf16")]


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> StyleSpec:
    from tests.conftest import write_tiny_style

    return parse_registry(write_tiny_style(tmp_path_factory.mktemp("rt"), ngf=4, n_blocks=2, seed=3))["tiny"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _batch(shape: tuple[int, ...] = (2, 3, 64, 48)) -> np.ndarray:
    return np.concatenate([probe_input(max(shape[2:]), seed=i)[:, :, : shape[2], : shape[3]] for i in range(shape[0])])


def _reference(spec: StyleSpec, x: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return load_generator(spec)(paddle.to_tensor(x)).numpy()


def _installed(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [pair for pair in pairs if backends.runtime_installed(pair[0])]


@pytest.mark.parametrize(("name", "precision"), _installed(FP32))
def test_fp32_runtimes_match_dygraph(spec: StyleSpec, cache_dir: Path, name: str, precision: str) -> None:
    runtime = build_runtime(name, precision, spec, device="cpu", cache_dir=cache_dir)
    assert isinstance(runtime, Runtime) and (runtime.name, runtime.precision) == (name, precision)
    x = _batch()
    out = runtime.run(x)
    assert out.shape == x.shape and out.dtype == np.float32
    assert psnr_db(_reference(spec, x), out) > 90.0


@pytest.mark.parametrize(("name", "precision"), _installed(BF16))
def test_bf16_runtimes_pass_the_gate(spec: StyleSpec, cache_dir: Path, name: str, precision: str) -> None:
    if not backends.cpu_has_bf16():
        pytest.skip("this CPU has neither avx512_bf16 nor amx_bf16")
    runtime = build_runtime(name, precision, spec, device="cpu", cache_dir=cache_dir)
    assert runtime.precision == "bf16"
    x = _batch((1, 3, 64, 64))
    score = psnr_db(_reference(spec, x), runtime.run(x))
    assert PSNR_GATE_DB <= score < 90.0  # close to fp32, but really computed in bf16


@pytest.mark.parametrize(("name", "precision"), _installed(FP32[1:]))
def test_static_runtimes_take_any_batch_and_size_from_any_thread(spec: StyleSpec, cache_dir: Path,
                                                                 name: str, precision: str) -> None:
    runtime = build_runtime(name, precision, spec, device="cpu", cache_dir=cache_dir)
    results: dict[tuple[int, ...], np.ndarray] = {}

    def work(shape: tuple[int, ...]) -> None:
        results[shape] = runtime.run(_batch(shape))

    shapes = [(1, 3, 32, 32), (3, 3, 16, 40), (2, 3, 64, 48)]
    threads = [threading.Thread(target=work, args=(shape,)) for shape in shapes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for shape in shapes:
        assert results[shape].shape == shape
    batch = _batch((2, 3, 64, 48))
    alone = np.concatenate([runtime.run(batch[i : i + 1]) for i in range(2)])
    assert np.abs(results[(2, 3, 64, 48)] - alone).max() < 1e-4  # instance norm is per image


def test_names_are_read_from_the_model(spec: StyleSpec, tmp_path: Path) -> None:
    target = tmp_path / "exported"
    paddle.jit.save(load_generator(spec), str(target / "gen"),
                    input_spec=[paddle.static.InputSpec([-1, 3, -1, -1], "float32", "pixels")])
    registered = dataclasses.replace(spec, weights=str(target))
    x = _batch((1, 3, 32, 32))
    expected = _reference(spec, x)
    for name, precision in _installed(FP32[1:]):
        out = build_runtime(name, precision, registered, device="cpu", cache_dir=tmp_path).run(x)
        assert psnr_db(expected, out) > 90.0, name
    with pytest.raises(ConfigError, match="dygraph needs a weights file"):
        build_runtime("dygraph", "fp32", registered, device="cpu", cache_dir=tmp_path)


def test_null_runtime_returns_its_input(spec: StyleSpec, cache_dir: Path) -> None:
    selection = select_runtime(spec, runtime="null", cache_dir=cache_dir)
    x = _batch((2, 3, 8, 8))
    assert np.array_equal(selection.runtime.run(x), x)
    assert selection.info["runtime"] == "null" and selection.info["candidates"] == []


def test_auto_picks_the_fastest_runtime_that_passes_the_gate(spec: StyleSpec, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="stylequeue.models"):
        selection = select_runtime(spec, cache_dir=tmp_path)
    info = selection.info
    json.dumps(info, allow_nan=False)  # JSON-able as it is
    assert info["cached"] is False and info["device"] == "cpu" and info["chosen_at"].endswith("Z")
    rows = info["candidates"]
    assert rows[0]["runtime"] == "dygraph" and rows[0]["reference"] is True
    measured = [(r["runtime"], r["precision"]) for r in rows[1:]]
    assert ("onnxruntime", "fp32") in measured and ("paddle-inference", "fp32") in measured
    assert (("openvino", "bf16") in measured) == backends.cpu_has_bf16()
    passing = [r for r in rows[1:] if r["ok"]]
    assert all(r["psnr_db"] >= PSNR_GATE_DB for r in passing)
    fastest = min(passing, key=lambda r: r["ms"])
    assert (info["runtime"], info["precision"]) == (fastest["runtime"], fastest["precision"])
    assert (selection.runtime.name, selection.runtime.precision) == (info["runtime"], info["precision"])
    x = _batch((1, 3, 64, 64))
    assert psnr_db(_reference(spec, x), selection.runtime.run(x)) >= PSNR_GATE_DB
    assert f"runtime choice for style tiny on cpu: {info['runtime']}" in caplog.text


def test_a_restarted_worker_reuses_the_decision(spec: StyleSpec, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    first = select_runtime(spec, cache_dir=tmp_path)

    def no_timing(*_: object, **__: object) -> None:
        raise AssertionError("timed again despite a cached decision")

    monkeypatch.setattr(runtime_module, "_measure", no_timing)
    second = select_runtime(spec, cache_dir=tmp_path)
    assert second.info["cached"] is True
    assert second.info["candidates"] == first.info["candidates"]
    assert (second.runtime.name, second.runtime.precision) == (first.runtime.name, first.runtime.precision)
    # A different request is a different decision.
    with pytest.raises(AssertionError, match="timed again"):
        select_runtime(spec, precision="fp32", cache_dir=tmp_path)
    # What `styles --json` can show without loading anything.
    recorded = cached_choices("tiny", tmp_path)
    assert [(r["runtime"], r["precision"]) for r in recorded] == [(first.runtime.name, first.runtime.precision)]
    assert recorded[0]["candidates"] == first.info["candidates"] and cached_choices("ti", tmp_path) == []


def test_a_candidate_that_fails_is_reported_and_skipped(spec: StyleSpec, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = runtime_module.build_runtime

    def broken_openvino(name: str, precision: str, *args: object, **kwargs: object) -> Runtime:
        if name == "openvino":
            raise RuntimeError("no plugin today")
        return real_build(name, precision, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime_module, "build_runtime", broken_openvino)
    selection = select_runtime(spec, cache_dir=tmp_path)
    failed = [r for r in selection.info["candidates"] if r["runtime"] == "openvino"]
    assert failed and all(not r["ok"] and "no plugin today" in r["error"] for r in failed)
    assert selection.runtime.name != "openvino"


def test_below_the_gate_never_wins(spec: StyleSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = runtime_module.build_runtime

    class Noisy:
        name, precision = "onnxruntime", "fp32"

        def __init__(self, inner: Runtime) -> None:
            self.inner = inner

        def run(self, batch: np.ndarray) -> np.ndarray:
            out = self.inner.run(batch)
            return out + np.random.default_rng(0).normal(0, 0.1, out.shape).astype(np.float32)

    def build(name: str, precision: str, *args: object, **kwargs: object) -> Runtime:
        inner = real_build(name, precision, *args, **kwargs)  # type: ignore[arg-type]
        return Noisy(inner) if name == "onnxruntime" else inner

    monkeypatch.setattr(runtime_module, "build_runtime", build)
    selection = select_runtime(spec, runtime="auto", precision="fp32", cache_dir=tmp_path)
    row = next(r for r in selection.info["candidates"] if r["runtime"] == "onnxruntime")
    assert not row["ok"] and row["psnr_db"] < PSNR_GATE_DB
    assert selection.runtime.name != "onnxruntime"


def test_explicit_runtime_and_precision(spec: StyleSpec, cache_dir: Path) -> None:
    selection = select_runtime(spec, runtime="paddle-inference", precision="fp32", cache_dir=cache_dir)
    assert (selection.runtime.name, selection.runtime.precision) == ("paddle-inference", "fp32")
    assert select_runtime(spec, runtime="onnxruntime", cache_dir=cache_dir).runtime.name == "onnxruntime"
    assert select_runtime(spec, runtime="dygraph", cache_dir=cache_dir).runtime.name == "dygraph"


def test_requests_that_cannot_be_met(spec: StyleSpec, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="fp16 is for GPUs"):
        select_runtime(spec, precision="fp16", cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="unknown runtime"):
        select_runtime(spec, runtime="tensorflow", cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="s3 weights"):
        select_runtime(dataclasses.replace(spec, weights="s3://b/w.pdparams"), cache_dir=cache_dir)
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="avx512_bf16 or amx_bf16"):
        select_runtime(spec, precision="bf16", cache_dir=cache_dir)
    monkeypatch.setattr(backends, "runtime_installed", lambda name: name != "onnxruntime")
    with pytest.raises(ConfigError, match=r"pip install 'stylequeue\[onnx\]'"):
        select_runtime(spec, runtime="onnxruntime", cache_dir=cache_dir)


def test_cpu_bf16_detection_reads_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "cpu_info", lambda: {"model": "x", "flags": ["avx2", "avx512f"]})
    assert not backends.cpu_has_bf16()
    monkeypatch.setattr(backends, "cpu_info", lambda: {"model": "x", "flags": ["avx512f", "amx_bf16"]})
    assert backends.cpu_has_bf16()


def test_psnr() -> None:
    a = np.zeros((1, 3, 4, 4), np.float32)
    assert math.isinf(psnr_db(a, a))
    assert psnr_db(a, a + 0.02) == pytest.approx(20 * math.log10(1 / 0.01))  # 0.02 in [-1,1] is 0.01 in [0,1]
