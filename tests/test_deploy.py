"""deploy/: every file parses, names only real commands, flags and settings, and outwaits a job on shutdown.

Nothing here builds an image or starts a container (no Docker engine on these machines); the health check
that the images and probes run is tested against a real Redis.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from stylequeue.config.settings import CONFIG_ENV, ENV_PREFIX, Settings, load_settings
from stylequeue.embedded import free_port
from stylequeue.jobs import Presence, RedisJobStore
from stylequeue.jobs.keys import WORKERS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
HEALTHCHECK_IN_IMAGE = "/opt/stylequeue/healthcheck.py"
DEFAULT_JOB_TIMEOUT = float(Settings.model_fields["job_timeout_s"].default)


# --- readers --------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / name).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, args = line.partition(" ")
        steps.append((instruction.upper(), args.strip()))
    return steps


def instruction_args(name: str, instruction: str) -> list[str]:
    return [args for ins, args in dockerfile(name) if ins == instruction]


def pip_installs(name: str) -> list[str]:
    return [cmd for run in instruction_args(name, "RUN") for cmd in run.split("&&") if "pip install" in cmd]


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (as systemd's EnvironmentFile= and compose's .env read them)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "docker-compose.yml").read_text()))


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default}, ${NAME:?message}, with `variables` as deploy/.env."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if variables.get(name):
            return variables[name]
        if op == ":-":
            return rest
        raise AssertionError(f"${{{name}}} is required by docker-compose.yml but .env.example does not set it")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", one, value)


def compose_env(service: str) -> dict[str, str]:
    variables = env_file(DEPLOY / ".env.example")
    env = compose()["services"][service].get("environment", {})
    return {key: interpolate(str(value), variables) for key, value in env.items()}


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_yaml(path)]


def k8s_workers() -> list[dict[str, Any]]:
    """Deployments/StatefulSets whose containers run a stylequeue image."""
    return [doc for doc in k8s_docs() if doc["kind"] in ("Deployment", "StatefulSet")
            and any(c["image"].startswith("stylequeue") for c in doc["spec"]["template"]["spec"]["containers"])]


def k8s_configmap_data() -> dict[str, str]:
    (config,) = [d for d in k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "stylequeue-config"]
    return {key: str(value) for key, value in config["data"].items()}


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file: section -> [(key, value)] in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, _, value = line.partition("=")
            sections[current].append((key.strip(), value.strip()))
    return sections


def unit_value(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in sections.get(section, []) if k == key]
    assert values, f"[{section}] {key}= missing"
    return values[-1]


def seconds(duration: str | int | float) -> float:
    """'360', '360s', '6m', '6min', '1m30s', '1h' -> seconds (systemd and compose forms)."""
    text = str(duration).replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|ms|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"cannot read duration {duration!r}"
    scale = {"h": 3600, "min": 60, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


# --- command lines ----------------------------------------------------------------------------------


def stylequeue_command_lines() -> dict[str, list[str]]:
    """Every `stylequeue ...` argv in deploy/, by where it is written."""
    found: dict[str, list[str]] = {}
    for name in ("Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.producer"):
        (entrypoint,) = instruction_args(name, "ENTRYPOINT")
        assert json.loads(entrypoint) == ["stylequeue"], f"{name}: ENTRYPOINT must be [\"stylequeue\"]"
        (cmd,) = instruction_args(name, "CMD")
        found[f"{name} CMD"] = json.loads(cmd)
    for service_name, service in compose()["services"].items():
        if "stylequeue" in str(service.get("image", "")) and "command" in service:
            found[f"docker-compose {service_name}"] = [str(a) for a in service["command"]]
    for doc in k8s_workers():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            found[f"k8s {doc['metadata']['name']}"] = [str(a) for a in container.get("command", []) + container["args"]]
    for path in sorted(SYSTEMD.glob("*.service")):
        argv = shlex.split(unit_value(unit(path.name), "Service", "ExecStart"))
        assert argv[0].endswith("/stylequeue"), f"{path.name}: ExecStart should run the stylequeue command"
        found[f"systemd {path.name}"] = argv[1:]
    return found


def healthcheck_command_lines() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        (health,) = instruction_args(name, "HEALTHCHECK")
        found[f"{name} HEALTHCHECK"] = json.loads(health[health.index("CMD") + 3:].strip())
    for doc in k8s_workers():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                found[f"k8s {doc['metadata']['name']} {probe}"] = container[probe]["exec"]["command"]
    return found


@functools.cache
def options_of(*command: str) -> frozenset[str]:
    """The --options that `command --help` lists (fails if the command does not exist)."""
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(command)} --help failed: {result.stderr.strip()[-300:]}"
    return frozenset(re.findall(r"(?m)^\s+(?:-\w,?\s+)?(--[a-z][a-z0-9-]*)", result.stdout))


def flags(argv: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]


# --- every file parses, every name is real -------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_files_parse_into_mappings(path: Path) -> None:
    docs = load_yaml(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_every_deployment_surface_is_found() -> None:
    # Guards the parsers below: a file they silently skipped would pass every check.
    assert set(stylequeue_command_lines()) >= {
        "Dockerfile.cpu CMD", "Dockerfile.gpu CMD", "Dockerfile.producer CMD", "docker-compose worker-cpu",
        "docker-compose worker-gpu", "k8s stylequeue-worker-cpu", "k8s stylequeue-worker-gpu",
        "systemd stylequeue-worker@.service", "systemd stylequeue-worker-cpu.service",
    }


@pytest.mark.parametrize("where", sorted(stylequeue_command_lines()))
def test_command_lines_use_real_subcommands_and_flags(where: str) -> None:
    argv = stylequeue_command_lines()[where]
    if argv == ["--help"]:
        return
    known = options_of(sys.executable, "-m", "stylequeue", argv[0])
    unknown = [flag for flag in flags(argv) if flag not in known]
    assert not unknown, f"{where}: `stylequeue {argv[0]}` has no {unknown}"


@pytest.mark.parametrize("where", sorted(w for w, a in stylequeue_command_lines().items() if "--metrics-port" in a))
def test_metrics_in_containers_listen_beyond_loopback_and_on_hosts_stay_on_it(where: str) -> None:
    # A worker's metrics listen on 127.0.0.1 unless told otherwise; inside a container that is unreachable
    # by the scraper (k8s) and by a published port (compose), so those open it; a systemd host keeps it local.
    argv = stylequeue_command_lines()[where]
    addr = argv[argv.index("--metrics-addr") + 1] if "--metrics-addr" in argv else "127.0.0.1"
    assert addr == ("127.0.0.1" if where.startswith("systemd") else "0.0.0.0"), where


@pytest.mark.parametrize("where", sorted(healthcheck_command_lines()))
def test_health_checks_run_the_script_the_image_installs(where: str) -> None:
    argv = healthcheck_command_lines()[where]
    assert argv[:2] == ["python", HEALTHCHECK_IN_IMAGE]
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert f"deploy/healthcheck.py {HEALTHCHECK_IN_IMAGE}" in instruction_args(name, "COPY")
    unknown = [flag for flag in flags(argv) if flag not in options_of(sys.executable, str(DEPLOY / "healthcheck.py"))]
    assert not unknown, f"{where}: healthcheck.py has no {unknown}"


def test_worker_devices_are_valid_device_names() -> None:
    for where, argv in stylequeue_command_lines().items():
        if "--device" in argv:
            device = argv[argv.index("--device") + 1].replace("%i", "0")  # a systemd instance: GPU index
            assert Settings(device=device).device == device, where


def deploy_text_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", deploy_text_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_stylequeue_variable_is_a_real_setting(path: Path) -> None:
    names = set(re.findall(r"\b" + ENV_PREFIX + r"[A-Z][A-Z0-9_]*", path.read_text()))
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields} | {CONFIG_ENV}
    unknown = sorted(names - known)
    assert not unknown, f"{path.name} names settings that do not exist: {unknown}"


def settings_env_sets() -> dict[str, dict[str, str]]:
    return {
        "k8s ConfigMap": k8s_configmap_data(),
        "compose worker-cpu": compose_env("worker-cpu"),
        "compose worker-gpu": compose_env("worker-gpu"),
        "compose .env.example": env_file(DEPLOY / ".env.example"),
        "systemd env.example": env_file(SYSTEMD / "env.example"),
    }


@pytest.mark.parametrize("where", sorted(settings_env_sets()))
def test_setting_values_are_accepted(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {k: v for k, v in settings_env_sets()[where].items() if k.startswith(ENV_PREFIX)}
    assert values
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    load_settings()  # raises ConfigError naming the variable


# --- shutdown outwaits a job ---------------------------------------------------------------------------


def job_timeout(env: dict[str, str]) -> float:
    return float(env.get("STYLEQUEUE_JOB_TIMEOUT_S", DEFAULT_JOB_TIMEOUT))


def test_k8s_workers_outwait_the_job_timeout() -> None:
    base = k8s_configmap_data()
    assert len(k8s_workers()) == 2
    for doc in k8s_workers():
        spec = doc["spec"]["template"]["spec"]
        for container in spec["containers"]:
            overrides = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
            assert spec["terminationGracePeriodSeconds"] > job_timeout(base | overrides), doc["metadata"]["name"]


def test_compose_workers_outwait_the_job_timeout() -> None:
    for name in ("worker-cpu", "worker-gpu"):
        service = compose()["services"][name]
        assert seconds(service["stop_grace_period"]) > job_timeout(compose_env(name)), name


@pytest.mark.parametrize("name", ["stylequeue-worker@.service", "stylequeue-worker-cpu.service"])
def test_systemd_units_restart_and_stop_gracefully(name: str) -> None:
    sections = unit(name)
    assert unit_value(sections, "Service", "Restart") == "on-failure"
    assert unit_value(sections, "Service", "KillSignal") == "SIGTERM"
    assert unit_value(sections, "Service", "EnvironmentFile").lstrip("-") == "/etc/stylequeue/env"
    assert unit_value(sections, "Service", "User") == "stylequeue"
    assert unit_value(sections, "Install", "WantedBy") == "multi-user.target"
    stop = seconds(unit_value(sections, "Service", "TimeoutStopSec"))
    assert stop > job_timeout(env_file(SYSTEMD / "env.example"))
    device = "gpu:%i" if name.endswith("@.service") else "cpu"
    assert f"--device {device}" in unit_value(sections, "Service", "ExecStart")


# --- images -----------------------------------------------------------------------------------------


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_names(extras: list[str]) -> set[str]:
    """Distributions `pip install .[extras]` asks for (the project's self-referencing extras expanded)."""
    project = pyproject()["project"]
    names: set[str] = set()
    todo = [Requirement(r) for r in project["dependencies"]]
    todo += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    while todo:
        req = todo.pop()
        if req.name == project["name"]:
            todo += [Requirement(r) for extra in req.extras for r in project["optional-dependencies"][extra]]
        else:
            names.add(req.name.lower())
    return names


def pip_requirements(cmd: str) -> list[str]:
    """Distribution names that a `pip install ...` command names itself (the project `.` excluded)."""
    words = shlex.split(re.sub(r"\$\{\w+\}", "0", cmd))
    names, skip = [], False
    for word in words[words.index("install") + 1:]:
        if skip:
            skip = False
        elif word in ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "-r"):
            skip = True
        elif not word.startswith(("-", ".")):
            names.append(Requirement(word).name.lower())
    return names


