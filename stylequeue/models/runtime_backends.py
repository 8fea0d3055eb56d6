"""The Paddle-family and ONNX engines behind `runtime.Runtime`: dygraph, Paddle Inference, ONNX Runtime,
OpenVINO, null (PyTorch is in torch_runtime.py).

Each takes float32 NCHW in [-1, 1] (any N, H, W with H and W multiples of 4) and returns the same shape.
Input and output names are read from the loaded model, never assumed. `run` is serialised per runtime
(predictors and infer requests are not re-entrant); `close()` drops the engine and its thread pool.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from stylequeue.config.styles import StyleSpec
from stylequeue.errors import ConfigError, PaddleMissing
from stylequeue.models import runtimes

logger = logging.getLogger("stylequeue.models")

# What to install when a runtime's package is missing (from the runtime table).
INSTALL_HINTS: dict[str, str] = {row.name: row.install_hint for row in runtimes.RUNTIME_TABLE}


def runtime_installed(name: str) -> bool:
    """Whether the packages a runtime needs can be imported here (without importing them)."""
    return runtimes.installed(name)


def default_threads() -> int:
    """The cores this process may run on (2 on the project's machines)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@functools.cache
def cpu_info() -> dict[str, Any]:
    """{"model": ..., "flags": [...]} from /proc/cpuinfo (empty on systems without it)."""
    model, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.strip()
    except OSError:
        pass
    return {"model": model, "flags": sorted(set(flags.split()))}


def cpu_has_bf16() -> bool:
    """bf16 compute in hardware: AVX-512 BF16 (Zen 4, Cooper Lake and later) or AMX."""
    flags = set(cpu_info()["flags"])
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def gpu_index(device: str) -> int | None:
    """`gpu:N` -> N; `cpu` -> None."""
    if device == "cpu":
        return None
    if device.startswith("gpu:") and device[4:].isdigit():
        return int(device[4:])
    raise ConfigError(f"device must be 'cpu' or 'gpu:N', got {device!r}")


def _as_input(batch: np.ndarray) -> np.ndarray:
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a float32 [N, 3, H, W] batch, got shape {list(batch.shape)}")
    return np.ascontiguousarray(batch, dtype=np.float32)


class NullRuntime:
    """Returns its input unchanged: measures queue and codec overhead without a model."""

    name = "null"
    precision = "fp32"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return _as_input(batch)

    def run_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] in and out: returning its input, it has no float conversion to make."""
        if pixels.ndim != 4 or pixels.shape[3] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected uint8 [N, H, W, 3] pixels, got {pixels.dtype} {list(pixels.shape)}")
        return pixels

    def close(self) -> None:
        pass


class DygraphRuntime:
    """Paddle's dynamic graph under `no_grad`, eval mode: the fp32 reference, never a serving path."""

    name = "dygraph"
    precision = "fp32"

    def __init__(self, spec: StyleSpec, *, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import paddle
        except ImportError:
            raise PaddleMissing() from None
        from stylequeue.models.weights import load_generator

        self._paddle = paddle
        index = gpu_index(device)
        paddle.set_device("cpu" if index is None else f"gpu:{index}")
        if index is None:
            paddle.base.core.set_num_threads(threads or default_threads())
        self._model: Any = load_generator(spec)
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        data = _as_input(batch)
        with self._lock, self._paddle.no_grad():
            return self._model(self._paddle.to_tensor(data)).numpy()

    def close(self) -> None:
        self._model = None


class PaddleInferenceRuntime:
    """Paddle Inference on an exported model: oneDNN fp32/bf16 on CPU; CUDA fp32/fp16 (optionally TensorRT)."""

    name = "paddle-inference"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        tensorrt: bool = False,
    ) -> None:
        try:
            from paddle import inference
        except ImportError:
            raise PaddleMissing() from None
        from stylequeue.models.export import paddle_model_files

        program, params = paddle_model_files(model_dir)
        config = inference.Config(str(program), str(params))
        index = gpu_index(device)
        if index is None:
            if precision not in ("fp32", "bf16"):
                raise ConfigError(f"paddle-inference on CPU runs fp32 or bf16, not {precision}")
            config.disable_gpu()
            config.enable_onednn()
            config.set_cpu_math_library_num_threads(threads or default_threads())
            if precision == "bf16":
                config.enable_onednn_bfloat16()
        else:
            if precision not in ("fp32", "fp16"):
                raise ConfigError(f"paddle-inference on GPU runs fp32 or fp16, not {precision}")
            kind = inference.PrecisionType.Half if precision == "fp16" else inference.PrecisionType.Float32
            config.enable_use_gpu(256, index, kind)
            if tensorrt:
                self._enable_tensorrt(config, inference, program, params, kind)
        config.switch_ir_optim(True)
        config.disable_glog_info()
        self.precision = precision
        self._predictor: Any = inference.create_predictor(config)
        self._input = self._predictor.get_input_names()[0]
        self._output = self._predictor.get_output_names()[0]
        self._lock = threading.Lock()

    @staticmethod
    def _enable_tensorrt(config: Any, inference: Any, program: Path, params: Path, kind: Any) -> None:
        # TensorRT needs the input name for its dynamic-shape ranges: read it from a plain predictor.
        probe = inference.create_predictor(inference.Config(str(program), str(params)))
        name = probe.get_input_names()[0]
        del probe
        config.enable_tensorrt_engine(
            workspace_size=1 << 30, max_batch_size=1, min_subgraph_size=3,
            precision_mode=kind, use_static=False, use_calib_mode=False,
        )
        config.set_trt_dynamic_shape_info({name: [1, 3, 16, 16]}, {name: [64, 3, 2048, 2048]}, {name: [8, 3, 512, 512]})

    def run(self, batch: np.ndarray) -> np.ndarray:
        data = _as_input(batch)
        with self._lock:
            handle = self._predictor.get_input_handle(self._input)
            handle.reshape(list(data.shape))
            handle.copy_from_cpu(data)
            self._predictor.run()
            return self._predictor.get_output_handle(self._output).copy_to_cpu()

    def close(self) -> None:
        self._predictor = None


