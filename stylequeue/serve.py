"""`stylequeue serve`: embedded Redis + a worker + the HTTP gateway on one machine, until Ctrl-C.

The data directory keeps what a job may name apart from what it must never touch:

    DATA/redis/      the job store's AOF and its password              (0700; no job root lies here)
    DATA/logs/       redis.log, worker.log, api.log                    (0700; no job root lies here)
    DATA/files/      the storage root: outputs go under DATA/files/outputs/
    DATA/files/inputs/  the input root, unless STYLEQUEUE_INPUT_ROOTS names others
    DATA/api-token, DATA/webhook-secret   kept per data directory (0600), like the Redis password
    DATA/tenants.toml  the gateway's one tenant, `local`, holding DATA/api-token's hash (0600, rewritten at
                     each start): inputs under the input roots, photos sent to the gateway under
                     INPUT_ROOT/uploads/, outputs under the storage root's outputs/
    DATA/client.env  every variable a client needs (0600): `set -a; . DATA/client.env; set +a`

Ports are stable (Redis 6390, gateway 8000) so a restarted `serve` keeps its clients working; a port
another program holds is a one-line error naming the flag that changes it. Settings in serve's own
environment (STYLEQUEUE_STYLES, STYLEQUEUE_INPUT_ROOTS, ...) pass to the worker, made absolute, and into
client.env, so a client in any directory and the worker mean the same files.
"""

from __future__ import annotations

import base64
import errno
import importlib.util
import json
import os
import secrets
import shlex
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from stylequeue.config.settings import file_uri_str, normalise_storage_url
from stylequeue.embedded import EmbeddedRedis
from stylequeue.errors import ConfigError
from stylequeue.local_stack import LocalStack, spawn, start_stack, wait_worker_ready
from stylequeue.private_files import kept_secret, private_dir, write_private

DEFAULT_REDIS_PORT = 6390  # not 6379: a machine's own Redis usually holds that one
DEFAULT_API_PORT = 8000

# Settings a client must share with the worker, passed on to client.env when serve's environment sets them.
CLIENT_SETTINGS = ("CONFIG", "KEY_PREFIX", "STYLES", "ALLOW_PRIVATE_NETWORKS", "S3_ENDPOINT_URL",
                   "S3_ADDRESSING_STYLE", "S3_REGION", "S3_PUBLIC_ENDPOINT_URL", "MAX_INPUT_BYTES",
                   "MAX_INPUT_PIXELS", "OUTPUT_URL_TTL_S", "JOB_TTL_S")