def project_install_extras(name: str) -> list[str]:
    """The extras of the Dockerfile's `pip install .[...]` (exactly one such line)."""
    lines = [cmd for cmd in pip_installs(name) if re.search(r"""install\s+["']?\.(\[|["']?\s|["']?$)""", cmd)]
    assert len(lines) == 1, f"{name}: expected one `pip install .` of the project, found {lines}"
    match = re.search(r"\.\[([a-z0-9,\s]+)\]", lines[0])
    return [e.strip() for e in match.group(1).split(",")] if match else []


def test_cpu_image_installs_the_cpu_worker() -> None:
    assert set(project_install_extras("Dockerfile.cpu")) == {"cpu", "onnx"}
    assert "paddlepaddle" in requirement_names(["cpu", "onnx"])
    assert instruction_args("Dockerfile.cpu", "FROM")[0].startswith("python:3.11-slim")


def test_gpu_image_installs_paddle_gpu_from_paddles_index_and_never_cpu_paddle() -> None:
    installs = pip_installs("Dockerfile.gpu")
    paddle_gpu = [cmd for cmd in installs if "paddlepaddle-gpu" in pip_requirements(cmd)]
    assert len(paddle_gpu) == 1 and "https://www.paddlepaddle.org.cn/packages/stable/" in paddle_gpu[0]
    assert not [cmd for cmd in installs if "paddlepaddle" in pip_requirements(cmd)]
    extras = project_install_extras("Dockerfile.gpu")
    assert set(extras) == {"gpu", "onnx"}
    assert "paddlepaddle" not in requirement_names(extras)
    assert "nvidia/cuda" in " ".join(instruction_args("Dockerfile.gpu", "ARG"))


