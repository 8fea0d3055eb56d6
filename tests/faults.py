"""Real faults for tests and bench/soak.py: a dependency that goes away and comes back on the same port, a
webhook receiver that refuses or never answers, and a fleet of real `stylequeue worker` processes to kill,
stop and freeze.

- `TcpForwarder`: listens on a port and forwards each connection to a target (moto, Redis). `off()` closes
  the listener and every open connection, so pooled clients lose theirs and new ones are refused; `on()`
  listens on the same port again. What a store behind a load balancer looks like when it goes down.
- `WebhookReceiver`: records each delivery with its headers and whether `stylequeue.verify_webhook` accepts
  its signature; `refuse()` stops listening (connections refused), `accept()` comes back on the same port.
- `HangingReceiver`: accepts connections and never answers (a receiver stuck behind a dead upstream).
- `RestartableRedis`: an AOF-persisted Redis on a fixed port and data directory, stopped and started again as
  an operator's restart does (every key survives).
- `Fleet`: N worker processes (tests/workers.py `WorkerProcess`) with kill -9, SIGTERM, SIGSTOP/SIGCONT.
- `held_by`: the (job, attempt) pairs the job store says a worker holds (what a killed worker left).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from stylequeue import verify_webhook
from stylequeue.embedded import EmbeddedRedis, free_port
from tests.workers import WorkerProcess

# How often blocking loops look up to see whether they were told to stop.
_POLL_S = 0.2
_CHUNK = 65536


def _listen(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:`port`, reusable at once after a close (TIME_WAIT is no obstacle)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    sock.settimeout(_POLL_S)
    return sock


def _close(sock: socket.socket) -> None:
    """Close a connected socket so that a thread blocked in recv on it wakes up."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Listener:
    """A loopback port that can stop listening and listen again on the same number; `handle` gets each
    accepted connection on the accept thread (it must not block)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def on(self) -> None:
        """Listen (again) on the same port."""
        if self._sock is not None:
            return
        self._sock = _listen(self.port)
        self._thread = threading.Thread(target=self._accept, args=(self._sock,), name=f"listen-{self.port}",
                                        daemon=True)
        self._thread.start()

    def off(self) -> None:
        """Stop listening (new connections are refused) and cut every open connection."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._thread is not None:
            self._thread.join(5)
        sock.close()
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            _close(conn)

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.add(conn)

    def forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.discard(conn)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def _accept(self, sock: socket.socket) -> None:
        while self._sock is sock:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.handle(conn)


