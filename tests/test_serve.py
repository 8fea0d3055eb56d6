"""`stylequeue serve` as a newcomer uses it: start it, source DATA/client.env in another shell, submit a local file."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from stylequeue.embedded import free_port
from stylequeue.errors import ConfigError
from stylequeue.serve import Layout, check_roots_apart, worker_settings
from tests.workers import make_image, processes_mentioning, wait_for


def stylequeue(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stylequeue", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def in_client_shell(client_env: Path, command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`command` in a shell that knows only what client.env says (no STYLEQUEUE_* of its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    script = f"set -a; . {shlex.quote(str(client_env))}; set +a; {command}"
    return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def sourced(client_env: Path) -> dict[str, str]:
    shown = in_client_shell(client_env, "env -0", client_env.parent).stdout
    return dict(item.split("=", 1) for item in shown.split("\0") if item.startswith("STYLEQUEUE_"))


@pytest.fixture
def served(tmp_path: Path, tiny_registry: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    """A running `serve` on free ports with DATA = tmp_path/data; yields (DATA, its output so far).

    Parametrised indirectly with True, it runs where `import fastapi` fails (the `api` extra missing).
    """
    data = tmp_path / "data"
    env = dict(os.environ, STYLEQUEUE_STYLES=str(tiny_registry), STYLEQUEUE_RUNTIME="dygraph")
    if getattr(request, "param", False):
        blocker = tmp_path / "blocker"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['fastapi'] = None\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    redis_port, api_port = free_port(), free_port()
    argv = [sys.executable, "-m", "stylequeue", "serve", "--data", str(data), "--redis-port", str(redis_port),
            "--api-port", str(api_port)]
    log = tmp_path / "serve.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT)
    try:
        # client.env is written just before serve prints how to use it: wait for both
        started = wait_for(lambda: ((data / "client.env").exists() and "in another shell run" in log.read_text())
                           or process.poll() is not None, timeout=240)
        assert started and process.poll() is None, log.read_text()[-3000:]
        yield data, log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0, log.read_text()[-3000:]
    assert wait_for(lambda: not processes_mentioning(str(data)), timeout=20), "serve left processes running"
    for port in (redis_port, api_port):  # Redis renames its process title, so ask its port
        assert not listening(port), f"serve left port {port} open"


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_a_client_in_another_directory_submits_a_local_file(served: tuple[Path, str], tmp_path: Path) -> None:
    data, printed = served
    client_env = data / "client.env"
    assert stat.S_IMODE(client_env.stat().st_mode) == 0o600
    assert f"set -a; . {client_env}; set +a" in printed
    values = sourced(client_env)
    assert values["STYLEQUEUE_STORAGE_URL"] == f"file://{data}/files"
    assert values["STYLEQUEUE_INPUT_ROOTS"] == str(data / "files" / "inputs")
    assert values["STYLEQUEUE_REDIS_URL"].startswith("redis://:") and values["STYLEQUEUE_REDIS_URL"] in printed
    photo = data / "files" / "inputs" / "a.png"
    photo.write_bytes(make_image(64, 48))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    submit = f"{shlex.quote(sys.executable)} -m stylequeue submit %s --style tiny --wait --json --timeout 120"
    result = in_client_shell(client_env, submit % shlex.quote(f"file://{photo}"), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["state"] == "succeeded" and record["input_uri"] == f"file://{photo}"
    output = Path(record["output_uri"].removeprefix("file://"))
    assert record["output_uri"].startswith("file:///") and output.is_file()
    assert data / "files" / "outputs" in output.parents
    # a relative file:// URI means the client's directory, and is stored absolute
    relative = in_client_shell(client_env, submit % "file://./a.png", cwd=photo.parent)
    assert relative.returncode == 0, relative.stderr
    assert json.loads(relative.stdout)["input_uri"] == f"file://{photo}"
    assert (data / "redis" / "appendonlydir").exists() or any((data / "redis").glob("*.aof"))
    assert {p.name for p in (data / "logs").iterdir()} >= {"redis.log", "worker.log", "api.log"}


@pytest.mark.slow
def test_the_gateway_answers_with_the_token_from_client_env(served: tuple[Path, str]) -> None:
    data, _ = served
    values = sourced(data / "client.env")
    url, token = values["STYLEQUEUE_API_URL"], values["STYLEQUEUE_API_TOKEN"]
    request = urllib.request.Request(f"{url}/v1/styles", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert "tiny" in [s["name"] for s in json.loads(response.read())["styles"]]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/v1/styles", timeout=10)
    assert refused.value.code == 401
    # the token, like the Redis password, is kept per data directory: a restart keeps clients working
    assert (data / "api-token").read_text().strip() == token
    tenants = data / "tenants.toml"
    assert stat.S_IMODE(tenants.stat().st_mode) == 0o600 and token not in tenants.read_text()  # only its hash


def http_json(request: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


@pytest.mark.slow
def test_a_photo_sent_to_the_gateway_comes_back_restyled_within_the_data_directory(
        served: tuple[Path, str]) -> None:
    data, _ = served
    values = sourced(data / "client.env")
    url, auth = values["STYLEQUEUE_API_URL"], {"Authorization": f"Bearer {values['STYLEQUEUE_API_TOKEN']}"}
    boundary = "serveboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"style\"\r\n\r\ntiny\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="image"; filename="me.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode() + make_image(64, 48) + f"\r\n--{boundary}--\r\n".encode()
    status, job = http_json(urllib.request.Request(
        f"{url}/v1/jobs", data=body, method="POST",
        headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"}))
    assert status == 202, job
    assert job["input_uri"].startswith(f"file://{data}/files/inputs/uploads/u_")
    assert job["output_uri"].startswith(f"file://{data}/files/outputs/tiny/")
    for _ in range(10):
        status, job = http_json(urllib.request.Request(f"{url}/v1/jobs/{job['id']}?wait=20", headers=auth))
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
    assert job["state"] == "succeeded", job
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/jobs/{job['id']}/output", headers=auth),
                                timeout=30) as response:
        assert response.headers["Content-Type"] == "image/png" and response.read().startswith(b"\x89PNG")
    # the token is scoped to this data directory: nothing else on the machine can be named
    for outside in ({"input_uri": "file:///etc/passwd"},
                    {"input_uri": job["input_uri"], "output_uri": f"file://{data}/redis/appendonly.aof"}):
        status, refused = http_json(urllib.request.Request(
            f"{url}/v1/jobs", data=json.dumps({"style": "tiny", **outside}).encode(), method="POST",
            headers={**auth, "Content-Type": "application/json"}))
        assert status == 403 and refused["error"]["code"] == "input_forbidden"


@pytest.mark.slow
@pytest.mark.parametrize("served", [True], indirect=True, ids=["no-fastapi"])
def test_without_the_api_extra_serve_says_so_and_serves_without_it(served: tuple[Path, str]) -> None:
    data, printed = served
    assert "needs the api extra" in printed and "stylequeue[api]" in printed
    values = sourced(data / "client.env")
    assert "STYLEQUEUE_API_URL" not in values and "STYLEQUEUE_REDIS_URL" in values


def test_a_taken_port_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    env = dict(os.environ)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = str(holder.getsockname()[1])
        for flags, named in ((["--redis-port", taken], "--redis-port"),
                             (["--redis-port", str(free_port()), "--api-port", taken], "--api-port")):
            result = stylequeue("serve", "--data", str(tmp_path / "d"), *flags, env=env)
            assert result.returncode == 2, result.stderr
            assert named in result.stderr and taken in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()  # refused before anything started


def test_roots_a_job_can_name_never_hold_the_job_store(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data")
    layout.create()
    assert stat.S_IMODE(layout.redis.stat().st_mode) == 0o700
    for environ in ({"STYLEQUEUE_STORAGE_URL": f"file://{layout.root}"},
                    {"STYLEQUEUE_INPUT_ROOTS": str(tmp_path)},
                    {"STYLEQUEUE_INPUT_ROOTS": str(layout.redis / "appendonlydir")}):
        with pytest.raises(ConfigError, match="STYLEQUEUE_INPUT_ROOTS"):
            check_roots_apart(layout, worker_settings(layout, environ))
    fine = worker_settings(layout, {"STYLEQUEUE_INPUT_ROOTS": f"{layout.files}/mine,{tmp_path / 'photos'}"})
    check_roots_apart(layout, fine)


def test_settings_for_client_env_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    layout = Layout(tmp_path / "data").create()
    values = worker_settings(layout, {"STYLEQUEUE_STYLES": "styles.toml", "STYLEQUEUE_INPUT_ROOTS": "in,~/pics",
                                      "STYLEQUEUE_STORAGE_URL": "file://./store/", "STYLEQUEUE_KEY_PREFIX": "x:"})
    assert values["STYLEQUEUE_STYLES"] == str(tmp_path / "styles.toml")
    assert values["STYLEQUEUE_INPUT_ROOTS"] == f"{tmp_path / 'in'},{Path('~/pics').expanduser()}"
    assert values["STYLEQUEUE_STORAGE_URL"] == f"file://{tmp_path / 'store'}"
    assert values["STYLEQUEUE_KEY_PREFIX"] == "x:"
    assert values["STYLEQUEUE_WEBHOOK_SECRET"].startswith("whsec_")
    again = worker_settings(layout, {})
    assert again["STYLEQUEUE_WEBHOOK_SECRET"] == values["STYLEQUEUE_WEBHOOK_SECRET"]  # kept per data directory