def test_producer_image_installs_no_paddle() -> None:
    assert project_install_extras("Dockerfile.producer") == ["api"]  # the HTTP gateway, nothing heavier
    for cmd in pip_installs("Dockerfile.producer"):
        assert not [name for name in pip_requirements(cmd) if "paddle" in name]
    assert not [name for name in requirement_names(["api"]) if "paddle" in name]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.producer"])
def test_images_run_as_a_non_root_user(name: str) -> None:
    users = instruction_args(name, "USER")
    assert users and users[-1] not in ("root", "0")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_worker_images_keep_the_cache_on_a_volume(name: str) -> None:
    env = " ".join(instruction_args(name, "ENV"))
    cache = re.search(r"STYLEQUEUE_CACHE_DIR=(\S+)", env)
    assert cache, f"{name} sets no STYLEQUEUE_CACHE_DIR"
    volumes = [v for args in instruction_args(name, "VOLUME") for v in json.loads(args)]
    assert cache.group(1) in volumes


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.producer"])
def test_build_context_allowlist_holds_what_the_dockerfile_copies(name: str) -> None:
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for args in instruction_args(name, "COPY"):
        if args.startswith("--from"):
            continue
        *sources, _ = args.split()
        assert all(s.rstrip("/") in allowed for s in sources), f"{name}: COPY {sources} but the allowlist has {allowed}"


