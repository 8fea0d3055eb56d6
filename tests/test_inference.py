"""How much a worker batches: measured per style at load (worker/inference.py)."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest

from stylequeue.config.styles import StyleSpec
from stylequeue.models.registry import LoadedStyle
from stylequeue.worker import inference
from stylequeue.worker.inference import useful_batch


class TimedRuntime:
    """float [N,3,H,W] in and out; sleeps `per_call + per_image * N` seconds, times `batch_penalty` for N > 1."""

    name = "fake"

    def __init__(self, per_call: float, per_image: float, batch_penalty: float = 1.0) -> None:
        self.per_call, self.per_image, self.batch_penalty = per_call, per_image, batch_penalty
        self.sizes: list[int] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        penalty = self.batch_penalty if len(batch) > 1 else 1.0
        time.sleep(self.per_call + self.per_image * len(batch) * penalty)
        return batch


def loaded(runtime: object, max_side: int = 64) -> LoadedStyle:
    spec = StyleSpec(name="s", weights="w.pdparams", max_side=max_side)
    return LoadedStyle(spec=spec, model="s@test", runtime=runtime, info={})  # type: ignore[arg-type]


def test_a_device_where_batches_pay_keeps_max_batch() -> None:
    style = loaded(TimedRuntime(per_call=0.01, per_image=0.0005))  # a GPU: launch cost dominates
    assert useful_batch(style, 8) == 8 and style.info["batch"] == 8
    assert sorted(set(style.runtime.sizes)) == [1, 8]


def test_a_device_where_batches_do_not_pay_runs_single_images() -> None:
    # A CPU already using every core, where a batch runs slower per image (as OpenVINO bf16 does here).
    style = loaded(TimedRuntime(per_call=0.0, per_image=0.004, batch_penalty=1.4))
    assert useful_batch(style, 8) == 1 and style.info["batch"] == 1


def test_max_batch_one_measures_nothing() -> None:
    style = loaded(TimedRuntime(per_call=0.0, per_image=0.0))
    assert useful_batch(style, 1) == 1 and style.runtime.sizes == []


def test_the_probe_is_square_at_the_working_size_capped_at_256() -> None:
    seen = []

    class Recording(TimedRuntime):
        def run(self, batch: np.ndarray) -> np.ndarray:
            seen.append(batch.shape)
            return super().run(batch)

    useful_batch(loaded(Recording(0.0, 0.0), max_side=1000), 4)
    assert {shape[1:] for shape in seen} == {(3, 256, 256)}


class GpuLike:
    """A card on a fake clock: a fixed cost per call, a tiny cost per image, out of memory above `fits`."""

    name = "fake"

    def __init__(self, fits: int, clock: list[float]) -> None:
        self.fits, self.clock = fits, clock
        self.warmed: list[tuple[int, int, int]] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) > self.fits:
            raise MemoryError("CUDA out of memory")
        self.clock[0] += 0.004 + 0.0001 * len(batch)
        return batch

    def warm(self, batch: int, height: int, width: int) -> float:
        self.warmed.append((batch, height, width))
        return 1.25


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [0.0]
    monkeypatch.setattr(inference, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_a_gpu_measures_its_batch_size_up_to_what_fits(clock: list[float]) -> None:
    runtime = GpuLike(fits=32, clock=clock)
    style = loaded(runtime, max_side=96)
    style.info["device"] = "gpu:0"
    # ms per image: 4.1 alone, 0.6 at 8, 0.35 at 16, 0.225 at 32; 64 does not fit.
    assert useful_batch(style, 8, search=True) == 32 and style.info["batch"] == 32
    assert style.info["batch_rates"] == {"1": 243.9, "8": 1666.7, "16": 2857.1, "32": 4444.4}
    assert runtime.warmed == [(32, 96, 96)] and style.info["compile_s"] == 1.2  # prepared for what it will serve


def test_the_smallest_batch_within_five_percent_of_the_best_wins(clock: list[float]) -> None:
    class Flat(GpuLike):  # 1 ms per image at any batch, 3% less from 64 on
        def run(self, batch: np.ndarray) -> np.ndarray:
            self.clock[0] += 0.001 * len(batch) * (1.0 if len(batch) < 64 else 0.97)
            return batch

    runtime = Flat(fits=1024, clock=clock)
    style = loaded(runtime)
    style.info["device"] = "gpu:0"
    assert useful_batch(style, 8, search=True) == 1  # 64 and 128 are 3% faster: not worth their latency


def test_an_explicit_max_batch_wins_on_a_gpu(clock: list[float]) -> None:
    runtime = GpuLike(fits=1024, clock=clock)
    style = loaded(runtime)
    style.info["device"] = "gpu:0"
    assert useful_batch(style, 16, search=False) == 16
    assert "batch_rates" not in style.info and runtime.warmed == [(16, 64, 64)]


def test_a_cpu_never_searches_nor_warms(clock: list[float]) -> None:
    runtime = GpuLike(fits=1024, clock=clock)
    style = loaded(runtime)
    useful_batch(style, 8, search=True)
    assert "batch_rates" not in style.info and runtime.warmed == []
