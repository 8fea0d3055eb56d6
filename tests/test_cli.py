"""The `stylequeue` command through a real subprocess: output formats and every exit code (docs/cli.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stylequeue.embedded import free_port
from stylequeue.jobs import PUBLIC_FIELDS


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stylequeue", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def env(redis_url: str, tiny_registry: Path, tmp_path: Path) -> dict[str, str]:
    values = dict(os.environ)
    values.update({
        "STYLEQUEUE_REDIS_URL": redis_url,
        "STYLEQUEUE_STYLES": str(tiny_registry),
        "STYLEQUEUE_STORAGE_URL": f"file://{tmp_path}/store",
    })
    return values


def submit_one(env: dict[str, str]) -> str:
    result = cli("submit", "s3://photos/a.jpg", "--style", "tiny", env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_submit_then_status_json_is_the_spec_record(env: dict[str, str]) -> None:
    job_id = submit_one(env)
    assert job_id.startswith("j_")
    result = cli("status", job_id, "--json", env=env)
    assert result.returncode == 0
    record = json.loads(result.stdout)
    assert list(record) == list(PUBLIC_FIELDS)
    assert record["id"] == job_id and record["state"] == "queued" and record["style"] == "tiny"
    human = cli("status", job_id, env=env)
    assert job_id in human.stdout and "queued" in human.stdout


def test_status_of_several_ids_prints_a_list(env: dict[str, str]) -> None:
    ids = [submit_one(env), submit_one(env)]
    result = cli("status", *ids, "--json", env=env)
    assert result.returncode == 0
    assert [r["id"] for r in json.loads(result.stdout)] == ids


def test_submit_json_and_wait_flags(env: dict[str, str]) -> None:
    result = cli("submit", "s3://photos/a.jpg", "--style", "tiny", "--priority", "bulk", "--json", env=env)
    assert result.returncode == 0
    assert json.loads(result.stdout)["priority"] == "bulk"


def test_exit_2_unknown_style_in_one_line(env: dict[str, str]) -> None:
    result = cli("submit", "s3://photos/a.jpg", "--style", "nope", env=env)
    assert result.returncode == 2
    assert "unknown style 'nope'" in result.stderr and "tiny" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_exit_2_bad_setting_names_the_variable(env: dict[str, str]) -> None:
    result = cli("status", "j_x", env=env | {"STYLEQUEUE_MAX_BATCH": "many"})
    assert result.returncode == 2
    assert "STYLEQUEUE_MAX_BATCH" in result.stderr and "Traceback" not in result.stderr


def test_exit_2_bad_config_file(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('s3_addressing_style = "sideways"\n')
    result = cli("status", "j_x", "--config", str(bad), env=env)
    assert result.returncode == 2
    assert "s3_addressing_style" in result.stderr and "'path'" in result.stderr


def test_config_file_is_read_and_env_wins(env: dict[str, str], tmp_path: Path, redis_url: str) -> None:
    conf = tmp_path / "conf.toml"
    conf.write_text(f'redis_url = "{redis_url}"\nstyles = "{env["STYLEQUEUE_STYLES"]}"\n')
    only_file = {k: v for k, v in env.items() if k not in ("STYLEQUEUE_REDIS_URL", "STYLEQUEUE_STYLES")}
    result = cli("submit", "s3://photos/b.jpg", "--style", "tiny", "--config", str(conf), env=only_file)
    assert result.returncode == 0, result.stderr
    dead = f"redis://127.0.0.1:{free_port()}/0"
    result = cli("submit", "s3://photos/b.jpg", "--style", "tiny", "--config", str(conf),
                 env=only_file | {"STYLEQUEUE_REDIS_URL": dead})
    assert result.returncode == 4


def test_exit_3_unknown_job_and_precedence(env: dict[str, str]) -> None:
    result = cli("status", "j_nosuchjob", env=env)
    assert result.returncode == 3 and "j_nosuchjob" in result.stderr
    job_id = submit_one(env)
    both = cli("status", job_id, "j_nosuchjob", "--json", env=env)
    assert both.returncode == 3
    assert [r["id"] for r in json.loads(both.stdout)] == [job_id]


def test_exit_4_redis_unreachable_names_the_url(env: dict[str, str]) -> None:
    port = free_port()
    result = cli("status", "j_x", env=env | {"STYLEQUEUE_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert result.returncode == 4
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_exit_5_wait_timeout_and_exit_1_cancelled(env: dict[str, str]) -> None:
    job_id = submit_one(env)
    result = cli("wait", job_id, "--timeout", "0.5", env=env)
    assert result.returncode == 5 and "still queued" in result.stderr
    cancelled = cli("cancel", job_id, "--json", env=env)
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["state"] == "cancelled"
    again = cli("cancel", job_id, env=env)
    assert again.returncode == 0 and "cancelled" in again.stdout
    waited = cli("wait", job_id, "--json", env=env)
    assert waited.returncode == 1 and json.loads(waited.stdout)["state"] == "cancelled"
    # precedence: not found (3) beats failed (1)
    assert cli("wait", job_id, "j_nosuchjob", env=env).returncode == 3


def test_styles_lists_the_registry(env: dict[str, str]) -> None:
    result = cli("styles", "--json", env=env)
    assert result.returncode == 0, result.stderr
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert sorted(entries) == ["ink-demo", "tiny"]  # STYLEQUEUE_STYLES adds to the bundled registry
    assert entries["tiny"]["max_side"] == 64 and entries["tiny"]["model"].startswith("tiny@")
    # the registry is a file: listing it works without Redis
    offline = cli("styles", "--json", env=env | {"STYLEQUEUE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert offline.returncode == 0 and "tiny" in {e["name"] for e in json.loads(offline.stdout)}


def test_debug_shows_traceback(env: dict[str, str]) -> None:
    result = cli("status", "j_x", "--debug", env=env | {"STYLEQUEUE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert result.returncode == 4 and "Traceback" in result.stderr


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at module level or inside functions."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_command_modules_never_import_each_other_and_job_commands_skip_the_worker() -> None:
    package = Path(__file__).parent.parent / "stylequeue" / "cli"
    jobs, ops = imported_modules(package / "jobs.py"), imported_modules(package / "ops.py")
    assert not any(name.startswith("stylequeue.worker") for name in jobs), sorted(jobs)
    assert not any(name.startswith("stylequeue.cli.ops") for name in jobs)
    assert not any(name.startswith("stylequeue.cli.jobs") for name in ops)
    common = imported_modules(package / "common.py")
    assert not any(name.startswith(("stylequeue.cli.jobs", "stylequeue.cli.ops")) for name in common)
    # the light producer import: `stylequeue submit --help` loads neither Paddle nor the worker package
    code = ("import sys; from stylequeue.cli import app; "
            "print(','.join(m for m in ('paddle', 'stylequeue.worker.service') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_submit_with_the_broker_down_exits_4_naming_the_broker(env: dict[str, str]) -> None:
    result = cli("submit", "s3://photos/a.jpg", "--style", "tiny",
                 env=env | {"STYLEQUEUE_BROKER_URL": f"amqp://127.0.0.1:{free_port()}//"})
    assert result.returncode == 4, result.stderr
    assert "broker" in result.stderr and "nothing was submitted" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