class OnnxRuntimeRuntime:
    """ONNX Runtime on the paddle2onnx export (fp32; CUDA provider on GPU when the build has it)."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, onnx_file: str | Path, *, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(f"onnxruntime is not installed: {INSTALL_HINTS['onnxruntime']}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # paddle2onnx leaves unused initialisers; ORT warns about each
        index = gpu_index(device)
        providers: list[Any] = ["CPUExecutionProvider"]
        if index is not None:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError("this onnxruntime build has no CUDA provider: install onnxruntime-gpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        self._session: Any = ort.InferenceSession(str(onnx_file), options, providers=providers)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run([self._output], {self._input: _as_input(batch)})[0]

    def close(self) -> None:
        self._session = None


class OpenVINORuntime:
    """OpenVINO (CPU) on the paddle2onnx export; `PERFORMANCE_HINT=LATENCY`, f32 or bf16 inference."""

    name = "openvino"

    def __init__(self, onnx_file: str | Path, *, precision: str = "fp32", threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ConfigError(f"openvino is not installed: {INSTALL_HINTS['openvino']}") from None
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"openvino runs fp32 or bf16 here, not {precision}")
        core = ov.Core()
        compiled = core.compile_model(
            core.read_model(str(onnx_file)),
            "CPU",
            {
                # THROUGHPUT streams were slower on 2 cores (117 vs 64 ms bf16); LATENCY uses all cores per request.
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": threads or default_threads(),
            },
        )
        actual = "bf16" if "bfloat16" in str(compiled.get_property("INFERENCE_PRECISION_HINT")) else "fp32"
        if actual != precision:
            logger.warning("openvino compiled the model in %s, not the %s asked for", actual, precision)
        self.precision = actual
        self._compiled: Any = compiled
        self._request: Any = compiled.create_infer_request()
        self._input = compiled.inputs[0]
        self._output = compiled.outputs[0]
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        data = _as_input(batch)
        with self._lock:
            self._request.infer({self._input: data})
            return np.array(self._request.get_tensor(self._output).data, copy=True)

    def close(self) -> None:
        self._request = None
        self._compiled = None
