"""Where a job is batched and run on the model: one DynamicBatcher per loaded style.

Models load once per worker process (lazily for styles not preloaded, LRU-bounded by the model
registry); each has one inference thread, so the device holds one copy of each model.

How large a batch is worth forming is measured per style at load (`useful_batch`): on a CPU, batching
or not; on a GPU, the batch size itself, unless the operator set one. A GPU runtime that can run
asynchronously (`start`) gets the next batch while one runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from stylequeue.config.styles import StyleSpec
from stylequeue.errors import JobTimeout
from stylequeue.jobs.record import Priority
from stylequeue.pipeline.images import from_model_output, to_model_input
from stylequeue.worker.batching import DynamicBatcher, GroupFuture

if TYPE_CHECKING:
    from stylequeue.models.registry import LoadedStyle, ModelRegistry

log = logging.getLogger("stylequeue.worker")


class InferencePool:
    """Styles -> (loaded model, batcher).

    Args:
        registry: the model registry (loads, caches and evicts runtimes).
        on_loaded: called with (style, LoadedStyle) after a style loads (publish its runtime choice).
        on_batch: called with (style, size, seconds) after each batch (metrics).
        search_batch: on a GPU, measure the batch size at load instead of using `max_batch`.
    """

    def __init__(self, registry: ModelRegistry, *, max_batch: int, max_wait_ms: float, timeout_s: float,
                 on_loaded: Callable[[str, LoadedStyle], None] | None = None,
                 on_batch: Callable[[str, int, float], None] | None = None, search_batch: bool = False) -> None:
        self.registry = registry
        self.max_batch = max_batch
        self.search_batch = search_batch
        self.max_wait_ms = max_wait_ms
        self.timeout_s = timeout_s
        self.on_loaded = on_loaded
        self.on_batch = on_batch
        self._batchers: dict[str, tuple[LoadedStyle, DynamicBatcher]] = {}
        self._lock = threading.Lock()
        self._measuring = threading.Lock()

    def _entry(self, style: str) -> tuple[LoadedStyle, DynamicBatcher]:
        loaded = self.registry.get(style)  # raises UnknownStyle; loads at most once per style
        with self._lock:
            entry = self._batchers.get(style)
            if entry is not None and entry[0] is loaded:
                return entry
        with self._measuring:  # one runtime call at a time; a second thread waits, then finds the entry
            with self._lock:
                entry = self._batchers.get(style)
                if entry is not None and entry[0] is loaded:
                    return entry
            max_batch = useful_batch(loaded, self.max_batch, search=self.search_batch)
            with self._lock:
                stale = entry[1] if entry else None
                on_batch = self.on_batch
                batcher = DynamicBatcher(
                    _on_pixels(loaded.runtime), max_batch=max_batch, max_wait_ms=self.max_wait_ms, name=style,
                    on_batch=(lambda size, seconds: on_batch(style, size, seconds)) if on_batch else None,
                    start_batch=_starter(loaded),
                )
                self._batchers[style] = (loaded, batcher)
        if stale is not None:
            threading.Thread(target=stale.close, daemon=True).start()  # reloaded after eviction
        if entry is None and self.on_loaded:
            self.on_loaded(style, loaded)
        return loaded, batcher

    def warm(self, styles: Iterable[str]) -> dict[str, float]:
        """Load (and, through auto-selection, warm up) styles before the worker consumes; returns ms each."""
        took = {}
        for style in styles:
            started = time.perf_counter()
            self._entry(style)
            took[style] = (time.perf_counter() - started) * 1000
            log.info("style %s ready in %.0f ms", style, took[style])
        return took

    def spec_and_model(self, style: str) -> tuple[StyleSpec, str]:
        loaded, _ = self._entry(style)
        return loaded.spec, loaded.model

    def submit(self, style: str, pixels: np.ndarray, priority: Priority) -> Future[np.ndarray]:
        """Queue one image (uint8 [H,W,3]) for the style's batcher; `result()` waits for its output pixels."""
        _, batcher = self._entry(style)
        return batcher.submit(pixels, priority=priority)

    def submit_many(self, style: str, pixels: Sequence[np.ndarray], priority: Priority) -> GroupFuture:
        """`submit` for several images of one style at once (a bulk group): one hand-over to the batcher;
        `results()` waits for them all."""
        _, batcher = self._entry(style)
        return batcher.submit_many(pixels, priority=priority)

    def results(self, group: GroupFuture) -> list[np.ndarray | Exception]:
        """Each image's output pixels, or the exception that ended it; JobTimeout for the whole group."""
        try:
            return group.result(timeout=self.timeout_s)
        except TimeoutError:
            group.cancel()
            raise JobTimeout(f"inference did not finish within {self.timeout_s:g} s") from None

    def result(self, future: Future[np.ndarray]) -> np.ndarray:
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise JobTimeout(f"inference did not finish within {self.timeout_s:g} s") from None

    def loaded(self) -> dict[str, Any]:
        with self._lock:
            return {style: entry[0].info for style, entry in self._batchers.items()}

    def close(self) -> None:
        with self._lock:
            batchers = [entry[1] for entry in self._batchers.values()]
            self._batchers.clear()
        for batcher in batchers:
            batcher.close()


