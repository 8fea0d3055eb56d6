"""Device pinning and the per-GPU supervisor.

A worker process serves one device. `--device gpu:N` must take effect before Paddle initialises
CUDA, so it is set through CUDA_VISIBLE_DEVICES (the process then sees that card as gpu:0).
`--gpus 0,1` starts one such process per GPU and restarts any that crash. The GPU paths cannot run
on this project's CI machines; they follow Paddle's documented device selection and stay thin.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from stylequeue.errors import ConfigError

log = logging.getLogger("stylequeue.worker.devices")

PADDLE_GPU_INDEX = "https://www.paddlepaddle.org.cn/packages/stable/cu126/"


def pin_device(device: str, *, cpu_threads: int | None = None) -> None:
    """Make `device` this process's only device; call before anything imports Paddle."""
    if device.startswith("gpu:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    threads = str(cpu_threads or os.cpu_count() or 1)
    # oneDNN/OpenMP read these at start-up: one inference thread per core, not per logical task thread.
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)


def check_device_usable(device: str) -> None:
    """Raise ConfigError (one line, exit 2) when no runtime installed here can run on `device`.

    The one place that knows which runtimes can drive a GPU: a CUDA build of Paddle, or PyTorch seeing a CUDA
    device. Asking either initialises no CUDA context, so it may run before or after pin_device.
    """
    if not device.startswith("gpu:"):
        return
    if _paddle_has_cuda() or _torch_has_cuda():
        return
    raise ConfigError(
        f"cannot use {device}: neither Paddle nor PyTorch here can use a GPU; install paddlepaddle-gpu 3.x from "
        f"Paddle's index (pip install 'paddlepaddle-gpu==3.*' -i {PADDLE_GPU_INDEX}) in place of paddlepaddle, or a "
        "CUDA build of PyTorch with 'stylequeue[torch]', or use --device cpu"
    )


def _paddle_has_cuda() -> bool:
    try:
        import paddle
    except ImportError:
        return False
    return bool(paddle.device.is_compiled_with_cuda())


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def visible_device(device: str) -> str:
    """The device name inside a pinned process: the one GPU it sees is gpu:0."""
    return "gpu:0" if device.startswith("gpu:") else "cpu"


@dataclass
class _Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = 1.0
    next_start: float = 0.0
    last_code: int = 0
    quick_failures: int = 0  # exits in a row, each within fast_fail_s of its start, all with last_code


def exit_status(code: int) -> int:
    """A Popen return code as a shell would report it: killed by signal N is 128 + N."""
    return 128 - code if code < 0 else code


class Supervisor:
    """Runs one child process per argv, restarting crashed ones with backoff; SIGTERM/SIGINT stop all.

    A child is not restarted when it exits 0 (a clean shutdown) or 2 (a configuration error, which a
    restart cannot fix), nor once it has failed `fast_fail_limit` times in a row within `fast_fail_s`
    of its start with the same exit code (a crash at start-up that a restart only repeats). `reasons`
    says, per child, why it was given up.
    """

    def __init__(self, children: Mapping[str, Sequence[str]], *, max_backoff_s: float = 60.0,
                 fast_fail_s: float = 30.0, fast_fail_limit: int = 3,
                 popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen) -> None:
        self.children = [_Child(name, list(argv)) for name, argv in children.items()]
        self.max_backoff_s = max_backoff_s
        self.fast_fail_s = fast_fail_s
        self.fast_fail_limit = fast_fail_limit
        self.popen = popen
        self.reasons: dict[str, str] = {}
        self._stopping = False

    def _start(self, child: _Child) -> None:
        child.process = self.popen(child.argv)
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def stop(self, *_: object) -> None:
        self._stopping = True
        for child in self.children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    def run(self, *, install_signals: bool = True, poll_s: float = 0.5) -> int:
        """Supervise until stopped or every child has ended for good; returns the worst exit status."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        for child in self.children:
            self._start(child)
        codes: dict[str, int] = {}
        while len(codes) < len(self.children):
            for child in self.children:
                if child.name in codes:
                    continue
                if child.process is None:  # crashed, waiting for its restart
                    if self._stopping:
                        codes[child.name] = child.last_code
                    elif time.monotonic() >= child.next_start:
                        self._start(child)
                    continue
                code = child.process.poll()
                if code is None:
                    continue
                if self._stopping or code == 0:
                    codes[child.name] = code
                elif self._given_up(child, code):
                    codes[child.name] = code
                else:
                    self._schedule_restart(child, code)
            time.sleep(poll_s)
        return max((exit_status(code) for code in codes.values()), default=0)

    def _given_up(self, child: _Child, code: int) -> bool:
        ran_s = time.monotonic() - child.started_at
        if ran_s > self.fast_fail_s:
            child.quick_failures = 0
        elif child.quick_failures and code == child.last_code:
            child.quick_failures += 1
        else:
            child.quick_failures = 1
        if code == 2:
            reason = f"{child.name} exited 2, a configuration error a restart cannot fix"
        elif child.quick_failures >= self.fast_fail_limit:
            reason = (f"{child.name} exited {exit_status(code)} within {self.fast_fail_s:.0f} s of its start "
                      f"{child.quick_failures} times in a row")
        else:
            return False
        self.reasons[child.name] = reason
        log.error("%s; not restarting it", reason)
        return True

    def _schedule_restart(self, child: _Child, code: int) -> None:
        if time.monotonic() - child.started_at > 60:
            child.backoff_s = 1.0  # it ran a while: a fresh crash, not a crash loop
        child.restarts += 1
        child.last_code = code
        log.warning("%s exited with %d; restarting in %.0f s (restart %d)", child.name, code,
                    child.backoff_s, child.restarts)
        child.process = None
        child.next_start = time.monotonic() + child.backoff_s
        child.backoff_s = min(child.backoff_s * 2, self.max_backoff_s)
