"""The `torch` runtime: a style's weights in PyTorch (torch_generator.py), on the CPU or one CUDA GPU.

It reads the weights files themselves (weights.load_for_spec: `.pdparams`, full CycleGAN checkpoints,
`.pth`), never an export, so it needs no Paddle: a GPU machine with PyTorch alone serves with it.

Three ways in, one model:
- `run(float32 [N,3,H,W] in [-1,1])`: the `Runtime` protocol (the 40 dB gate, tests).
- `run_pixels(uint8 [N,H,W,3])`: the worker's path; conversion to and from [-1,1] happens on the device,
  so only uint8 crosses the bus (a quarter of float32's bytes).
- `start(pixels)` -> `finish()`: `run_pixels` split in two, so the batcher can form and upload the next
  batch while this one computes (worker/batching.py).

Precisions: fp32 everywhere; bf16 (CPUs with bf16 units, and GPUs); fp16 on GPUs. The weights are cast
to the precision; instance norm accumulates in fp32 inside PyTorch's kernels either way.

Everything that only a GPU does sits in `_CudaPath`: pinned host buffers, a stream each for upload,
compute and download (batch N+1's upload and batch N's download overlap batch N's compute), and
`torch.compile` of the shape the worker serves most (`warm`). `_CpuPath` has the same interface with
plain tensors, so the CPU tests run every other line of this module.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stylequeue.config.styles import StyleSpec
from stylequeue.errors import ConfigError
from stylequeue.models.runtime_backends import default_threads, gpu_index
from stylequeue.models.torch_generator import ResnetGenerator, load_paddlegan_state
from stylequeue.models.weights import load_for_spec

logger = logging.getLogger("stylequeue.models")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# torch.compile's mode for the served shape on a GPU. Measured on an H100 (docs/performance.md): fp16 NHWC compiled with
# max-autotune 3,211 img/s at batch 64 vs 1,241 eager; without CUDA graphs here because the runtime
# runs on its own streams. bench/gpu.py times it against eager on the card.
COMPILE_MODE = "max-autotune-no-cudagraphs"
_PINNED_SHAPES = 8  # pinned buffer pairs kept, one pair per batch shape, least recently used dropped

Finish = Callable[[], np.ndarray]


def _visible_index(index: int) -> int:
    """CUDA's index of physical GPU `index`: a worker pinned with CUDA_VISIBLE_DEVICES=3 sees gpu:3 as cuda:0."""
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return visible.index(str(index)) if str(index) in visible else index


