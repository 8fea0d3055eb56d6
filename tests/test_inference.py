"""How much a worker batches: measured per style at load (worker/inference.py)."""

from __future__ import annotations

import time

import numpy as np

from stylequeue.config.styles import StyleSpec
from stylequeue.models.registry import LoadedStyle
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
