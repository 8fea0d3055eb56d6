"""Device pinning and the per-GPU supervisor (with stand-in children: no GPU here)."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from stylequeue.errors import ConfigError
from stylequeue.worker.devices import Supervisor, check_device_usable, pin_device, visible_device


def test_pin_gpu_sets_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pin_device("gpu:3")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert visible_device("gpu:3") == "gpu:0"  # the pinned process sees its one card as gpu:0
    pin_device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert visible_device("cpu") == "cpu"


def test_supervisor_restarts_a_crashed_child_and_stops_on_sigterm(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    # The child records each start; the first start crashes, later ones run until terminated.
    child = ("import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) "
             "if p.exists() else 0; p.write_text('x' * (n + 1)); "
             "sys.exit(3) if n == 0 else time.sleep(60)")
    supervisor = Supervisor({"gpu0": [sys.executable, "-c", child, str(marker)],
                             "gpu1": [sys.executable, "-c", "import time; time.sleep(60)"]}, max_backoff_s=0.2)
    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.setdefault("code", supervisor.run(install_signals=False,
                                                                                       poll_s=0.05)))
    runner.start()
    deadline = time.monotonic() + 30
    while (not marker.exists() or len(marker.read_text()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(marker.read_text()) == 2  # crashed once, restarted once
    assert supervisor.children[0].restarts == 1 and supervisor.children[1].restarts == 0
    supervisor.stop(signal.SIGTERM)
    runner.join(30)
    assert not runner.is_alive()
    assert all(c.process is not None and c.process.poll() is not None for c in supervisor.children)


def test_supervisor_does_not_restart_a_configuration_error() -> None:
    supervisor = Supervisor({"gpu0": [sys.executable, "-c", "import sys; sys.exit(2)"]}, max_backoff_s=0.1)
    assert supervisor.run(install_signals=False, poll_s=0.05) == 2
    assert supervisor.children[0].restarts == 0


def test_supervisor_gives_up_on_a_child_that_fails_the_same_way_at_start() -> None:
    supervisor = Supervisor({"gpu0": [sys.executable, "-c", "import sys; sys.exit(3)"]}, max_backoff_s=0.05,
                            fast_fail_s=30, fast_fail_limit=3)
    assert supervisor.run(install_signals=False, poll_s=0.02) == 3
    assert supervisor.children[0].restarts == 2  # three starts, three identical quick failures
    assert "gpu0 exited 3 within 30 s of its start 3 times in a row" in supervisor.reasons["gpu0"]


def test_supervisor_reports_a_child_killed_by_a_signal_as_128_plus_n() -> None:
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    supervisor = Supervisor({"gpu0": [sys.executable, "-c", suicide],
                             "gpu1": [sys.executable, "-c", "import sys; sys.exit(0)"]},
                            max_backoff_s=0.05, fast_fail_limit=2)
    assert supervisor.run(install_signals=False, poll_s=0.02) == 128 + signal.SIGKILL
    assert list(supervisor.reasons) == ["gpu0"]


def test_a_gpu_device_without_any_runtime_that_can_drive_it_is_a_configuration_error() -> None:
    import paddle

    check_device_usable("cpu")
    if paddle.device.is_compiled_with_cuda():
        pytest.skip("this Paddle has CUDA: gpu devices are usable here")
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this PyTorch sees a GPU: gpu devices are usable here")
    with pytest.raises(ConfigError, match="can use a GPU.*paddlepaddle-gpu.*stylequeue\\[torch\\].*--device cpu"):
        check_device_usable("gpu:0")