class _CpuPath:
    """The CPU's side of the seam: plain tensors, synchronous; `finish` just hands the result back."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def start(self, pixels: np.ndarray, compute: Callable[[torch.Tensor], torch.Tensor]) -> Finish:
        out = compute(torch.from_numpy(np.ascontiguousarray(pixels)))
        result = out.numpy()
        return lambda: result

    def compiled(self, model: torch.nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return None  # inductor on the CPU needs a compiler toolchain and gained nothing measured here


class _CudaPath:  # pragma: no cover - runs on GPU machines only (bench/gpu.py)
    """One CUDA device: pinned host buffers, an upload, a compute and a download stream, events between."""

    def __init__(self, index: int) -> None:
        if not torch.cuda.is_available():
            raise ConfigError("device gpu:N asked for, but this PyTorch sees no CUDA GPU (a CPU-only build?)")
        self.device = torch.device(f"cuda:{_visible_index(index)}")
        torch.cuda.set_device(self.device)
        self._upload = torch.cuda.Stream(self.device)
        self._compute = torch.cuda.Stream(self.device)
        self._download = torch.cuda.Stream(self.device)
        # Two pinned slots per shape, alternating: batch N+1 fills one while batch N's is still in use.
        self._slots: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._turn = 0

    def _slot(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._slots.get(shape)
        if pair is None:
            pair = [(torch.empty(shape, dtype=torch.uint8, pin_memory=True),
                     torch.empty(shape, dtype=torch.uint8, pin_memory=True)) for _ in range(2)]
            self._slots[shape] = pair
            while len(self._slots) > _PINNED_SHAPES:
                self._slots.popitem(last=False)
        self._slots.move_to_end(shape)
        self._turn ^= 1
        return pair[self._turn]

    def start(self, pixels: np.ndarray, compute: Callable[[torch.Tensor], torch.Tensor]) -> Finish:
        host_in, host_out = self._slot(tuple(pixels.shape))
        host_in.numpy()[...] = pixels  # the one CPU copy: into pinned memory, so the upload is a DMA
        with torch.cuda.stream(self._upload):
            device_in = host_in.to(self.device, non_blocking=True)
        self._compute.wait_stream(self._upload)
        with torch.cuda.stream(self._compute):
            device_in.record_stream(self._compute)  # allocated on the upload stream, used here
            device_out = compute(device_in)
        self._download.wait_stream(self._compute)
        with torch.cuda.stream(self._download):
            device_out.record_stream(self._download)
            host_out.copy_(device_out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._download)

        def finish() -> np.ndarray:
            done.synchronize()
            return host_out.numpy().copy()  # the slot is reused two batches later

        return finish

    def compiled(self, model: torch.nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return torch.compile(model, mode=mode, dynamic=False)  # type: ignore[return-value]


class TorchRuntime:
    """The generator in PyTorch for one style; `run*` calls are serialised (one model, one stream set).

    Args:
        precision: fp32, bf16 or fp16 (fp16 on GPUs only).
        device: cpu or gpu:N.
        threads: CPU threads (torch.set_num_threads is per process); default all cores of the process.
        cache_dir: where torch.compile's on-disk cache goes (`{cache_dir}/torch-inductor`).
        compile_mode: torch.compile mode for `warm`'s shape on a GPU; None compiles nothing.
    """

    name = "torch"

    def __init__(self, spec: StyleSpec, *, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
                 cache_dir: str | Path | None = None, compile_mode: str | None = COMPILE_MODE) -> None:
        if precision not in _DTYPES:
            raise ConfigError(f"torch runs fp32, bf16 or fp16, not {precision}")
        index = gpu_index(device)
        if index is None and precision == "fp16":
            raise ConfigError("torch runs fp16 on GPUs only; on a CPU use fp32 or bf16")
        self.precision = precision
        self.device = device
        self._dtype = _DTYPES[precision]
        self._path: Any = _CpuPath() if index is None else _CudaPath(index)
        if index is None:
            torch.set_num_threads(threads or default_threads())
        elif precision == "fp32":
            # fp32 means fp32: cuDNN would otherwise run convolutions in TF32 (measured: 69.7 dB, not exact).
            torch.backends.cudnn.allow_tf32 = False
        if index is not None and compile_mode and cache_dir is not None:
            # Inductor reads its cache location from the environment when it compiles; under cache_dir a
            # restarted worker finds its compiled kernels again.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "torch-inductor"))
        self._compile_mode = compile_mode if index is not None else None
        model = ResnetGenerator(ngf=spec.ngf, n_blocks=spec.n_blocks, use_dropout=spec.use_dropout)
        load_paddlegan_state(model, load_for_spec(spec))
        self._model = model.eval().requires_grad_(False).to(self._path.device, self._dtype)
        self._fast: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] = {}
        self._lock = threading.Lock()

    # --- the model on the device ---------------------------------------------------------------

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast.get(tuple(x.shape))
        with torch.inference_mode():
            if fast is not None:  # compiled kernels want NHWC; eager NCHW was faster (1,194 vs 885 img/s)
                return fast(x.contiguous(memory_format=torch.channels_last))
            return self._model(x.contiguous())

    def _pixels_through(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] on the device -> uint8 [N,H,W,3] on the device."""
        with torch.inference_mode():
            x = pixels.permute(0, 3, 1, 2).to(self._dtype).mul_(1 / 127.5).sub_(1.0)
            y = self._forward(x).float()
            # round half to even, as numpy's rint in pipeline/images.py: the CPU path's bytes exactly
            return y.add_(1.0).mul_(127.5).clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    # --- the three ways in -----------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a float32 [N, 3, H, W] batch, got shape {list(batch.shape)}")
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._path.device, self._dtype)
            return self._forward(x).float().cpu().numpy()

    def start(self, pixels: np.ndarray) -> Finish:
        """Queue uint8 [N,H,W,3] pixels on the device; the returned `finish()` waits and returns the output."""
        if pixels.ndim != 4 or pixels.shape[3] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected uint8 [N, H, W, 3] pixels, got {pixels.dtype} {list(pixels.shape)}")
        with self._lock:
            return self._path.start(pixels, self._pixels_through)

    def run_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.start(pixels)()

    def warm(self, batch: int, height: int, width: int) -> float:
        """Compile the model for the shape the worker serves most (GPU only); returns the seconds it took.

        Other shapes keep running eagerly: compiling each new shape while jobs wait would stall them.
        """
        if not self._compile_mode:
            return 0.0
        started = time.perf_counter()
        # A channels-last copy of the weights for the compiled kernels (the measured 3,211 img/s were NHWC);
        # the eager model keeps NCHW. A copy of a 9-block generator is 23 MB in fp16.
        nhwc = copy.deepcopy(self._model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        compiled = self._path.compiled(nhwc, self._compile_mode)
        if compiled is None:
            return 0.0
        shape = (batch, 3, height, width)
        probe = np.zeros((batch, height, width, 3), np.uint8)
        with self._lock:
            self._fast[shape] = compiled
            self._path.start(probe, self._pixels_through)()  # the compile happens on this first call
        seconds = time.perf_counter() - started
        logger.info("torch: compiled %s %s for batch %d at %dx%d in %.1f s (mode %s)", self.precision,
                    self.device, batch, width, height, seconds, self._compile_mode)
        return seconds

    def close(self) -> None:
        self._fast.clear()
        self._model = None  # type: ignore[assignment]
