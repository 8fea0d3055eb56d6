"""The README's "Your own photos in five minutes", run as written: its own shell blocks and receiver.py, taken
from README.md itself, against `stylequeue serve` started in a fresh directory as step 1 says.

Adapted only where a test must: free ports instead of serve's fixed defaults (and the receiver's 9100), HOME
pointing at a directory whose Pictures/me.jpg is a generated photo, the `dygraph` runtime so the first start
skips exporting and timing the model, and no S3 (step 3 needs a moto server on port 9000: tests/test_uploads.py
and the storage tests cover S3).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stylequeue.embedded import free_port
from tests.workers import make_image, processes_mentioning, wait_for

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The text of the README's `### {title}` subsection."""
    text = README.read_text()
    start = text.index(f"### {title}")
    ends = [i for i in (text.find("\n### ", start + 4), text.find("\n## ", start + 4)) if i != -1]
    return text[start:min(ends, default=len(text))]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A directory standing in for a checkout (its .venv is this interpreter's) with `stylequeue serve` running
    in it as step 1 starts it; yields the directory and the environment of a new terminal."""
    home = tmp_path / "home"
    (home / "Pictures").mkdir(parents=True)
    (home / "Pictures" / "me.jpg").write_bytes(make_image(96, 64, "JPEG"))
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    terminal = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    terminal.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    step1 = section("1. Start a server")
    assert "export STYLEQUEUE_ALLOW_PRIVATE_NETWORKS=true" in step1 and "stylequeue serve" in step1
    server_env = dict(terminal, STYLEQUEUE_ALLOW_PRIVATE_NETWORKS="true", STYLEQUEUE_RUNTIME="dygraph")
    argv = [sys.executable, "-m", "stylequeue", "serve", "--redis-port", str(free_port()),
            "--api-port", str(free_port())]
    log = tmp_path / "serve.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(argv, env=server_env, cwd=work, stdout=sink, stderr=subprocess.STDOUT)
    data = work / "stylequeue-data"
    try:
        assert wait_for(lambda: (data / "client.env").exists() or server.poll() is not None, timeout=240), \
            log.read_text()[-3000:]
        assert server.poll() is None, log.read_text()[-3000:]
        yield work, terminal
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(90) == 0, log.read_text()[-3000:]
    assert wait_for(lambda: not processes_mentioning(str(data)), timeout=20), "serve left processes running"


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_the_five_minute_guide_works_as_written(checkout: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    work, terminal = checkout

    # Step 2, terminal 2: a photo of one's own restyled through the local server.
    (step2,) = blocks(section("2. Restyle a photo on this machine"), "bash")
    done = bash(step2, work, terminal)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout, done.stdout
    outputs = work / "stylequeue-data" / "files" / "outputs" / "ink-demo"
    restyled = sorted(outputs.glob("j_*.jpg"))
    assert len(restyled) == 1 and restyled[0].name in done.stdout and restyled[0].stat().st_size > 0

    # Step 4: receiver.py verifies a signed callback with the secret from client.env.
    guide = section("4. Receive a signed callback")
    (receiver,) = blocks(guide, "python")
    shell = blocks(guide, "bash")[0]
    port = str(free_port())
    assert "9100" in receiver and "9100" in shell
    (work / "receiver.py").write_text(receiver.replace("9100", port))
    sourced = "set -a; . stylequeue-data/client.env; set +a\n"  # terminal 2 sourced it in step 2
    heard = tmp_path / "receiver.out"
    script = ". .venv/bin/activate\n" + sourced + shell.replace("9100", port).replace(
        "python receiver.py &", f"python receiver.py > {heard} 2>&1 &\necho $! > receiver.pid\nsleep 1")
    submitted = bash(script, work, terminal)
    try:
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job_id = submitted.stdout.strip().splitlines()[-1]
        assert job_id.startswith("j_"), submitted.stdout
        assert wait_for(lambda: heard.exists() and "verified:" in heard.read_text(), timeout=90), \
            heard.read_text() if heard.exists() else "the receiver printed nothing"
        said = heard.read_text()
        assert f'"id": "{job_id}"' in said or f'"id":"{job_id}"' in said, said
        assert '"succeeded"' in said and "rejected" not in said, said
    finally:
        pid = (work / "receiver.pid").read_text().strip() if (work / "receiver.pid").exists() else ""
        if pid:
            os.kill(int(pid), signal.SIGTERM)
            time.sleep(0.2)