# --- compose ----------------------------------------------------------------------------------------


def test_compose_redis_keeps_what_it_is_given() -> None:
    command = " ".join(str(a) for a in compose()["services"]["redis"]["command"])
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert setting in command


def test_compose_workers_reach_redis_and_minio() -> None:
    services = compose()["services"]
    for name in ("worker-cpu", "worker-gpu", "cli"):
        env = compose_env(name)
        assert env["STYLEQUEUE_REDIS_URL"].startswith("redis://redis:")
        assert env["STYLEQUEUE_STORAGE_URL"] == "s3://stylequeue"
        assert env["STYLEQUEUE_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["STYLEQUEUE_S3_ADDRESSING_STYLE"] == "path"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
        for dependency in services[name].get("depends_on", {}):
            assert dependency in services
    assert "local/stylequeue" in " ".join(services["createbucket"]["command"])
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["flower"]["profiles"] == ["flower"]


def test_compose_names_no_secret_itself() -> None:
    # Every secret is a ${VARIABLE} that .env.example sets; interpolate() fails on a required one it lacks.
    text = (DEPLOY / "docker-compose.yml").read_text()
    for key in ("MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY", "FLOWER_BASIC_AUTH"):
        for value in re.findall(rf"(?m)^\s*{key}:\s*(.+)$", text):
            assert value.strip().startswith("${"), f"{key} is written into docker-compose.yml"
    for name in compose()["services"]:
        compose_env(name)


# --- kubernetes --------------------------------------------------------------------------------------


def test_kustomization_lists_existing_manifests_and_images() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]
    images = {i["name"] for i in kustomization["images"]}
    for doc in k8s_workers():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            assert container["image"] in images


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout)]
    assert kinds.count("Deployment") == 2 and "ConfigMap" in kinds and "Service" in kinds


