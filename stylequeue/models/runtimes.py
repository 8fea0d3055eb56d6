"""The table of model runtimes: one frozen row per engine, which everything about runtimes reads.

`Settings` validates `STYLEQUEUE_RUNTIME` against it, `runtime.select_runtime` takes its `auto`
candidates from it, the install checks and hints come from it, and `runtime.build_runtime` calls a
row's builder. Adding a runtime is one row plus one builder, both here.

Nothing heavy is imported at module level (settings and producers import this module): builders
import their engine when called.

Rows, in `auto`'s order of preference (a tie in timing keeps the earlier candidate):

    name              needs          reads                        CPU            GPU
    openvino          openvino       the ONNX export              bf16, fp32     -
    paddle-inference  paddle         the Paddle export            bf16, fp32     fp16, fp32
    onnxruntime       onnxruntime    the ONNX export              fp32           fp32
    torch             torch          the weights file (no Paddle) bf16, fp32     fp16, bf16, fp32
    dygraph           paddle         the weights file             fp32 (the reference, never an auto candidate)
    null              nothing        nothing                      fp32 (explicit only: returns its input)

An export is made from the weights with Paddle (and paddle2onnx for ONNX) and cached; a worker without
Paddle can still run an ONNX-based runtime on an export already in its cache.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from stylequeue.errors import ConfigError, PaddleMissing

if TYPE_CHECKING:
    from stylequeue.config.styles import StyleSpec
    from stylequeue.models.runtime import Runtime

Reads = Literal["weights", "paddle-export", "onnx-export", "nothing"]
# (spec, precision, device, cache_dir, threads) -> a built runtime
Builder = Callable[["StyleSpec", str, str, "str | Path", "int | None"], "Runtime"]

_PADDLE_HINT = ("PaddlePaddle: `pip install 'stylequeue[cpu]'` (GPU: paddlepaddle-gpu 3.x from Paddle's package "
                "index, then `pip install 'stylequeue[gpu]'`)")
_TORCH_HINT = "PyTorch: `pip install 'stylequeue[torch]'` (GPU: a CUDA build of torch from pytorch.org's index)"


@dataclass(frozen=True)
class RuntimeKind:
    """One runtime: what it needs installed, what it reads, the precisions it runs, how it is built.

    Attributes:
        modules: modules that must be importable to run it at all.
        reads: the weights file itself, or an export of it (made with Paddle, then cached).
        cpu, gpu: precisions on each kind of device, in `auto`'s order; empty = does not run there.
        auto: whether `auto` times it as a candidate.
    """

    name: str
    modules: tuple[str, ...]
    install_hint: str
    reads: Reads
    cpu: tuple[str, ...]
    gpu: tuple[str, ...]
    auto: bool
    build: Builder

    @property
    def needs_paddle(self) -> bool:
        """Paddle must be in this process to load a style with it (an export aside, which can be cached)."""
        return "paddle" in self.modules

    def precisions(self, device: str) -> tuple[str, ...]:
        return self.cpu if device == "cpu" else self.gpu


# --- builders (each imports its engine when called) -------------------------------------------------


def _export(spec: StyleSpec, fmt: Literal["paddle", "onnx"], cache_dir: str | Path, runtime: str) -> Path:
    """The style's export in `fmt`: from the cache, or made now (which needs Paddle)."""
    from stylequeue.models.export import export_model

    try:
        return export_model(spec, fmt=fmt, cache_dir=cache_dir)
    except PaddleMissing:
        raise ConfigError(
            f"style {spec.name!r}: runtime {runtime} reads the {fmt} export, none is cached under {cache_dir}, "
            f"and making one needs {_PADDLE_HINT}"
        ) from None


def _weights_file(spec: StyleSpec, runtime: str) -> None:
    from stylequeue.models.export import is_exported_dir

    if is_exported_dir(spec.weights):
        raise ConfigError(f"style {spec.name!r}: {runtime} needs a weights file, not an exported model dir")


def _build_openvino(spec: StyleSpec, precision: str, device: str, cache_dir: str | Path,
                    threads: int | None) -> Runtime:
    from stylequeue.models.export import ONNX_FILE
    from stylequeue.models.runtime_backends import OpenVINORuntime

    if device != "cpu":
        raise ConfigError("openvino runs on the CPU here; use torch or paddle-inference on a GPU")
    return OpenVINORuntime(_export(spec, "onnx", cache_dir, "openvino") / ONNX_FILE, precision=precision,
                           threads=threads)


def _build_paddle_inference(spec: StyleSpec, precision: str, device: str, cache_dir: str | Path,
                            threads: int | None) -> Runtime:
    from stylequeue.models.runtime_backends import PaddleInferenceRuntime

    return PaddleInferenceRuntime(_export(spec, "paddle", cache_dir, "paddle-inference"), precision=precision,
                                  device=device, threads=threads)


def _build_onnxruntime(spec: StyleSpec, precision: str, device: str, cache_dir: str | Path,
                       threads: int | None) -> Runtime:
    from stylequeue.models.export import ONNX_FILE
    from stylequeue.models.runtime_backends import OnnxRuntimeRuntime

    return OnnxRuntimeRuntime(_export(spec, "onnx", cache_dir, "onnxruntime") / ONNX_FILE, device=device,
                              threads=threads)


