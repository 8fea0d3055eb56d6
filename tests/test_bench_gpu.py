"""bench/gpu.py runs on the CPU with --smoke, so the script a GPU session carries cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("torch", reason="PyTorch is not installed: `make torch` or pip install 'stylequeue[torch]'")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_prints_every_section() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"], capture_output=True,
                            text=True, timeout=240, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "### Raw `torch` runtime" in out and re.search(r"\| eager \| 8 \| [\d,]+ \|", out)
    worker = re.search(r"\| worker \| ([\d,]+) \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+) \| (\d+) \|", out)
    assert worker and float(worker.group(1).replace(",", "")) > 0 and worker.group(5) == "0"
    assert 0 < float(worker.group(4)) < 4  # the worker's main process: some CPU, within reason
    cpu_decoding = re.search(
        r"\| CPU \(simplejpeg DCT scaling / Pillow draft\) \| ([\d,]+) \| [\d.]+% \| [\d.]+ \| (\d+) \|", out)
    assert cpu_decoding and cpu_decoding.group(2) == "0"
    assert "| GPU (nvJPEG in the codec processes) | not available here |" in out
