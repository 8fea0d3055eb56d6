"""The child processes of `demo` and `serve`: how their logs are kept."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stylequeue.local_stack import spawn


def test_a_fresh_log_replaces_the_last_runs_and_an_appended_one_keeps_it(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("last run's lines\n")
    spawn(["--help"], dict(os.environ), log, fresh_log=True).wait(60)
    text = log.read_text()
    assert "last run's lines" not in text and "Usage:" in text  # demo: worker.log no longer grows across runs
    spawn(["--help"], dict(os.environ), log).wait(60)
    assert log.read_text().count("Usage:") == 2  # serve: a service's log is appended to
    fresh = tmp_path / "new.log"
    spawn(["--help"], dict(os.environ), fresh).wait(60)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600  # logs name URLs: owner only
