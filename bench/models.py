"""Benchmark every model runtime here against Paddle's dynamic graph and print Markdown tables.

    .venv/bin/python bench/models.py [--sizes 256 512] [--ngf 64] [--n-blocks 9] [--repeat 3]

CycleGAN ResnetGenerator with seeded random weights (Paddle's default initialisation), batch 1, one
photo-like input per size (1/f colour noise, the probe `auto` uses). Each runtime runs once untimed, then
`--repeat` times; the median is reported. PSNR compares each output with fp32 dygraph's on the same input
(images in [-1, 1] mapped to [0, 1]). Then `auto` chooses as a worker would, and its ratio is shown.
The machine is shared and noisy (+-15% run to run): the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stylequeue.models.runtime import Selection

# (runtime, precision) -> side -> (median ms, PSNR dB against fp32 dygraph)
Results = dict[tuple[str, str], dict[int, tuple[float, float]]]


def _versions() -> str:
    names = ["paddlepaddle", "paddle2onnx", "openvino", "onnxruntime", "torch"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _write_style(directory: Path, ngf: int, n_blocks: int, seed: int) -> Path:
    import paddle

    from stylequeue.models.generator import ResnetGenerator

    paddle.seed(seed)
    paddle.save(ResnetGenerator(ngf=ngf, n_blocks=n_blocks).state_dict(), str(directory / "bench.pdparams"))
    registry = directory / "styles.toml"
    registry.write_text(f'[styles.bench]\nweights = "bench.pdparams"\nngf = {ngf}\nn_blocks = {n_blocks}\n')
    return registry


def _time(run: object, x: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    run(x)  # type: ignore[operator]
    durations, out = [], x
    for _ in range(repeat):
        start = time.perf_counter()
        out = run(x)  # type: ignore[operator]
        durations.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(durations), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--n-blocks", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: every core this process may use")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from stylequeue.models import runtime_backends as backends

    threads = args.threads or backends.default_threads()
    pairs = [("dygraph", "fp32"), ("paddle-inference", "fp32"), ("paddle-inference", "bf16"),
             ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("torch", "fp32"), ("torch", "bf16")]
    pairs = [(name, precision) for name, precision in pairs
             if backends.runtime_installed(name) and (precision != "bf16" or backends.cpu_has_bf16())]
    load_before = os.getloadavg()[0]
    results: Results = {}
    # paddle2onnx and Paddle print progress on the C level: keep stdout for the tables alone.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        selection = _measure_all(args, pairs, threads, results)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    load_after = os.getloadavg()[0]
    _print_tables(args, threads, results, selection.info, load_before, load_after)
    return 0


def _measure_all(args: argparse.Namespace, pairs: list[tuple[str, str]], threads: int, results: Results) -> Selection:
    from stylequeue.config.styles import parse_registry
    from stylequeue.models.runtime import build_runtime, probe_input, psnr_db, release, select_runtime

    with tempfile.TemporaryDirectory(prefix="sq-bench-") as tmp:
        spec = parse_registry(_write_style(Path(tmp), args.ngf, args.n_blocks, args.seed))["bench"]
        inputs = {side: probe_input(side) for side in args.sizes}
        references: dict[int, np.ndarray] = {}
        for name, precision in pairs:
            print(f"timing {name} {precision} ...", file=sys.stderr, flush=True)
            try:
                runtime = build_runtime(name, precision, spec, device="cpu", cache_dir=tmp, threads=threads)
            except Exception as exc:  # report and go on, as `auto` does
                print(f"  {name} {precision} unavailable: {exc}", file=sys.stderr)
                continue
            for side, x in inputs.items():
                ms, out = _time(runtime.run, x, args.repeat)
                if name == "dygraph":
                    references[side] = out
                results.setdefault((name, precision), {})[side] = (ms, psnr_db(references[side], out))
            release(runtime)
        print("choosing with auto ...", file=sys.stderr, flush=True)
        selection = select_runtime(spec, cache_dir=Path(tmp) / "auto", threads=threads)
        release(selection.runtime)
    return selection


def _print_tables(args: argparse.Namespace, threads: int, results: Results, info: dict[str, Any],
                  load_before: float, load_after: float) -> None:
    from stylequeue.models import runtime_backends as backends

    cpu = backends.cpu_info()
    bf16_flags = [flag for flag in ("avx512_bf16", "amx_bf16", "amx_tile") if flag in cpu["flags"]] or ["none"]
    print(f"CPU: {cpu['model']} ({threads} threads; bf16 flags: {', '.join(bf16_flags)}); {_versions()}")
    print(f"ResnetGenerator ngf {args.ngf}, {args.n_blocks} blocks, batch 1, median of {args.repeat} after one "
          f"untimed run; load average {load_before:.2f} before, {load_after:.2f} after.\n")
    base = results.get(("dygraph", "fp32"), {})
    for side in args.sizes:
        print(f"### {side}x{side}\n")
        print("| runtime | precision | ms / image | img/s | vs dygraph | PSNR vs fp32 dygraph |")
        print("|---|---|---|---|---|---|")
        for (name, precision), by_size in results.items():
            ms, psnr = by_size[side]
            ratio = f"{base[side][0] / ms:.1f}x" if side in base else "-"
            score = "-" if name == "dygraph" else ("identical" if math.isinf(psnr) else f"{psnr:.1f} dB")
            print(f"| {name} | {precision} | {ms:.0f} | {1000.0 / ms:.2f} | {ratio} | {score} |")
        print()
    chosen = (info["runtime"], info["precision"])
    ratios = [f"{base[s][0] / results[chosen][s][0]:.1f}x dygraph at {s}x{s}"
              for s in args.sizes if chosen in results and s in base]
    print(f"auto picks **{chosen[0]} {chosen[1]}**: {', '.join(ratios) or 'not in the table'}.\n")
    print("auto's own measurement (at load, on its 128 px probe):\n")
    print("| runtime | precision | ms | PSNR | passes 40 dB |")
    print("|---|---|---|---|---|")
    for row in info["candidates"]:
        score = "reference" if row.get("reference") else ("-" if row["psnr_db"] is None else f"{row['psnr_db']} dB")
        print(f"| {row['runtime']} | {row['precision']} | {row['ms']} | {score} | "
              f"{'yes' if row['ok'] else row.get('error', 'no')} |")


if __name__ == "__main__":
    sys.exit(main())