def test_k8s_workers_read_the_configmap_and_secret_and_expose_metrics() -> None:
    secret = next(doc for doc in k8s_docs() if doc["kind"] == "Secret")
    for doc in k8s_workers():
        spec = doc["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        sources = {(next(iter(s)), s[next(iter(s))]["name"]) for s in container["envFrom"]}
        assert sources == {("configMapRef", "stylequeue-config"), ("secretRef", secret["metadata"]["name"])}
        argv = container["args"]
        port = argv[argv.index("--metrics-port") + 1]
        assert doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == port
        assert int(port) in [p["containerPort"] for p in container["ports"]]
        assert spec["securityContext"]["runAsNonRoot"] is True
        labels = doc["spec"]["template"]["metadata"]["labels"]
        service = next(d for d in k8s_docs() if d["kind"] == "Service" and "metrics" in d["metadata"]["name"])
        assert service["spec"]["selector"].items() <= labels.items()
    for key in secret["stringData"]:
        assert key.startswith("AWS_") or key.removeprefix(ENV_PREFIX).lower() in Settings.model_fields


def test_k8s_gpu_worker_takes_one_gpu_per_pod() -> None:
    (gpu,) = [d for d in k8s_workers() if "gpu" in d["metadata"]["name"]]
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][container["args"].index("--device") + 1] == "gpu:0"


def test_trial_redis_keeps_what_it_is_given() -> None:
    (redis_set,) = [d for d in load_yaml(K8S / "redis-trial.yaml") if d["kind"] == "StatefulSet"]
    args = " ".join(str(a) for a in redis_set["spec"]["template"]["spec"]["containers"][0]["args"])
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert setting in args
    assert "TRIAL ONLY" in (K8S / "redis-trial.yaml").read_text()


# --- the health check, against a real Redis ----------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def store(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> RedisJobStore:
    monkeypatch.setenv("STYLEQUEUE_REDIS_URL", redis_url)
    monkeypatch.setenv("STYLEQUEUE_KEY_PREFIX", "hc:")
    return RedisJobStore.from_url(redis_url, key_prefix="hc:")


def test_health_fails_when_no_worker_here_sends_heartbeats(healthcheck: ModuleType, store: RedisJobStore) -> None:
    Presence(store).heartbeat("other-host-77", {"ready": True})
    Presence(store).heartbeat("web-12", {"ready": True})  # a host whose name starts like ours ("web-1") is not ours
    assert healthcheck.check(ready=False, max_age_s=None, hostname="web-1")[0] == 1
    assert healthcheck.check(ready=True, max_age_s=None, hostname="web-1")[0] == 1


def test_health_separates_alive_from_ready(healthcheck: ModuleType, store: RedisJobStore) -> None:
    Presence(store).heartbeat("web-1-4242", {"ready": False})
    assert healthcheck.check(ready=False, max_age_s=None, hostname="web-1")[0] == 0
    code, reason = healthcheck.check(ready=True, max_age_s=None, hostname="web-1")
    assert code == 1 and "starting" in reason
    Presence(store).heartbeat("web-1-4242", {"ready": True})
    assert healthcheck.check(ready=True, max_age_s=None, hostname="web-1") == (0, "ready: web-1-4242")


