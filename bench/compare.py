"""A benchmark of this tree next to the same benchmark of an older commit, measured in the same run.

The older code is taken from git (`git archive REF`, nothing checked out over this tree) into a temporary
directory; each round runs the benchmark script of the baseline tree, then this tree's, each in its own
process with PYTHONPATH on its own tree (worker processes inherit it). Every `jobs/s` cell of the tables
the script prints is collected per row, and each row is reported as this tree's median over the baseline's
median, with both medians. Alternating rounds spread the drift of a shared machine over both sides.

    python bench/compare.py --baseline fe5ea24 -- bench/e2e.py --skip-model --null-jobs 8000
    python bench/compare.py --baseline fe5ea24 --rounds 3 -- bench/submit.py
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def extract(ref: str, into: Path) -> Path:
    """The tree of commit `ref`, unpacked into `into`."""
    archive = subprocess.run(["git", "-C", str(HERE), "archive", "--format=tar", ref], check=True,
                             capture_output=True).stdout
    tar_path = into / "tree.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def rates(output: str) -> dict[str, float]:
    """Row label -> the row's `jobs/s` figure, from every markdown table in `output`."""
    found: dict[str, float] = {}
    column = None
    for line in output.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if "jobs/s" in cells:
            column = cells.index("jobs/s")
            continue
        if column is None or column >= len(cells) or set(cells[0]) <= set("-"):
            continue
        number = re.sub(r"[^0-9.]", "", cells[column])
        if number:
            found[re.sub(r"\s+", " ", cells[0])] = float(number)
    return found


def run(tree: Path, script: list[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    env = {k: v for k, v in env.items() if not k.startswith("STYLEQUEUE_")}
    done = subprocess.run([sys.executable, str(tree / script[0]), *script[1:]], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{tree / script[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git commit of the older code, e.g. fe5ea24")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one benchmark run may take")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- bench/SCRIPT.py [its options]")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("name the benchmark script after --")
    work = Path(tempfile.mkdtemp(prefix="sq-compare-"))
    try:
        baseline = extract(args.baseline, work)
        samples: dict[str, dict[str, list[float]]] = {"baseline": {}, "current": {}}
        for round_ in range(1, args.rounds + 1):
            for side, tree in (("baseline", baseline), ("current", HERE)):
                output = run(tree, script, args.timeout)
                for label, rate in rates(output).items():
                    samples[side].setdefault(label, []).append(rate)
                print(f"round {round_}, {side}: " + "; ".join(f"{k} {v:,.0f}" for k, v in rates(output).items()),
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"\n## {' '.join(script)}: this tree ({commit}, with local changes if any) vs {args.baseline}, "
          f"{args.rounds} alternating rounds, {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| row | baseline jobs/s (median) | this tree jobs/s (median) | ratio |")
    print("|---|---|---|---|")
    for label, values in samples["current"].items():
        old = samples["baseline"].get(label)
        if not old:
            continue
        new_median, old_median = statistics.median(values), statistics.median(old)
        print(f"| {label} | {old_median:,.0f} | {new_median:,.0f} | {new_median / old_median:.2f}x |")


if __name__ == "__main__":
    main()
