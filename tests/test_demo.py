"""`stylequeue demo` end to end (embedded Redis, real worker, callbacks, contact sheet), and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from stylequeue.demo import DEMO_ASSETS, contact_sheet, run_demo
from tests.workers import processes_mentioning

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path: Path, tiny_registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEQUEUE_RUNTIME", "dygraph")
    out = tmp_path / "demo"
    result = run_demo(out, style="tiny", registry=tiny_registry, timeout=180)
    photos = sorted(p for p in DEMO_ASSETS.iterdir() if p.suffix == ".jpg")
    assert len(result.jobs) == len(photos) >= 4
    for record in result.jobs:
        assert record["state"] == "succeeded", record["error"]
        output = Path(record["output_uri"].removeprefix("file://"))
        assert output.exists() and output.parent == out / "outputs"
        assert max(Image.open(output).size) == 64  # the tiny style's working size
        assert result.callbacks[record["id"]] == {"state": "succeeded", "verified": True}
    sheet = Image.open(result.sheet)
    assert sheet.format == "PNG" and sheet.height > 4 * 100
    assert not processes_mentioning(str(out)), "the demo left its Redis or worker running"


def test_demo_command_stops_cleanly_on_ctrl_c(tmp_path: Path, tiny_registry: Path) -> None:
    out = tmp_path / "demo-int"
    env = dict(os.environ, STYLEQUEUE_STYLES=str(tiny_registry), STYLEQUEUE_RUNTIME="dygraph")
    demo = subprocess.Popen([sys.executable, "-m", "stylequeue", "demo", "--out", str(out), "--style", "tiny"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (out / "run" / "worker.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    demo.send_signal(signal.SIGINT)
    demo.wait(90)
    assert demo.returncode in (0, 130)
    assert not processes_mentioning(str(out)), "Ctrl-C left the demo's Redis or worker running"


def test_contact_sheet_marks_failed_outputs(tmp_path: Path) -> None:
    before = tmp_path / "a.png"
    Image.new("RGB", (200, 100), (200, 30, 30)).save(before)
    sheet = contact_sheet([(before, before, "ok"), (before, None, "failed")], tmp_path / "s.png", cell=120)
    image = Image.open(sheet).convert("RGB")
    assert image.width == 2 * 120 + 3 * 14
    red = sum(1 for px in image.getdata() if px[0] > 150 and px[1] < 80)
    assert red >= 3 * 120 * 60 * 0.9  # three thumbnails of the red input (two 'before', one 'after')
