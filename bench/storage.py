"""file:// storage per job (write one output, read one input): today's walk from directory fds against the
resolve-then-open-by-path code it replaced, in the same run, on the same kind of files.

The baseline is the project's own `pipeline/storage.py` as of commit fe5ea24 (a realpath cache of 2 s
plus O_NOFOLLOW on the last component only), loaded from git history. Both use the same Settings:
outputs under `{storage}/outputs/{style}/` (a folder each), inputs from the storage root. fsync
dominates a write on most disks and is the same in both, so a second table stubs it out to show the
path handling alone. Rounds alternate between the two; each keeps its best round.

    python bench/storage.py [--dir /dev/shm] [--jobs 2000] [--output-kb 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stylequeue.config.settings import Settings
from stylequeue.pipeline.storage import Storage

BASELINE_COMMIT = "fe5ea24"
BASELINE_PATH = "stylequeue/pipeline/storage.py"


def load_baseline() -> types.ModuleType:
    """The storage module as it was before the fd walk, from git history."""
    repo = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(["git", "-C", str(repo), "show", f"{BASELINE_COMMIT}:{BASELINE_PATH}"],
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cannot load the baseline {BASELINE_COMMIT}:{BASELINE_PATH} from git: {exc}") from None
    module = types.ModuleType("baseline_storage")
    sys.modules[module.__name__] = module  # dataclasses and typing look modules up by name
    exec(compile(source, f"{BASELINE_COMMIT}:{BASELINE_PATH}", "exec"), module.__dict__)
    return module


@contextmanager
def fsync_stubbed(enabled: bool) -> Any:
    real = os.fsync
    if enabled:
        os.fsync = lambda fd: None  # type: ignore[assignment]
    try:
        yield
    finally:
        os.fsync = real


def per_job_us(storage: Any, storage_dir: Path, style: str, jobs: int, data: bytes) -> tuple[float, float]:
    """(wall, CPU) microseconds per job: write its output, read its input (inputs cycle over 64 files).

    CPU time (user + system of this process) is what the code itself costs; it moves far less than wall
    time when other processes share the machine. Wall time adds waiting for the disk.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(jobs):
        storage.write(f"file://{storage_dir}/outputs/{style}/j_{i}.jpg", data, "image/jpeg")
        assert storage.read(f"file://{storage_dir}/inputs/in_{i % 64}.jpg")
    return (time.perf_counter() - wall) / jobs * 1e6, (time.process_time() - cpu) / jobs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to make the scratch storage root (default: temp dir)")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--output-kb", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    baseline = load_baseline()
    data = os.urandom(args.output_kb * 1024)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        root = Path(scratch) / "data"
        (root / "inputs").mkdir(parents=True)
        for i in range(64):
            (root / "inputs" / f"in_{i}.jpg").write_bytes(data)
        settings = Settings(storage_url=f"file://{root}")
        stores = {"before (realpath cache)": baseline.Storage(settings), "now (fd walk)": Storage(settings)}
        print(f"## bench/storage.py — {cpu}, Python {platform.python_version()}, {scratch}, "
              f"{args.jobs} jobs of {args.output_kb} KB\n")
        for stub in (False, True):
            print("fsync stubbed out (path handling only)" if stub else "with fsync (what a worker pays)")
            print("| code | wall us per job | CPU us per job | CPU vs before |")
            print("|---|---|---|---|")
            results = {name: (float("inf"), float("inf")) for name in stores}
            with fsync_stubbed(stub):
                for _ in range(args.rounds):  # interleaved, best round: drift from other load hits both alike
                    for index, (name, store) in enumerate(stores.items()):
                        wall, cpu = per_job_us(store, root, f"style{index}", args.jobs, data)
                        results[name] = (min(results[name][0], wall), min(results[name][1], cpu))
            before = results["before (realpath cache)"][1]
            for name, (wall, cpu) in results.items():
                print(f"| {name} | {wall:,.1f} | {cpu:,.1f} | {cpu / before:.2f}x |")
            print()


if __name__ == "__main__":
    main()