@dataclass(frozen=True)
class ServeOptions:
    data_dir: Path
    redis_port: int = DEFAULT_REDIS_PORT
    api_port: int | None = DEFAULT_API_PORT  # None: no gateway
    worker_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """Where everything of one data directory lives (all absolute)."""

    root: Path

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def client_env(self) -> Path:
        return self.root / "client.env"

    def create(self) -> Layout:
        if not self.root.exists():
            private_dir(self.root)  # secrets live at its top; an existing directory keeps the mode it has
        private_dir(self.redis)
        private_dir(self.logs)
        for folder in (self.files / "inputs", self.files / "outputs"):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def require_free_port(port: int, flag: str) -> None:
    """A one-line ConfigError naming `flag` when something already listens on 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR, as servers bind: a port held only by TIME_WAIT leftovers of our last run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(
                    f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); choose another with {flag}") from None
            raise ConfigError(f"port {port} is in use by another program (perhaps another `stylequeue serve`); "
                              f"choose a free one with {flag}") from None


def _absolute_paths(value: str) -> str:
    return ",".join(os.path.abspath(os.path.expanduser(part.strip())) for part in value.split(",") if part.strip())


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def worker_settings(layout: Layout, environ: Mapping[str, str]) -> dict[str, str]:
    """The STYLEQUEUE_* values the worker, the gateway and every client share (all paths absolute)."""
    storage = environ.get("STYLEQUEUE_STORAGE_URL") or f"file://{layout.files}"
    roots = environ.get("STYLEQUEUE_INPUT_ROOTS") or str(layout.files / "inputs")
    secret = environ.get("STYLEQUEUE_WEBHOOK_SECRET") or kept_secret(layout.root / "webhook-secret", new_webhook_secret)
    values = {
        "STYLEQUEUE_STORAGE_URL": normalise_storage_url(storage),
        "STYLEQUEUE_INPUT_ROOTS": _absolute_paths(roots),
        "STYLEQUEUE_WEBHOOK_SECRET": secret,  # callbacks are signed, and the client can check them
    }
    for name in CLIENT_SETTINGS:
        value = environ.get(f"STYLEQUEUE_{name}")
        if value:
            values[f"STYLEQUEUE_{name}"] = _absolute_paths(value) if name in ("CONFIG", "STYLES") else value
    return values


def check_roots_apart(layout: Layout, settings: Mapping[str, str]) -> None:
    """Refuse roots a job could name that hold the job store, the logs or the secrets (issue: outputs over the AOF)."""
    roots = settings["STYLEQUEUE_INPUT_ROOTS"].split(",")
    storage = settings["STYLEQUEUE_STORAGE_URL"]
    if storage.startswith("file://"):
        roots.append(file_uri_str(storage))
    for root in map(Path, roots):
        for private in (layout.redis, layout.logs, layout.client_env):
            if root == private or root in private.parents or private in root.parents:
                raise ConfigError(f"a job could read or write {private}: the root {root} contains it; keep "
                                  f"STYLEQUEUE_STORAGE_URL and STYLEQUEUE_INPUT_ROOTS outside {layout.root} "
                                  f"(or inside {layout.files})")


def gateway_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn"))


def client_env_text(values: Mapping[str, str], path: Path) -> str:
    lines = ["# Written by `stylequeue serve` at each start: what a client of this server needs.",
             f"# In another shell:  set -a; . {shlex.quote(str(path))}; set +a",
             "# STYLEQUEUE_API_URL and STYLEQUEUE_API_TOKEN are for HTTP callers (Authorization: Bearer ...)."]
    lines += [f"{name}={shlex.quote(value)}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def tenants_text(settings: Mapping[str, str], token: str) -> str:
    """The tenants file of serve's gateway: one tenant scoped to this server's own roots (docs/http.md)."""
    from stylequeue.config.tenants import token_digest

    roots = [f"file://{root.rstrip('/')}/" for root in settings["STYLEQUEUE_INPUT_ROOTS"].split(",")]
    storage = settings["STYLEQUEUE_STORAGE_URL"].rstrip("/")
    lines = ["# Written by `stylequeue serve` at each start: the gateway's one caller, holding DATA/api-token.",
             "[tenants.local]", f'token_sha256 = "{token_digest(token)}"',
             f"inputs = [{', '.join(json.dumps(root) for root in roots)}]",
             f"outputs = {json.dumps(storage + '/outputs/')}", f"uploads = {json.dumps(roots[0] + 'uploads/')}"]
    return "\n".join(lines) + "\n"


def start_gateway(stack: LocalStack, layout: Layout, port: int, token: str) -> None:
    """`stylequeue api` on 127.0.0.1:`port` with the stack's settings, answering /healthz before this returns."""
    tenants = write_private(layout.root / "tenants.toml", tenants_text(stack.env, token))
    # Its one caller is the tenant: no unscoped STYLEQUEUE_API_TOKENS from serve's own environment.
    env = {k: v for k, v in stack.env.items() if k != "STYLEQUEUE_API_TOKENS"}
    env["STYLEQUEUE_API_TENANTS"] = str(tenants)
    log_path = layout.logs / "api.log"
    stack.gateway = spawn(["api", "--host", "127.0.0.1", "--port", str(port)], env, log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if stack.gateway.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
            raise ConfigError(f"the HTTP gateway exited with code {stack.gateway.returncode}: "
                              f"{tail[0] if tail else ''} (see {log_path})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise ConfigError(f"the HTTP gateway did not answer on port {port} within 120 s; see {log_path}")


def _show(console: Console, layout: Layout, values: Mapping[str, str], api: bool) -> None:
    console.print("stylequeue serving; Ctrl-C to stop. A client needs:", markup=False)
    for name, value in values.items():
        console.print(f"  {name}={shlex.quote(value)}", markup=False)
    console.print(f"in another shell run:  set -a; . {shlex.quote(str(layout.client_env))}; set +a", markup=False)
    console.print(f"inputs under {values['STYLEQUEUE_INPUT_ROOTS']}; outputs under "
                  f"{values['STYLEQUEUE_STORAGE_URL']}/outputs; logs in {layout.logs}", markup=False)
    if api:
        console.print(f"try it in a browser: {values['STYLEQUEUE_API_URL']}/ (token: STYLEQUEUE_API_TOKEN)",
                      markup=False)


def run_serve(options: ServeOptions, *, console: Console | None = None) -> int:
    """Serve until SIGTERM/Ctrl-C (0) or until the worker or gateway exits (its code, at least 1)."""
    console = console or Console(soft_wrap=True)  # a URL must stay on one line
    layout = Layout(options.data_dir.resolve())
    require_free_port(options.redis_port, "--redis-port")
    api = options.api_port is not None and gateway_available()
    if options.api_port is not None and not api:
        console.print("the HTTP gateway needs the api extra (pip install 'stylequeue[api]'); serving without it",
                      markup=False)
    if api:
        assert options.api_port is not None
        require_free_port(options.api_port, "--api-port (or --no-api)")
    layout.create()
    layout.client_env.unlink(missing_ok=True)  # rewritten once all is ready: its appearance says so
    settings = worker_settings(layout, os.environ)
    check_roots_apart(layout, settings)
    redis_server = EmbeddedRedis(data_dir=layout.redis, log_dir=layout.logs, port=options.redis_port)
    signal.signal(signal.SIGTERM, _interrupt)  # stop as Ctrl-C does, in whatever phase it comes
    stack = start_stack(redis_server, settings, worker_args=options.worker_args, log_path=layout.logs / "worker.log")
    try:
        values = {"STYLEQUEUE_REDIS_URL": redis_server.url, **settings}
        if api:
            assert options.api_port is not None
            token = kept_secret(layout.root / "api-token")
            values |= {"STYLEQUEUE_API_URL": f"http://127.0.0.1:{options.api_port}", "STYLEQUEUE_API_TOKEN": token}
            start_gateway(stack, layout, options.api_port, token)
        _wait_ready(stack)
        write_private(layout.client_env, client_env_text(values, layout.client_env))
        _show(console, layout, values, api)
        return _watch(stack, console)
    except KeyboardInterrupt:
        return 0
    finally:
        console.print("stopping ...", markup=False)
        stack.stop()


def _wait_ready(stack: LocalStack) -> None:
    from stylequeue.jobs import RedisJobStore

    store = RedisJobStore.from_url(stack.redis.url, key_prefix=stack.env.get("STYLEQUEUE_KEY_PREFIX", "sq:"))
    wait_worker_ready(stack, store)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _watch(stack: LocalStack, console: Console) -> int:
    while True:
        if stack.worker.poll() is not None:
            console.print(f"the worker exited with code {stack.worker.returncode}; see {stack.log_path}", markup=False)
            return stack.worker.returncode or 1
        if stack.gateway is not None and stack.gateway.poll() is not None:
            console.print(f"the HTTP gateway exited with code {stack.gateway.returncode}", markup=False)
            return stack.gateway.returncode or 1
        time.sleep(0.5)
