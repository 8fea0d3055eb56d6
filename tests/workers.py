"""Helpers for tests that run real `stylequeue worker` processes, callback receivers and test images."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stylequeue.config.redis_url import redis_client
from stylequeue.jobs import Presence, RedisJobStore


def make_image(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def worker_env(redis_url: str, registry: Path, storage_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "STYLEQUEUE_REDIS_URL": redis_url,
        "STYLEQUEUE_STYLES": str(registry),
        "STYLEQUEUE_STORAGE_URL": storage_url,
        "STYLEQUEUE_RUNTIME": "dygraph",
        "STYLEQUEUE_ALLOW_PRIVATE_NETWORKS": "true",
        "STYLEQUEUE_LEASE_S": "3",
        "STYLEQUEUE_VISIBILITY_TIMEOUT_S": "5",
        "STYLEQUEUE_MAX_WAIT_MS": "20",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({f"STYLEQUEUE_{k.upper()}": v for k, v in extra.items()})
    env.pop("GLOG_minloglevel", None)  # an in-process restyle() may have set it; the worker must quiet Paddle itself
    return env


class WorkerProcess:
    """A real `stylequeue worker` subprocess; its log goes to a file for post-mortems."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stylequeue", "worker", "--loglevel", "info", *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.store = RedisJobStore(redis_client(env["STYLEQUEUE_REDIS_URL"]))  # redis+sentinel:// too

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            for info in Presence(self.store).workers().values():
                if info.get("pid") == self.process.pid and info.get("ready"):
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


class CallbackReceiver:
    """A local HTTP server recording POSTed callbacks; `statuses` scripts its answers in order."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.received.append({"headers": dict(self.headers), "body": body, "status": status,
                                          "at": time.time()})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def slow_image(image: bytes, hold_s: float) -> type[BaseHTTPRequestHandler]:
    """An HTTP input that answers every GET with `image`, after `hold_s` seconds (a job that takes that long)."""

    class SlowImage(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            time.sleep(hold_s)
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args: object) -> None:
            pass

    return SlowImage


@contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run `handler` on a threaded HTTP server on a free loopback port; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment mentions `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(entry.name))
    return found
