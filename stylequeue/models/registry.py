"""Registered styles turned into loaded runtimes: lazily, once per process, LRU-bounded, thread-safe.

The registry file is parsed by `config.styles` (no Paddle); this module is what workers, `restyle()` and
`export` use to get a style's runtime. A style whose registry entry changed is loaded again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylequeue.config.styles import StyleCatalog, StyleSpec, model_label
from stylequeue.errors import ConfigError, WeightsError
from stylequeue.models.runtime import Runtime, select_runtime

logger = logging.getLogger("stylequeue.models")


@dataclass(frozen=True)
class LoadedStyle:
    """A style ready to run: its spec, traceable model label, runtime and how that was chosen."""

    spec: StyleSpec
    model: str
    runtime: Runtime
    info: dict[str, Any] = field(compare=False)
    load_ms: float = 0.0


class ModelRegistry:
    """Style name -> LoadedStyle for one process (one device).

    Args:
        catalog: the parsed styles registry.
        runtime, precision, device: STYLEQUEUE_RUNTIME, STYLEQUEUE_PRECISION, STYLEQUEUE_DEVICE.
        cache_dir: exports and runtime decisions (Settings.cache_dir).
        max_loaded: styles kept loaded; the least recently used beyond it is dropped.
        threads: inference threads per runtime; default all cores of the process.
    """

    def __init__(
        self,
        catalog: StyleCatalog,
        *,
        runtime: str = "auto",
        precision: str = "auto",
        device: str = "cpu",
        cache_dir: str | Path,
        max_loaded: int = 4,
        threads: int | None = None,
    ) -> None:
        if max_loaded < 1:
            raise ConfigError("max_loaded must be at least 1")
        self.catalog = catalog
        self.runtime = runtime
        self.precision = precision
        self.device = device
        self.cache_dir = Path(cache_dir)
        self.max_loaded = max_loaded
        self.threads = threads
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedStyle] = OrderedDict()
        self._loading: dict[str, Future[LoadedStyle]] = {}

    def get(self, style_name: str) -> LoadedStyle:
        """The loaded style; loads it on first use (UnknownStyle if it is not registered)."""
        spec = self.catalog.get(style_name)
        with self._lock:
            loaded = self._loaded.get(style_name)
            if loaded is not None and loaded.spec == spec:
                self._loaded.move_to_end(style_name)
                return loaded
            pending = self._loading.get(style_name)
            owner = pending is None
            if pending is None:
                pending = self._loading[style_name] = Future()
        if not owner:
            return pending.result()  # another thread is loading it: share its result or its error
        try:
            loaded = self._load(spec)
        except BaseException as exc:
            with self._lock:
                del self._loading[style_name]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[style_name]
            self._loaded[style_name] = loaded
            self._loaded.move_to_end(style_name)
            while len(self._loaded) > self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                # Not closed here: a batch may still be running on it; it goes when unreferenced.
                logger.info("unloaded style %s (more than %d styles loaded)", evicted, self.max_loaded)
        pending.set_result(loaded)
        return loaded

    def warm_up(self, names: Iterable[str]) -> list[LoadedStyle]:
        """Load the named styles now (a worker's `--styles`), in order."""
        return [self.get(name) for name in names]

    def loaded_names(self) -> list[str]:
        """Names of the loaded styles, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _load(self, spec: StyleSpec) -> LoadedStyle:
        if spec.weights.startswith("s3://"):
            raise ConfigError(f"style {spec.name!r}: s3 weights: download the file and register its path")
        if not Path(spec.weights).exists():
            raise WeightsError(f"style {spec.name!r}: weights {spec.weights} not found")
        start = time.perf_counter()
        selection = select_runtime(
            spec, runtime=self.runtime, precision=self.precision, device=self.device,
            cache_dir=self.cache_dir, threads=self.threads,
        )
        load_ms = (time.perf_counter() - start) * 1000.0
        logger.info("loaded style %s with %s %s in %.0f ms", spec.name, selection.runtime.name,
                    selection.runtime.precision, load_ms)
        return LoadedStyle(spec=spec, model=model_label(spec), runtime=selection.runtime,
                           info=selection.info, load_ms=load_ms)