class TcpForwarder(_Listener):
    """Forwards connections from 127.0.0.1:`port` to `target`; switch it `off()` and `on()` at will.

    Starts listening at once. `url` is what a client configures instead of the target's address.
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        super().__init__(port)
        self.target = (target_host, target_port)
        self.on()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:  # the target itself is down: the client sees its connection closed
            _close(conn)
            return
        upstream.settimeout(None)
        self.track(conn)
        self.track(upstream)
        for src, dst in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
        except OSError:
            pass
        # One side finished or was cut: end both, as a dead proxy would.
        for sock in (src, dst):
            self.forget(sock)
            _close(sock)

    def close(self) -> None:
        self.off()


class HangingReceiver(_Listener):
    """Accepts HTTP connections, reads nothing, answers nothing: every request waits for its own timeout.

    `accepted_at` holds the wall-clock time of each connection it took.
    """

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.accepted_at: list[float] = []
        self.on()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def handle(self, conn: socket.socket) -> None:
        self.track(conn)
        with self._lock:
            self.accepted_at.append(time.time())

    def close(self) -> None:
        self.off()


@dataclass(frozen=True)
class Delivery:
    """One webhook POST as the receiver saw it."""

    headers: dict[str, str]
    body: bytes
    at: float
    verified: bool
    error: str | None

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def record(self) -> dict[str, Any]:
        return json.loads(self.body)


class WebhookReceiver:
    """A webhook endpoint on a fixed loopback port that can refuse connections for a while.

    Every POST is answered `status` (200 by default), `delay_s` after it arrived (a receiver doing real
    work), and recorded as a `Delivery`, `verified` when `verify_webhook(secret, ...)` accepts it (always
    False without a secret).
    """

    def __init__(self, secret: str | None = None, port: int | None = None, status: int = 200,
                 delay_s: float = 0.0) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.status = status
        self.delay_s = delay_s
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.accept()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accept(self) -> None:
        """Listen (again) on the same port."""
        if self._server is not None:
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver._record(dict(self.headers), body)
                time.sleep(receiver.delay_s)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # allow_reuse_address is set
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self._server = server

    def refuse(self) -> None:
        """Stop listening: every connection attempt is refused until `accept()`."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def close(self) -> None:
        self.refuse()

    def _record(self, headers: dict[str, str], body: bytes) -> None:
        lowered = {name.lower(): value for name, value in headers.items()}
        error = None
        try:
            if self.secret is None:
                raise ValueError("no secret to verify with")
            verify_webhook(self.secret, lowered, body)
        except Exception as exc:  # recorded, not raised: the test asserts on it
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.deliveries.append(Delivery(lowered, body, time.time(), error is None, error))

    def received(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def by_job(self) -> dict[str, list[Delivery]]:
        """Deliveries grouped by the job id in their body."""
        grouped: dict[str, list[Delivery]] = {}
        for delivery in self.received():
            grouped.setdefault(delivery.record["id"], []).append(delivery)
        return grouped


class RestartableRedis:
    """An AOF-persisted Redis on a fixed port that a test (or bench/soak.py) can stop and start again."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server = EmbeddedRedis(data_dir=data_dir, persist=True).start()
        self.port = self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()  # SIGTERM: Redis flushes its AOF and exits cleanly

    def start(self, timeout: float = 60) -> None:
        """Start again on the same port and data directory (a large AOF takes a while to load)."""
        self.server = EmbeddedRedis(data_dir=self.data_dir, port=self.port, persist=True).start(timeout)


def worker_id(worker: WorkerProcess) -> str:
    """The owner id a `stylequeue worker` process writes in leases (WorkerOptions' default: host-pid)."""
    return f"{socket.gethostname()}-{worker.process.pid}"


def held_by(client: redis.Redis, owner: str, key_prefix: str = "sq:") -> list[tuple[str, int]]:
    """(job id, attempt) of every running job whose lease names `owner`, read from the job store."""
    ids = [raw.decode() for raw in client.zrange(f"{key_prefix}running", 0, -1)]
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(f"{key_prefix}job:{job_id}", "owner", "attempts")
    held = []
    for job_id, (raw_owner, raw_attempts) in zip(ids, pipe.execute(), strict=True):
        if raw_owner and json.loads(raw_owner) == owner:
            held.append((job_id, int(raw_attempts or 0)))
    return held


class Fleet:
    """Real `stylequeue worker` processes sharing one environment; logs go to `log_dir/w{n}.log`.

    A worker frozen with `freeze` is thawed before it is stopped, so `stop_all` always ends every process.
    """

    def __init__(self, env: dict[str, str], log_dir: Path, *args: str) -> None:
        self.env = env
        self.log_dir = log_dir
        self.args = args
        self.workers: list[WorkerProcess] = []
        self.frozen: set[int] = set()
        self._started = 0

    def start(self, count: int = 1, timeout: float = 180, *, wait: bool = True) -> list[WorkerProcess]:
        """Start `count` workers at once and (unless `wait` is False) wait until each is ready."""
        new = []
        for _ in range(count):
            self._started += 1
            new.append(WorkerProcess(self.env, self.log_dir / f"w{self._started}.log", *self.args))
        self.workers += new
        if wait:
            for worker in new:
                worker.wait_ready(timeout)
        return new

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.process.poll() is None]

    def kill9(self, worker: WorkerProcess) -> None:
        """SIGKILL: no shutdown code runs (an OOM kill, a node lost)."""
        worker.kill()
        self.frozen.discard(worker.process.pid)

    def sigterm(self, worker: WorkerProcess, timeout: float = 120) -> int:
        """SIGTERM and wait for the exit (a rolling update); returns the exit status."""
        return worker.stop(timeout)

    def freeze(self, worker: WorkerProcess) -> None:
        """SIGSTOP: the process keeps its sockets and leases but does nothing (a long GC pause, a VM stall)."""
        os.kill(worker.process.pid, signal.SIGSTOP)
        self.frozen.add(worker.process.pid)

    def thaw(self, worker: WorkerProcess) -> None:
        os.kill(worker.process.pid, signal.SIGCONT)
        self.frozen.discard(worker.process.pid)

    def stop_all(self, timeout: float = 120) -> list[int]:
        """Stop every live worker (thawing frozen ones first); returns their exit statuses."""
        for worker in self.live():
            if worker.process.pid in self.frozen:
                self.thaw(worker)
        codes = []
        for worker in self.workers:
            if worker.log.closed:
                continue
            try:
                codes.append(worker.stop(timeout))
            except subprocess.TimeoutExpired:
                worker.kill()
                codes.append(-9)
        return codes

    def outputs(self) -> str:
        """Every worker's log, for a failing assertion's message (the tail of each)."""
        return "\n".join(f"--- {w.log_path.name} (pid {w.process.pid}) ---\n"
                         f"{w.log_path.read_text(errors='replace')[-2000:]}" for w in self.workers)

    def pids(self, workers: Sequence[WorkerProcess] | None = None) -> list[int]:
        return [w.process.pid for w in (workers if workers is not None else self.workers)]
