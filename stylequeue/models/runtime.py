"""One inference interface (`Runtime`) and the choice of the fastest correct one (`select_runtime`).

`auto` measures rather than assumes (CPUs differ: docs/performance.md): every available candidate of the runtime
table (models/runtimes.py) runs once untimed on a probe image, then is timed; its output is compared with
the fp32 reference on the same input (Paddle's dynamic graph; PyTorch fp32 where Paddle is not installed),
and the fastest with PSNR >= 40 dB wins. The decision is cached on disk, keyed by everything that
could change it, so a restarted worker skips the timing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from stylequeue.config.styles import StyleSpec, weights_sha256
from stylequeue.errors import ConfigError
from stylequeue.models import runtime_backends as backends
from stylequeue.models import runtimes
from stylequeue.models.export import is_exported_dir

logger = logging.getLogger("stylequeue.models")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PSNR_GATE_DB = 40.0
# Cost grows with pixels, so the ranking at 128x128 is the ranking at 256-512 px, for a quarter of
# 256x256's time: a 9-block model's choice (5 candidates + the reference) stays at a few seconds.
PROBE_SIDE = 128
TIMED_RUNS = 3
# Paddle's Intel OpenMP threads spin for KMP_BLOCKTIME (200 ms) after each parallel region; timing the
# next candidate inside that window would charge it for a core it does not have.
_OPENMP_RUNTIMES = ("dygraph", "paddle-inference")
_OPENMP_SPIN_S = 0.25
_MEASURE_LOCK = threading.Lock()
_CACHE_VERSION = 1


@runtime_checkable
class Runtime(Protocol):
    """float32 [N, 3, H, W] in [-1, 1] in, the same shape out; H and W multiples of 4."""

    name: str
    precision: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class Selection:
    """The chosen runtime plus a JSON-able account of how it was chosen."""

    runtime: Runtime
    info: dict[str, Any] = field(default_factory=dict)


def psnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """PSNR of two images in [-1, 1], measured on [0, 1]; inf when identical."""
    diff = (np.asarray(output, np.float64) - np.asarray(reference, np.float64)) / 2.0
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def probe_input(side: int, batch: int = 1, seed: int = 1234) -> np.ndarray:
    """A deterministic photo-like image in [-1, 1]: colour noise with a 1/f amplitude spectrum.

    Natural photos have ~1/f spectra; on this probe bf16 runtimes score within ~0.5 dB of real photos,
    where smooth synthetic patterns scored 4 dB lower and failed paths that pass on photos.
    """
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0
    amplitude = 1.0 / radius
    amplitude[0, 0] = 0.0

    def spectrum() -> np.ndarray:
        return rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)

    shared = spectrum()  # channels of a photo are strongly correlated
    channels = []
    for _ in range(3):
        plane = np.fft.irfft2((0.8 * shared + 0.45 * spectrum()) * amplitude, s=(side, side))
        channels.append((plane - plane.mean()) / (2.5 * plane.std() + 1e-12))
    image = np.clip(np.stack(channels), -1.0, 1.0).astype(np.float32)
    return np.repeat(image[None], batch, axis=0)


def release(runtime: Any) -> None:
    """Drop a runtime's engine and thread pool now rather than at garbage collection."""
    close = getattr(runtime, "close", None)
    if callable(close):
        close()


def _candidates(runtime: str, precision: str, device: str) -> list[tuple[str, str]]:
    """(runtime, precision) pairs `auto` would time for this request, in the table's order of preference."""
    pairs = [(row.name, p) for row in runtimes.RUNTIME_TABLE if row.auto for p in row.precisions(device)]
    if device == "cpu" and not backends.cpu_has_bf16():
        pairs = [pair for pair in pairs if pair[1] != "bf16"]
    return [(r, p) for r, p in pairs if runtime in ("auto", r) and precision in ("auto", p)]


def build_runtime(
    name: str, precision: str, spec: StyleSpec, *, device: str, cache_dir: str | Path, threads: int | None = None
) -> Runtime:
    """Build one runtime for a style through its row of the runtime table, exporting (cached) what it reads."""
    row = runtimes.runtime_kind(name)
    if not backends.runtime_installed(name):
        raise ConfigError(f"runtime {name} is not installed: {backends.INSTALL_HINTS[name]}")
    return row.build(spec, precision, device, cache_dir, threads)


def _check_request(runtime: str, precision: str, device: str) -> None:
    if runtime != "auto":
        runtimes.runtime_kind(runtime)  # unknown: ConfigError listing the names
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    backends.gpu_index(device)
    if runtime not in ("auto", "null") and not backends.runtime_installed(runtime):
        raise ConfigError(f"STYLEQUEUE_RUNTIME={runtime} is not installed: {backends.INSTALL_HINTS[runtime]}")
    if device == "cpu" and precision == "fp16":
        raise ConfigError("precision fp16 is for GPUs; on a CPU use fp32, bf16 or auto")
    if device == "cpu" and precision == "bf16" and not backends.cpu_has_bf16():
        raise ConfigError("precision bf16 needs a CPU with avx512_bf16 or amx_bf16; this one has neither")
    if runtime == "dygraph" and precision not in ("auto", "fp32"):
        raise ConfigError("the dygraph runtime is the fp32 reference; use precision fp32 or auto")
    if runtime not in ("dygraph", "null") and not _candidates(runtime, precision, device):
        what = "no runtime here" if runtime == "auto" else f"runtime {runtime}"
        raise ConfigError(f"{what} runs precision {precision} on {device}")