def test_health_fails_on_a_stale_heartbeat(healthcheck: ModuleType, store: RedisJobStore) -> None:
    stale = json.dumps({"ready": True, "seen": time.time() - 120})
    store.redis.hset(store.keys.name(WORKERS), "web-1-4242", stale)
    assert healthcheck.check(ready=False, max_age_s=None, hostname="web-1")[0] == 1  # default max age 60 s
    assert healthcheck.check(ready=False, max_age_s=300, hostname="web-1")[0] == 0


def test_health_without_redis_is_alive_but_not_ready(healthcheck: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEQUEUE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert healthcheck.check(ready=False, max_age_s=None, hostname="web-1")[0] == 0
    code, reason = healthcheck.check(ready=True, max_age_s=None, hostname="web-1")
    assert code == 1 and "Redis" in reason


def test_health_script_exit_codes_for_this_host(store: RedisJobStore) -> None:
    env = dict(os.environ)
    script = [sys.executable, str(DEPLOY / "healthcheck.py"), "--ready"]
    missing = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    Presence(store).heartbeat(f"{socket.gethostname()}-{os.getpid()}", {"ready": True})
    ready = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert ready.stdout.startswith("ready:")


# --- autoscaling: KEDA's ScaledObjects ------------------------------------------------------------------------
# No kubeconform (nor a KEDA CRD) installs from the registries here, so the manifests are checked against a JSON
# Schema of the keda.sh/v1alpha1 fields they use, closed to any other (a typo is an error, as in the CRD), with
# KEDA's rule that trigger metadata values are strings; then against what they name (deployments, queues, keys).

AUTOSCALING = ("autoscaling.yaml", "autoscaling-rabbitmq.yaml")
_INT = {"type": "integer", "minimum": 0}
_POLICY = {"type": "object", "additionalProperties": False, "required": ["type", "value", "periodSeconds"],
           "properties": {"type": {"enum": ["Pods", "Percent"]}, "value": _INT, "periodSeconds": _INT}}
_RULES = {"type": "object", "additionalProperties": False,
          "properties": {"stabilizationWindowSeconds": _INT, "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                         "policies": {"type": "array", "items": _POLICY}}}
_NAME_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
KEDA_SCHEMA = {
    "ScaledObject": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": _NAME_META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
                     "properties": {
                         "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                            "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                           "apiVersion": {"type": "string"},
                                                           "envSourceContainerName": {"type": "string"}}},
                         "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
                         "idleReplicaCount": _INT, "minReplicaCount": _INT, "maxReplicaCount": _INT,
                         "advanced": {"type": "object", "additionalProperties": False, "properties": {
                             "restoreToOriginalReplicaCount": {"type": "boolean"},
                             "horizontalPodAutoscalerConfig": {
                                 "type": "object", "additionalProperties": False,
                                 "properties": {"name": {"type": "string"}, "behavior": {
                                     "type": "object", "additionalProperties": False,
                                     "properties": {"scaleUp": _RULES, "scaleDown": _RULES}}}}}},
                         "triggers": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                             "properties": {
                                 "type": {"enum": ["redis", "redis-sentinel", "rabbitmq", "prometheus"]},
                                 "name": {"type": "string"},
                                 "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                 "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                 "useCachedMetrics": {"type": "boolean"},
                                 "authenticationRef": {
                                     "type": "object", "additionalProperties": False, "required": ["name"],
                                     "properties": {"name": {"type": "string"},
                                                    "kind": {"enum": ["TriggerAuthentication",
                                                                      "ClusterTriggerAuthentication"]}}}}}}}}}},
    "TriggerAuthentication": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "TriggerAuthentication"},
            "metadata": _NAME_META,
            "spec": {"type": "object", "additionalProperties": False, "properties": {"secretTargetRef": {
                "type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["parameter", "name", "key"],
                    "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                                   "key": {"type": "string"}}}}}}}},
}
# Per scaler: metadata keys it requires, those it accepts, and those that must be whole numbers.
SCALERS = {
    "redis": ({"listName", "listLength"}, {"address", "host", "port", "databaseIndex", "activationListLength",
                                            "enableTLS", "unsafeSsl", "addressFromEnv", "passwordFromEnv"},
              {"listLength", "activationListLength", "databaseIndex"}),
    "rabbitmq": ({"queueName", "mode", "value"}, {"protocol", "activationValue", "vhostName", "hostFromEnv"},
                 {"value", "activationValue"}),
}


def keda_docs(name: str) -> list[dict[str, Any]]:
    return load_yaml(K8S / name)


@pytest.mark.parametrize("name", AUTOSCALING)
def test_keda_manifests_validate_against_the_schema_of_the_fields_they_use(name: str) -> None:
    import jsonschema

    for doc in keda_docs(name):
        jsonschema.validate(doc, KEDA_SCHEMA[doc["kind"]])
        for trigger in doc["spec"].get("triggers", []):
            required, optional, numbers = SCALERS[trigger["type"]]
            metadata = trigger["metadata"]
            assert required <= set(metadata), f"{name}: {trigger['type']} trigger lacks {required - set(metadata)}"
            assert set(metadata) <= required | optional, f"{name}: unknown {set(metadata) - required - optional}"
            for key in numbers & set(metadata):
                assert metadata[key].isdigit(), f"{name}: {key}={metadata[key]!r} is not a whole number"


def test_the_schema_check_rejects_what_keda_would() -> None:
    import jsonschema

    (gpu,) = [d for d in keda_docs("autoscaling.yaml") if d["metadata"]["name"] == "stylequeue-worker-gpu"]
    broken = json.loads(json.dumps(gpu))
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 2  # KEDA reads metadata as strings only
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KEDA_SCHEMA["ScaledObject"])
    broken = json.loads(json.dumps(gpu))
    broken["spec"]["minReplicas"] = 0  # the HPA's name for it, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KEDA_SCHEMA["ScaledObject"])


@pytest.mark.parametrize("name", AUTOSCALING)
def test_scaled_objects_scale_the_workers_on_their_queues(name: str) -> None:
    from stylequeue.broker import BULK_QUEUE, INTERACTIVE_QUEUE

    docs = keda_docs(name)
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d["spec"] for d in docs if d["kind"] == "ScaledObject"}
    assert set(scaled) == {d["metadata"]["name"] for d in k8s_workers()}
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    secrets = {d["metadata"]["name"]: d for d in load_yaml(K8S / "secret.example.yaml")}
    secret_text = (K8S / "secret.example.yaml").read_text()
    for spec in scaled.values():
        assert spec["maxReplicaCount"] >= max(1, spec["minReplicaCount"])
        for trigger in spec["triggers"]:
            queue = trigger["metadata"].get("listName") or trigger["metadata"].get("queueName")
            assert queue in (BULK_QUEUE, INTERACTIVE_QUEUE)
            auth = auths[trigger["authenticationRef"]["name"]]
            for ref in auth["spec"]["secretTargetRef"]:
                # A key the example Secret sets, or names in a comment for the variant that needs it.
                assert ref["key"] in secrets[ref["name"]]["stringData"] or f"# {ref['key']}:" in secret_text, ref
    gpu, cpu = scaled["stylequeue-worker-gpu"], scaled["stylequeue-worker-cpu"]
    # Bulk (GPU) workers scale to zero and wake on the bulk queue; CPU workers keep an interactive floor.
    assert gpu["minReplicaCount"] == 0
    assert [t["metadata"].get("listName", t["metadata"].get("queueName")) for t in gpu["triggers"]] == [BULK_QUEUE]
    assert cpu["minReplicaCount"] >= 1
    assert INTERACTIVE_QUEUE in [t["metadata"].get("listName", t["metadata"].get("queueName")) for t in cpu["triggers"]]
    # Scaling down must leave a worker time to hand its jobs back: KEDA's HPA sends SIGTERM like any other.
    for spec in scaled.values():
        assert spec["cooldownPeriod"] >= 60


def test_kustomization_takes_one_autoscaling_variant() -> None:
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert [r for r in resources if r in AUTOSCALING] == ["autoscaling.yaml"]
