"""Static exports of a style's generator, cached by weights hash: Paddle (`paddle.jit.save`) and ONNX.

Layout: `{cache_dir}/exports/{style}-{first 16 hex of the weights' SHA-256}-{fmt}/` holding
`model.json` + `model.pdiparams` (Paddle 3's format) or `model.onnx`. An export is written to a temporary
directory and renamed into place, so concurrent processes never see half of one and a second call is a
cache hit. A registry `weights` entry may itself be an exported Paddle model directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from stylequeue.config.styles import StyleSpec, weights_sha256
from stylequeue.errors import ConfigError, PaddleMissing, WeightsError

logger = logging.getLogger("stylequeue.models")

ExportFormat = Literal["paddle", "onnx"]
ONNX_OPSET = 17
INPUT_NAME = "image"
ONNX_FILE = "model.onnx"
_EXPORT_LOCK = threading.RLock()  # re-entrant: an ONNX export first makes the Paddle one


def is_exported_dir(weights: str) -> bool:
    """True when a registry `weights` entry names an exported Paddle model directory."""
    return not weights.startswith("s3://") and Path(weights).is_dir()


def paddle_model_files(directory: str | Path) -> tuple[Path, Path]:
    """(program file, params file) of an exported Paddle model: `X.json` (Paddle 3) or `X.pdmodel`."""
    root = Path(directory)
    for suffix in (".json", ".pdmodel"):
        for program in sorted(root.glob(f"*{suffix}")):
            params = program.with_suffix(".pdiparams")
            if params.is_file():
                return program, params
    raise WeightsError(f"{root}: no exported Paddle model here (expected X.json or X.pdmodel with X.pdiparams)")


def export_dir(spec: StyleSpec, fmt: ExportFormat, cache_dir: str | Path) -> Path:
    """Where the export of `spec` in `fmt` lives (whether or not it exists yet)."""
    if spec.weights.startswith("s3://"):
        raise ConfigError(f"style {spec.name!r}: s3 weights: download the file and register its path")
    digest = weights_sha256(spec.weights)[:16]
    return Path(cache_dir) / "exports" / f"{spec.name}-{digest}-{fmt}"


def export_model(spec: StyleSpec, *, fmt: ExportFormat = "paddle", cache_dir: str | Path) -> Path:
    """Export the style's generator (dynamic batch and spatial dims) and return the export's directory."""
    if fmt not in ("paddle", "onnx"):
        raise ConfigError(f"unknown export format {fmt!r}; one of paddle, onnx")
    if fmt == "paddle" and is_exported_dir(spec.weights):
        paddle_model_files(spec.weights)
        return Path(spec.weights)
    final = export_dir(spec, fmt, cache_dir)
    if final.is_dir():
        return final
    with _EXPORT_LOCK:  # paddle.jit.save and paddle2onnx keep global state: one export at a time
        if final.is_dir():
            return final
        return _export_once(spec, fmt, cache_dir, final)


def _export_once(spec: StyleSpec, fmt: ExportFormat, cache_dir: str | Path, final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        if fmt == "paddle":
            _export_paddle(spec, staging)
        else:
            _export_onnx(export_model(spec, fmt="paddle", cache_dir=cache_dir), staging)
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared by workers
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():  # anything but "another process published it first"
                raise
        logger.info("exported style %s (%s) to %s", spec.name, fmt, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _export_paddle(spec: StyleSpec, target: Path) -> None:
    try:
        import paddle
    except ImportError:
        raise PaddleMissing() from None
    from stylequeue.models.weights import load_generator

    generator = load_generator(spec)
    spec_in = paddle.static.InputSpec([-1, 3, -1, -1], "float32", INPUT_NAME)
    paddle.jit.save(generator, str(target / "model"), input_spec=[spec_in])
    paddle_model_files(target)


def _export_onnx(paddle_dir: Path, target: Path) -> None:
    try:
        import paddle2onnx
    except ImportError:
        raise ConfigError("ONNX export needs paddle2onnx: `pip install 'stylequeue[cpu]'`") from None
    program, params = paddle_model_files(paddle_dir)
    try:
        # save_file=None returns the bytes and skips paddle2onnx's optional Polygraphy pass, which
        # would try to pip-install packages at run time; ONNX Runtime and OpenVINO fold constants anyway.
        with _captured_stdout() as captured:  # its progress lines: for the log, not a user's terminal
            data = paddle2onnx.export(str(program), str(params), None, opset_version=ONNX_OPSET)
    except Exception as exc:  # paddle2onnx logs and swallows its own errors, then fails obscurely
        raise WeightsError(f"ONNX export of {paddle_dir} failed: {exc}") from None
    if captured:
        logger.debug("paddle2onnx: %s", captured[0].strip())
    if not data:
        raise WeightsError(f"ONNX export of {paddle_dir} produced nothing")
    (target / ONNX_FILE).write_bytes(_symbolic_dims(data))


def _symbolic_dims(data: bytes) -> bytes:
    """Name the dynamic dims of inputs and outputs (paddle2onnx writes 0 for unknown output dims).

    Without it ONNX Runtime logs a shape warning on every run.
    """
    try:
        import onnx
    except ImportError:
        return data
    model = onnx.load_from_string(data)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for index, dim in enumerate(dims):
            if index != 1 and (not dim.HasField("dim_value") or dim.dim_value <= 0):
                dim.dim_param = ("batch", "channels", "height", "width")[index] if index < 4 else f"d{index}"
    return model.SerializeToString()


@contextlib.contextmanager
def _captured_stdout() -> Iterator[list[str]]:
    """What C++ code writes to file descriptor 1 inside the block, collected (one string) instead of shown."""
    sys.stdout.flush()
    saved = os.dup(1)
    collected: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield collected
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            collected.append(sink.read().decode(errors="replace"))