def _on_pixels(runtime: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A runtime as uint8 [N,H,W,3] in and out: its own `run_pixels` where it has one (the null
    runtime), else its float [N,3,H,W] `run` in [-1,1] with one conversion each way per batch."""
    if hasattr(runtime, "run_pixels"):
        own: Callable[[np.ndarray], np.ndarray] = runtime.run_pixels
        return own
    run = runtime.run

    def run_pixels(pixels: np.ndarray) -> np.ndarray:
        return from_model_output(run(to_model_input(pixels)))

    return run_pixels


def _starter(loaded: LoadedStyle) -> Callable[[np.ndarray], Callable[[], np.ndarray]] | None:
    """The runtime's asynchronous `start(pixels) -> finish` on a GPU; None elsewhere (on a CPU, `start`
    computes before it returns, and queueing batch N+1 first would delay batch N's outputs)."""
    start = getattr(loaded.runtime, "start", None)
    return start if callable(start) and loaded.info.get("device", "cpu") != "cpu" else None


# Batch sizes timed on a GPU (issue 16: 8 is far too small for a card that wants 64).
GPU_BATCHES = (1, 8, 16, 32, 64, 128)
# Of the batch sizes within this share of the best img/s, the smallest wins: as fast, less latency and memory.
GPU_BATCH_SLACK = 0.95
_GPU_PROBE_MAX_SIDE = 512


def _per_image(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> float:
    """Seconds per image, best of two runs after a first run of this shape (which compiles or allocates)."""
    run(batch)
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        run(batch)
        best = min(best, time.perf_counter() - started)
    return best / len(batch)


def useful_batch(loaded: LoadedStyle, max_batch: int, *, search: bool = False) -> int:
    """The largest batch worth forming for this style on this device, recorded in its runtime info
    (`batch`, which the worker publishes).

    CPU: `max_batch`, or 1 where batching does not pay (on CPUs a batch often runs slower per image than
    single images do); timed on a square probe of the style's working size, at most 256 px (the ratio is
    what counts). GPU with `search`: each of GPU_BATCHES up to the first that fails (memory), at the
    working size (at most 512 px), and the smallest within GPU_BATCH_SLACK of the best img/s. On a GPU the
    runtime then prepares its fast path for that batch (`warm`: torch compiles it), timed as `compile_s`.
    """
    on_gpu = loaded.info.get("device", "cpu") != "cpu"
    if on_gpu and search:
        chosen = _searched_batch(loaded)
    elif max_batch <= 1:
        chosen = 1
    else:
        chosen = _cpu_batch(loaded, max_batch)
    loaded.info["batch"] = chosen
    warm = getattr(loaded.runtime, "warm", None)
    if on_gpu and callable(warm):
        side = max(8, min(_GPU_PROBE_MAX_SIDE, loaded.spec.max_side) // 4 * 4)
        loaded.info["compile_s"] = round(warm(chosen, side, side), 1)
    return chosen


def _cpu_batch(loaded: LoadedStyle, max_batch: int) -> int:
    run = _on_pixels(loaded.runtime)
    side = max(8, min(256, loaded.spec.max_side) // 4 * 4)
    probe = np.random.default_rng(0).integers(0, 256, size=(max_batch, side, side, 3), dtype=np.uint8)
    single, batched = _per_image(run, probe[:1]), _per_image(run, probe)
    chosen = max_batch if batched < single * 0.95 else 1
    log.info("style %s: %.1f ms/image alone, %.1f ms/image in a batch of %d: batches of up to %d",
             loaded.spec.name, single * 1000, batched * 1000, max_batch, chosen)
    return chosen


def _searched_batch(loaded: LoadedStyle) -> int:
    run = _on_pixels(loaded.runtime)
    side = max(8, min(_GPU_PROBE_MAX_SIDE, loaded.spec.max_side) // 4 * 4)
    rng = np.random.default_rng(0)
    rates: dict[int, float] = {}
    for size in GPU_BATCHES:
        probe = rng.integers(0, 256, size=(size, side, side, 3), dtype=np.uint8)
        try:
            rates[size] = 1.0 / _per_image(run, probe)
        except Exception as exc:  # out of device memory: larger batches will not fit either
            log.info("style %s: batch %d at %d px does not run here (%s)", loaded.spec.name, size, side, exc)
            break
    if not rates:
        raise RuntimeError(f"style {loaded.spec.name}: not even one image at {side} px runs on this device")
    best = max(rates.values())
    chosen = min(size for size, rate in rates.items() if rate >= best * GPU_BATCH_SLACK)
    loaded.info["batch_rates"] = {str(size): round(rate, 1) for size, rate in rates.items()}
    log.info("style %s at %d px: %s img/s by batch size: batches of up to %d", loaded.spec.name, side,
             ", ".join(f"{size}: {rate:.0f}" for size, rate in rates.items()), chosen)
    return chosen