def _build_torch(spec: StyleSpec, precision: str, device: str, cache_dir: str | Path, threads: int | None) -> Runtime:
    from stylequeue.models.torch_runtime import TorchRuntime

    _weights_file(spec, "torch")
    return TorchRuntime(spec, precision=precision, device=device, threads=threads, cache_dir=cache_dir)


def _build_dygraph(spec: StyleSpec, precision: str, device: str, cache_dir: str | Path,
                   threads: int | None) -> Runtime:
    from stylequeue.models.runtime_backends import DygraphRuntime

    _weights_file(spec, "dygraph")
    return DygraphRuntime(spec, device=device, threads=threads)


def _build_null(spec: StyleSpec, precision: str, device: str, cache_dir: str | Path, threads: int | None) -> Runtime:
    from stylequeue.models.runtime_backends import NullRuntime

    return NullRuntime()


RUNTIME_TABLE: tuple[RuntimeKind, ...] = (
    RuntimeKind("openvino", ("openvino",), "OpenVINO: `pip install 'stylequeue[cpu]'`", "onnx-export",
                cpu=("bf16", "fp32"), gpu=(), auto=True, build=_build_openvino),
    RuntimeKind("paddle-inference", ("paddle",), _PADDLE_HINT, "paddle-export",
                cpu=("bf16", "fp32"), gpu=("fp16", "fp32"), auto=True, build=_build_paddle_inference),
    RuntimeKind("onnxruntime", ("onnxruntime",),
                "ONNX Runtime: `pip install 'stylequeue[onnx]'` (and paddle2onnx, in 'stylequeue[cpu]')",
                "onnx-export", cpu=("fp32",), gpu=("fp32",), auto=True, build=_build_onnxruntime),
    RuntimeKind("torch", ("torch",), _TORCH_HINT, "weights",
                cpu=("bf16", "fp32"), gpu=("fp16", "bf16", "fp32"), auto=True, build=_build_torch),
    RuntimeKind("dygraph", ("paddle",), _PADDLE_HINT, "weights",
                cpu=("fp32",), gpu=("fp32",), auto=False, build=_build_dygraph),
    RuntimeKind("null", (), "nothing to install", "nothing", cpu=("fp32",), gpu=("fp32",), auto=False,
                build=_build_null),
)
RUNTIME_NAMES: tuple[str, ...] = tuple(row.name for row in RUNTIME_TABLE)
# What STYLEQUEUE_RUNTIME accepts.
RUNTIME_CHOICES: tuple[str, ...] = ("auto", *RUNTIME_NAMES)
_BY_NAME = {row.name: row for row in RUNTIME_TABLE}


def runtime_kind(name: str) -> RuntimeKind:
    """The table's row for `name`; ConfigError listing the names for anything else."""
    row = _BY_NAME.get(name)
    if row is None:
        raise ConfigError(f"unknown runtime {name!r}; one of {', '.join(RUNTIME_CHOICES)}")
    return row


def module_found(module: str) -> bool:
    """Whether `module` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module blocked with sys.modules[name] = None
        return False


def installed(name: str) -> bool:
    """Whether every module runtime `name` needs can be imported here."""
    return all(module_found(module) for module in runtime_kind(name).modules)


def _export_cached(spec: StyleSpec, reads: Reads, cache_dir: str | Path) -> bool:
    from stylequeue.models.export import export_dir, is_exported_dir

    if reads == "paddle-export" and is_exported_dir(spec.weights):
        return True
    fmt: Literal["paddle", "onnx"] = "paddle" if reads == "paddle-export" else "onnx"
    return not spec.weights.startswith("s3://") and export_dir(spec, fmt, cache_dir).is_dir()


def missing_for(name: str, specs: Sequence[StyleSpec], cache_dir: str | Path) -> str | None:
    """What stops runtime `name` from serving every style in `specs` here, or None when nothing does."""
    from stylequeue.models.export import is_exported_dir

    row = runtime_kind(name)
    if not installed(name):
        return row.install_hint
    if row.reads == "weights":
        exported = [spec.name for spec in specs if is_exported_dir(spec.weights)]
        if exported:
            return f"{name} reads weights files, and style {exported[0]!r} is an exported model dir"
    if row.reads in ("paddle-export", "onnx-export"):
        makers = ("paddle",) if row.reads == "paddle-export" else ("paddle", "paddle2onnx")
        if not all(map(module_found, makers)):
            uncached = [spec.name for spec in specs if not _export_cached(spec, row.reads, cache_dir)]
            if uncached:
                return (f"{name} reads an export, none is cached for style {uncached[0]!r}, and making one "
                        f"needs {_PADDLE_HINT}")
    return None


def serving_runtimes(runtime: str, device: str, specs: Sequence[StyleSpec], cache_dir: str | Path) -> list[str]:
    """The runtimes that could serve `specs` on `device` for STYLEQUEUE_RUNTIME=`runtime`.

    Raises ConfigError, one line naming what to install, when there is none.
    """
    if runtime == "auto":
        names = [row.name for row in RUNTIME_TABLE if row.auto and row.precisions(device)]
    else:
        names = [runtime_kind(runtime).name]
    missing = {name: missing_for(name, specs, cache_dir) for name in names}
    usable = [name for name, problem in missing.items() if problem is None]
    if usable:
        return usable
    if runtime != "auto":
        raise ConfigError(f"STYLEQUEUE_RUNTIME={runtime} cannot run here: {missing[runtime]}")
    raise ConfigError(f"no model runtime can run on {device} here: install {_TORCH_HINT}, or {_PADDLE_HINT}")

