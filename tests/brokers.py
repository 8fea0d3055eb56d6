"""Private brokers for the suite: a RabbitMQ node and a Redis primary + replica + sentinel, each on free ports.

Neither touches the machine's own servers: the RabbitMQ node has its own name, ports, data and log
directories, configuration, Erlang cookie (HOME in its temp dir) and its own epmd; the Redis servers are
plain child processes of the suite. Tests that need a missing server skip with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from stylequeue.embedded import find_redis_server, free_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the Debian package's real script (not the sbin wrapper)
# Vhosts the node is created with, one per group of tests, so no test sees another's messages.
VHOSTS = ("e2e", "kill", "timeout", "sentinel")
CONSUMER_TIMEOUT_MS = 5000


def rabbitmq_server() -> str | None:
    """The rabbitmq-server start script, if installed (`apt-get install rabbitmq-server`)."""
    if os.path.exists(RABBITMQ_SERVER):
        return RABBITMQ_SERVER
    found = shutil.which("rabbitmq-server")
    return found if found and not found.startswith(("/usr/sbin", "/sbin")) else None


def _password_hash(password: str) -> str:
    """RabbitMQ's default password hash (rabbit_password_hashing_sha256): base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _wait_port(port: int, timeout: float, alive: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive.poll() is not None:
            raise RuntimeError(f"{what} exited with {alive.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f} s")


class RabbitNode:
    """A private RabbitMQ node: `consumer_timeout` CONSUMER_TIMEOUT_MS, checked every second (the channel tick;
    RabbitMQ's default is a minute), a user of its own with a vhost per group of tests."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"sq-rabbit-{self.port}-"))
        self.user = "stylequeue"
        self.password = secrets.token_hex(12)
        self.node = f"sq-test-{self.port}@localhost"
        self.processes: list[subprocess.Popen[bytes]] = []

    def url(self, vhost: str) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    @property
    def log_path(self) -> Path:
        return self.dir / "log" / f"{self.node}.log"

    def _write_config(self) -> None:
        for sub in ("mnesia", "log", "home"):
            (self.dir / sub).mkdir()
        definitions = {
            "users": [{"name": self.user, "password_hash": _password_hash(self.password), "tags": "administrator",
                       "hashing_algorithm": "rabbit_password_hashing_sha256"}],
            "vhosts": [{"name": vhost} for vhost in VHOSTS],
            "permissions": [{"user": self.user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
                            for vhost in VHOSTS],
        }
        (self.dir / "definitions.json").write_text(json.dumps(definitions))
        (self.dir / "advanced.config").write_text(
            f'[{{rabbit, [{{tcp_listeners, [{{"127.0.0.1", {self.port}}}]}}, '
            f"{{consumer_timeout, {CONSUMER_TIMEOUT_MS}}}, {{channel_tick_interval, 1000}}, "
            f'{{load_definitions, "{self.dir / "definitions.json"}"}}]}}].\n')
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")

    def _env(self, epmd_port: int) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.dir / "home"),  # a fresh Erlang cookie, nobody else's
            "ERL_EPMD_PORT": str(epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),  # absent: advanced.config says it all
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
        })
        return env

    def start(self, script: str, timeout: float = 120) -> RabbitNode:
        self._write_config()
        epmd_port = free_port()
        # Its own epmd, in the foreground, so stop() ends it and the machine's epmd (if any) is never used.
        epmd = subprocess.Popen([shutil.which("epmd") or "epmd", "-port", str(epmd_port), "-address", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(epmd)
        out = self.dir / "server.out"
        with open(out, "wb") as sink:
            server = subprocess.Popen([script], env=self._env(epmd_port), cwd=self.dir, stdout=sink,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.insert(0, server)
        try:
            _wait_port(self.port, timeout, server, "rabbitmq-server", out)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in self.processes:  # the node first (it flushes), its epmd last
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready_messages(self, vhost: str, queue: str) -> int:
        """Messages ready (not delivered to a consumer) in `queue`; 0 for a queue not declared yet."""
        import amqp

        connection = amqp.Connection(f"127.0.0.1:{self.port}", userid=self.user, password=self.password,
                                     virtual_host=vhost)
        connection.connect()
        try:
            return int(connection.channel().queue_declare(queue, passive=True).message_count)
        except amqp.exceptions.NotFound:
            return 0
        finally:
            connection.close()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitNode]:
    script = rabbitmq_server()
    if script is None:
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server); .ci/run installs it")
    node = RabbitNode().start(script)
    yield node
    node.stop()


class SentinelGroup:
    """A Redis primary, one replica and one sentinel watching them as `service`, each with a password.

    `url` is the redis+sentinel:// form of STYLEQUEUE_REDIS_URL that finds the current primary.
    """

    service = "sqmaster"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sq-sentinel-"))
        self.password = secrets.token_hex(12)
        self.sentinel_password = secrets.token_hex(12)
        self.ports = {"primary": free_port(), "replica": free_port(), "sentinel": free_port()}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, db: int = 0) -> str:
        return (f"redis+sentinel://:{self.password}@127.0.0.1:{self.ports['sentinel']}/{self.service}/{db}"
                f"?sentinel_password={self.sentinel_password}")

    def _start(self, name: str, config: str, *extra: str) -> None:
        path = self.dir / f"{name}.conf"
        path.write_text(config)
        path.chmod(0o600)  # it holds the passwords
        log = self.dir / f"{name}.log"
        self.processes[name] = subprocess.Popen([find_redis_server(), str(path), *extra], cwd=self.dir,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                start_new_session=True)
        _wait_port(self.ports[name], 20, self.processes[name], f"redis {name}", log)

    def _server_config(self, name: str) -> str:
        port = self.ports[name]
        return (f"bind 127.0.0.1\nport {port}\ndir {self.dir}\ndbfilename {name}.rdb\nsave \"\"\nappendonly no\n"
                f"logfile {self.dir / (name + '.log')}\nrequirepass {self.password}\nmasterauth {self.password}\n"
                f"maxmemory-policy noeviction\n")

    def start(self) -> SentinelGroup:
        self._start("primary", self._server_config("primary"))
        self._start("replica", self._server_config("replica") + f"replicaof 127.0.0.1 {self.ports['primary']}\n")
        self._start("sentinel", (
            f"bind 127.0.0.1\nport {self.ports['sentinel']}\ndir {self.dir}\nlogfile {self.dir / 'sentinel.log'}\n"
            f"requirepass {self.sentinel_password}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.ports['primary']} 1\n"
            f"sentinel auth-pass {self.service} {self.password}\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 10000\n"), "--sentinel")
        deadline = time.monotonic() + 20
        while self.client("replica").info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with the primary")
            time.sleep(0.1)
        return self

    def client(self, name: str) -> redis.Redis:
        password = self.sentinel_password if name == "sentinel" else self.password
        return redis.Redis(host="127.0.0.1", port=self.ports[name], password=password, socket_timeout=5)

    def primary_port(self) -> int:
        """The port of the server the sentinel names as primary now."""
        _host, port = self.client("sentinel").sentinel_get_master_addr_by_name(self.service)
        return int(port)

    def stop_server(self, name: str) -> None:
        process = self.processes[name]
        process.terminate()
        process.wait(30)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    group = SentinelGroup().start()
    yield group
    group.stop()
