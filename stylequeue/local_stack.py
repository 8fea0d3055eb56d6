"""The whole system as child processes of one command (`demo`, `serve`): an embedded Redis, a worker, a gateway.

`start_stack` starts the Redis and one `stylequeue worker` wired to it; `LocalStack.stop` ends them in
reverse order (gateway, worker and its codec processes, Redis), so Ctrl-C leaves nothing running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylequeue.embedded import EmbeddedRedis
from stylequeue.errors import ConfigError
from stylequeue.jobs.presence import Presence


def _end(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; then the rest of its session (it leads one)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # A worker's codec processes exit on their own once it is gone, but one stopped while starting
    # up may leave them importing for a moment.
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class LocalStack:
    """An embedded Redis, one worker process and optionally the HTTP gateway, with the environment they share."""

    redis: EmbeddedRedis
    worker: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path
    gateway: subprocess.Popen[bytes] | None = None

    def worker_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.gateway is not None:
            _end(self.gateway, 30)
        _end(self.worker, 60)
        self.redis.stop()


def spawn(argv: list[str], env: dict[str, str], log_path: Path, *, fresh_log: bool = False) -> subprocess.Popen[bytes]:
    """`python -m stylequeue ARGV` in its own session, stdout and stderr appended to (or replacing) `log_path`."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if fresh_log else os.O_APPEND)
    log = os.fdopen(os.open(log_path, flags, 0o600), "wb")  # logs name URLs: owner only
    try:
        return subprocess.Popen([sys.executable, "-m", "stylequeue", *argv], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def start_stack(redis_server: EmbeddedRedis, settings_env: dict[str, str], *, log_path: Path,
                worker_args: list[str] | None = None, fresh_log: bool = False) -> LocalStack:
    """Start `redis_server` and `stylequeue worker` wired to it (settings from the environment, then `settings_env`)."""
    redis_server.start()
    env = dict(os.environ) | settings_env | {"STYLEQUEUE_REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1"}
    env.pop("STYLEQUEUE_BROKER_URL", None)
    try:
        worker = spawn(["worker", *(worker_args or [])], env, log_path, fresh_log=fresh_log)
    except BaseException:
        redis_server.stop()
        raise
    return LocalStack(redis_server, worker, env, log_path)


def wait_worker_ready(stack: LocalStack, store: Any, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.worker.poll() is not None:
            tail = "\n".join(stack.worker_log().splitlines()[-15:])
            raise ConfigError(f"the worker exited with code {stack.worker.returncode}:\n{tail}")
        if any(w.get("pid") == stack.worker.pid and w.get("ready") for w in Presence(store).workers().values()):
            return
        time.sleep(0.2)
    raise ConfigError(f"the worker was not ready within {timeout:.0f} s; see {stack.log_path}")
