"""The operator's commands through real subprocesses: export, models import, train, worker set-up
errors, and a worker started the Celery way (`celery -A stylequeue.worker.app worker`). `serve`: test_serve.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from stylequeue import Client, JobState
from stylequeue.config.styles import parse_registry
from stylequeue.embedded import EmbeddedRedis, free_port
from tests.conftest import empty_database
from tests.workers import make_image, worker_env

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stylequeue", *args], env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


PADDLE_NOISE = re.compile(r"No ccache found|!!!!!|^[IWE]\d{4} \d\d:\d\d|OMP_NUM_THREADS", re.MULTILINE)


def quiet_env(**settings: str) -> dict[str, str]:
    """os.environ plus `settings`, minus any GLOG_minloglevel an in-process test left: the command must set it."""
    return {k: v for k, v in os.environ.items() if k != "GLOG_minloglevel"} | settings


def test_export_paddle_and_onnx(tiny_registry: Path, tmp_path: Path) -> None:
    env = quiet_env(STYLEQUEUE_STYLES=str(tiny_registry), STYLEQUEUE_CACHE_DIR=str(tmp_path / "cache"))
    exported = cli("export", "--style", "tiny", env=env)
    paddle_dir = Path(exported.stdout.strip())
    assert paddle_dir.is_dir() and any(p.suffix == ".pdiparams" for p in paddle_dir.iterdir())
    assert not PADDLE_NOISE.search(exported.stderr), exported.stderr  # Paddle's unactionable warnings stay hidden
    result = cli("export", "--style", "tiny", "--format", "onnx", env=env)
    assert result.returncode == 0, result.stderr
    assert not PADDLE_NOISE.search(result.stderr), result.stderr
    onnx_dir = Path(result.stdout.strip())
    assert any(p.suffix == ".onnx" for p in onnx_dir.iterdir())
    assert cli("export", "--style", "nope", env=env).returncode == 2
    assert cli("export", "--style", "tiny", "--format", "tflite", env=env).returncode == 2


def test_models_import_a_paddlegan_checkpoint(tmp_path: Path) -> None:
    from stylequeue.models.generator import ResnetGenerator

    paddle.seed(5)
    g_a, g_b = ResnetGenerator(ngf=8, n_blocks=2), ResnetGenerator(ngf=8, n_blocks=2)
    checkpoint = tmp_path / "cyclegan.pdparams"
    paddle.save({"netG_A": g_a.state_dict(), "netG_B": g_b.state_dict(), "netD_A": {}, "netD_B": {}, "epoch": 3},
                str(checkpoint))
    result = cli("models", "import", str(checkpoint), "--style", "mine", "--direction", "BtoA",
                 "--dest", str(tmp_path / "mine.pdparams"), env=quiet_env())
    assert result.returncode == 0, result.stderr
    assert not PADDLE_NOISE.search(result.stderr), result.stderr
    registry = tmp_path / "styles.toml"
    registry.write_text(result.stdout)
    spec = parse_registry(registry)["mine"]
    assert (spec.ngf, spec.n_blocks) == (8, 2)
    imported = paddle.load(spec.weights)
    for key, value in g_b.state_dict().items():
        np.testing.assert_array_equal(imported[key].numpy(), value.numpy())
    missing = cli("models", "import", str(tmp_path / "absent.pth"), "--style", "x")
    assert missing.returncode == 2 and "not found" in missing.stderr
    # --registry adds the entry to a registry a running worker reads (issue 17.4), once per name
    shared = tmp_path / "live" / "styles.toml"
    added = cli("models", "import", str(checkpoint), "--style", "mine", "--registry", str(shared),
                "--dest", str(tmp_path / "mine2.pdparams"), env=quiet_env())
    assert added.returncode == 0, added.stderr
    assert "mine" in parse_registry(shared) and str(shared) in added.stderr
    again = cli("models", "import", str(checkpoint), "--style", "mine", "--registry", str(shared),
                "--dest", str(tmp_path / "mine3.pdparams"), env=quiet_env())
    assert again.returncode == 2 and "already has a style 'mine'" in again.stderr
    assert not (tmp_path / "mine3.pdparams").exists()


def test_train_command_runs_a_recipe(tmp_path: Path) -> None:
    for domain, seed in (("trainA", 1), ("trainB", 2)):
        folder = tmp_path / "data" / domain
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{i}.png").write_bytes(make_image(40, 40, seed=seed * 10 + i))
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "cli-ink"\ndata_dir = "data"\noutput_dir = "out"\nsteps = 2\ncrop_size = 32\n'
                      'ngf = 4\nn_blocks = 1\nndf = 4\ncheckpoint_every = 1\nthreads = 1\n')
    result = cli("train", str(recipe), env=quiet_env())
    assert result.returncode == 0, result.stderr
    assert not PADDLE_NOISE.search(result.stderr), result.stderr
    assert "[styles.cli-ink]" in result.stdout
    assert (tmp_path / "out" / "checkpoint.pdparams").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndata_dir = "data"\nsteps = -1\n')
    refused = cli("train", str(bad))
    assert refused.returncode == 2 and "steps" in refused.stderr


def test_worker_with_no_runtime_exits_2_naming_what_to_install(tmp_path: Path, tiny_registry: Path) -> None:
    """Neither Paddle nor PyTorch (ONNX Runtime and OpenVINO alone have no export to read): one line, exit 2."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['paddle'] = sys.modules['torch'] = None\n")
    pythonpath = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, STYLEQUEUE_STYLES=str(tiny_registry),
               STYLEQUEUE_CACHE_DIR=str(tmp_path / "cache"), STYLEQUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    result = cli("worker", env=env, timeout=60)
    assert result.returncode == 2
    assert "stylequeue[torch]" in result.stderr and "stylequeue[cpu]" in result.stderr
    assert "paddlepaddle-gpu" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_worker_with_unreachable_redis_exits_4(tiny_registry: Path) -> None:
    port = free_port()
    env = dict(os.environ, STYLEQUEUE_STYLES=str(tiny_registry), STYLEQUEUE_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    result = cli("worker", env=env, timeout=60)
    assert result.returncode == 4 and str(port) in result.stderr


def test_worker_with_unknown_style_exits_2(redis_url: str, tiny_registry: Path) -> None:
    env = dict(os.environ, STYLEQUEUE_STYLES=str(tiny_registry), STYLEQUEUE_REDIS_URL=redis_url)
    result = cli("worker", "--styles", "tiny,nope", env=env, timeout=60)
    assert result.returncode == 2 and "nope" in result.stderr


def test_worker_started_the_celery_way(redis_server: EmbeddedRedis, tiny_registry: Path, tmp_path: Path) -> None:
    url = empty_database(redis_server, 4)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(make_image(50, 30))
    env = worker_env(url, tiny_registry, f"file://{tmp_path}/out", input_roots=str(inputs))
    log = open(tmp_path / "celery.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "stylequeue.worker.app", "worker", "-P", "threads",
                               "-Q", "stylequeue.interactive,stylequeue.bulk,stylequeue.callbacks",
                               "--without-mingle", "--without-gossip", "-l", "info"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = Client(redis_url=url, styles=tiny_registry, storage_url=f"file://{tmp_path}/out",
                        input_roots=str(inputs))
        job = client.wait(client.submit(f"file://{inputs}/a.png", style="tiny").id, timeout=120)
        assert job.state == JobState.SUCCEEDED, (tmp_path / "celery.log").read_text()[-2000:]
        assert (job.width, job.height) == (52, 32)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        log.close()


def test_gpu_options_on_a_machine_without_cuda_exit_2_in_one_line(tmp_path: Path, tiny_registry: Path) -> None:
    if paddle.device.is_compiled_with_cuda():
        pytest.skip("this Paddle has CUDA: gpu devices are usable here")
    # Redis unreachable on purpose: the device check comes first, so this is exit 2, not 4
    env = quiet_env(STYLEQUEUE_STYLES=str(tiny_registry), STYLEQUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    single = cli("worker", "--device", "gpu:0", env=env, timeout=120)
    assert single.returncode == 2, single.stderr
    assert len(single.stderr.strip().splitlines()) == 1, single.stderr
    expected = ("can use a GPU", "paddlepaddle-gpu", "stylequeue[torch]", "--device cpu")
    assert all(part in single.stderr for part in expected)
    assert "Traceback" not in single.stderr
    supervised = cli("worker", "--gpus", "0,1", env=env, timeout=180)
    assert supervised.returncode == 2, supervised.stderr
    last = supervised.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped supervising") and "gpu0 exited 2" in last and "gpu1 exited 2" in last
    assert supervised.stderr.count("restarting in") == 0  # a configuration error is never retried