def _package_versions() -> dict[str, str]:
    versions = {}
    for package in ("stylequeue", "paddlepaddle", "paddlepaddle-gpu", "paddle2onnx", "openvino", "onnxruntime",
                    "onnxruntime-gpu", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _decision_path(spec: StyleSpec, request: dict[str, Any], cache_dir: str | Path) -> Path:
    key_material = {
        "version": _CACHE_VERSION,
        "weights": weights_sha256(spec.weights),
        "architecture": [spec.generator, spec.ngf, spec.n_blocks, spec.use_dropout, spec.direction],
        "cpu": backends.cpu_info(),
        "packages": _package_versions(),
        **request,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "runtime-choices" / f"{spec.name}-{key}.json"


def _read_decision(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "runtime" in info and "precision" in info else None


def _write_decision(path: Path, info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(info, indent=1))
    os.replace(partial, path)


def cached_choices(style_name: str, cache_dir: str | Path) -> list[dict[str, Any]]:
    """Runtime decisions recorded on this machine for a style, newest first (no engine is imported).

    For `stylequeue styles --json`: what `auto` chose here, and the timings it chose by.
    """
    pattern = re.compile(rf"{re.escape(style_name)}-[0-9a-f]{{16}}\.json")  # not style "ink-2"'s
    paths = sorted((p for p in (Path(cache_dir) / "runtime-choices").glob("*.json") if pattern.fullmatch(p.name)),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    return [info for info in map(_read_decision, paths) if info is not None]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _time_runs(runtime: Runtime, probe: np.ndarray, runs: int) -> tuple[float, np.ndarray]:
    durations, output = [], probe
    for _ in range(runs):
        start = time.perf_counter()
        output = runtime.run(probe)
        durations.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(durations), output


def _row(name: str, precision: str, ms: float | None, psnr: float | None, ok: bool, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"runtime": name, "precision": precision,
                           "ms": None if ms is None else round(ms, 2),
                           "psnr_db": None if psnr is None or math.isinf(psnr) else round(psnr, 2), "ok": ok}
    row.update(extra)
    return row


def _reference_pair(spec: StyleSpec) -> tuple[str, str]:
    """What every candidate is compared with: Paddle's fp32 dynamic graph where Paddle is installed, else
    PyTorch fp32 on the same weights, else ONNX Runtime fp32 on a cached export."""
    exported = is_exported_dir(spec.weights)
    if backends.runtime_installed("dygraph"):
        # An exported model dir has no dygraph: Paddle Inference fp32 (116 dB from dygraph, measured) stands in.
        return ("paddle-inference", "fp32") if exported else ("dygraph", "fp32")
    if not exported and backends.runtime_installed("torch"):
        return ("torch", "fp32")
    return ("onnxruntime", "fp32")


def _measure(
    spec: StyleSpec, pairs: list[tuple[str, str]], *, device: str, cache_dir: str | Path, threads: int | None
) -> tuple[Runtime | None, list[dict[str, Any]]]:
    """Time every candidate against the fp32 reference; return the winner (still built) and the table."""
    probe = probe_input(min(PROBE_SIDE, max(16, spec.max_side - spec.max_side % 4)))
    rows: list[dict[str, Any]] = []
    ref_pair = _reference_pair(spec)
    ref_runtime = build_runtime(*ref_pair, spec, device=device, cache_dir=cache_dir, threads=threads)
    try:
        ref_ms, reference = _time_runs(ref_runtime, probe, 1)
    finally:
        release(ref_runtime)
    rows.append(_row(*ref_pair, ref_ms, None, True, reference=True))
    best: tuple[float, Runtime] | None = None
    previous = ref_pair[0]
    for name, precision in pairs:
        if previous in _OPENMP_RUNTIMES:
            time.sleep(_OPENMP_SPIN_S)
        previous = name
        if not backends.runtime_installed(name):
            rows.append(_row(name, precision, None, None, False, error=backends.INSTALL_HINTS[name]))
            continue
        try:
            runtime = build_runtime(name, precision, spec, device=device, cache_dir=cache_dir, threads=threads)
            runtime.run(probe)  # untimed: first-run allocation and shape compilation
            ms, output = _time_runs(runtime, probe, TIMED_RUNS)
        except Exception as exc:  # a candidate that cannot build or run is reported and skipped
            logger.warning("runtime %s %s unavailable for style %s: %s", name, precision, spec.name, exc)
            rows.append(_row(name, precision, None, None, False, error=f"{type(exc).__name__}: {exc}"))
            continue
        psnr = psnr_db(reference, output)
        ok = psnr >= PSNR_GATE_DB
        row = _row(name, runtime.precision, ms, psnr, ok)
        rows.append(row)
        # Decide on the figure the table shows: a tie there keeps the earlier, preferred candidate.
        if ok and (best is None or row["ms"] < best[0]):
            if best is not None:
                release(best[1])
            best = (row["ms"], runtime)
        else:
            release(runtime)  # losers go now: one thread pool per runtime is too many on 2 cores
    return (best[1] if best else None), rows


def _info(chosen: Runtime, device: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"runtime": chosen.name, "precision": chosen.precision, "device": device, "candidates": rows,
            "chosen_at": _now()}


def _log_table(spec: StyleSpec, info: dict[str, Any]) -> None:
    lines = [f"runtime choice for style {spec.name} on {info['device']}"
             f"{' (cached)' if info.get('cached') else ''}: {info['runtime']} {info['precision']}"]
    for row in info["candidates"]:
        ms = "-" if row["ms"] is None else f"{row['ms']:.1f} ms"
        psnr = "ref" if row.get("reference") else ("-" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB")
        verdict = "ok" if row["ok"] else row.get("error", f"below {PSNR_GATE_DB:.0f} dB")
        lines.append(f"  {row['runtime']:<17}{row['precision']:<6}{ms:>12}{psnr:>10}  {verdict}")
    logger.info("\n".join(lines))


def select_runtime(
    spec: StyleSpec,
    *,
    runtime: str = "auto",
    precision: str = "auto",
    device: str = "cpu",
    cache_dir: str | Path,
    threads: int | None = None,
) -> Selection:
    """Build the runtime a style runs on; `auto` picks the fastest within PSNR 40 dB of the fp32 reference.

    Args:
        runtime: auto, or a name from the runtime table (models/runtimes.py); null is explicit only.
        precision: auto, fp32, bf16 (CPUs with avx512_bf16/amx_bf16; GPUs with torch) or fp16 (GPUs).
        device: cpu or gpu:N.
        cache_dir: where exports and the timing decision are cached.
        threads: inference threads; default all cores this process may use.
    """
    _check_request(runtime, precision, device)
    if spec.weights.startswith("s3://"):
        raise ConfigError(f"style {spec.name!r}: s3 weights: download the file and register its path")
    if runtime in ("dygraph", "null"):
        chosen = build_runtime(runtime, "fp32", spec, device=device, cache_dir=cache_dir, threads=threads)
        return Selection(chosen, _info(chosen, device, []))
    pairs = _candidates(runtime, precision, device)
    if runtime != "auto" and (precision != "auto" or len(pairs) == 1):
        # What the operator named, with nothing to choose between: no timing, no gate.
        precision = precision if precision != "auto" else pairs[0][1]
        chosen = build_runtime(runtime, precision, spec, device=device, cache_dir=cache_dir, threads=threads)
        return Selection(chosen, _info(chosen, device, []))
    request = {"runtime": runtime, "precision": precision, "device": device,
               "threads": threads or backends.default_threads(), "probe_side": PROBE_SIDE}
    # Two styles timed at once would share the cores and each measure the other's load.
    with _MEASURE_LOCK:
        return _select_auto(spec, pairs, request, device=device, cache_dir=cache_dir, threads=threads)


def _select_auto(spec: StyleSpec, pairs: list[tuple[str, str]], request: dict[str, Any], *, device: str,
                 cache_dir: str | Path, threads: int | None) -> Selection:
    path = _decision_path(spec, request, cache_dir)
    cached = _read_decision(path)
    if cached is not None:
        try:
            chosen = build_runtime(cached["runtime"], cached["precision"], spec,
                                   device=device, cache_dir=cache_dir, threads=threads)
            info = {**cached, "cached": True}
            _log_table(spec, info)
            return Selection(chosen, info)
        except Exception as exc:
            logger.warning("cached runtime choice for %s no longer builds (%s); measuring again", spec.name, exc)
    winner, rows = _measure(spec, pairs, device=device, cache_dir=cache_dir, threads=threads)
    if winner is None:
        reference = rows[0]
        if reference["runtime"] not in ("dygraph", "torch"):  # only a weights-file reference is exact by definition
            raise ConfigError(f"style {spec.name!r}: no runtime passed the {PSNR_GATE_DB:.0f} dB gate: {rows}")
        logger.warning("no fast runtime passed for style %s; serving with the %s reference", spec.name,
                       reference["runtime"])
        winner = build_runtime(reference["runtime"], "fp32", spec, device=device, cache_dir=cache_dir,
                               threads=threads)
    info = {**_info(winner, device, rows), "cached": False}
    _write_decision(path, info)
    _log_table(spec, info)
    return Selection(winner, info)
