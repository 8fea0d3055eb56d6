"""Long-poll latency of the HTTP gateway: from a job's `finished_at` to the waiting request's answer.

A real `stylequeue api` (uvicorn, one process) over a private Redis; N jobs submitted for one tenant; N
requests wait on them at once (`GET /v1/jobs/{id}?wait=30`); then a script finishes the jobs, the way a
worker's finishing script does (the same Lua, the same PUBLISH): spaced out, one every `--gap-ms`, and as a
burst of all N in one call. Latency = the time the answer arrived minus the record's `finished_at` (both
this machine's clock: Redis `TIME` and `time.time()`), in ms. The baseline, measured in the same run, is
one plain `GET /v1/jobs/{id}` round trip: the least any client could pay to learn of the finish, had it
asked at exactly the right moment.

    python bench/longpoll.py [--jobs 200] [--gap-ms 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from stylequeue.config.tenants import token_digest
from stylequeue.embedded import EmbeddedRedis, free_port
from stylequeue.jobs import Change, JobState
from stylequeue.producer.client import Client

TOKEN = "bench-longpoll-token-0123456789"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def get(port: int, path: str, timeout: float = 60) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
    answer = connection.getresponse()
    body = answer.read()
    connection.close()
    return answer.status, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


def waiting(port: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("stylequeue_api_waiting_requests"))


def finished_ms(record: dict) -> float:
    return datetime.fromisoformat(record["finished_at"].replace("Z", "+00:00")).timestamp() * 1000


def run_round(port: int, client: Client, count: int, gap_ms: float, root: Path) -> list[float]:
    """Latencies (ms) of `count` long polls whose jobs a script finishes `gap_ms` apart (0: all at once)."""
    jobs = [client.submit(f"file://{root}/in/{i}.jpg", "ink-demo", tenant="bench") for i in range(count)]
    latencies: list[float] = []
    lock = threading.Lock()

    def wait(job_id: str) -> None:
        status, record = get(port, f"/v1/jobs/{job_id}?wait=30")
        arrived = time.time() * 1000
        assert status == 200 and record["state"] == "succeeded", record
        with lock:
            latencies.append(arrived - finished_ms(record))

    threads = [threading.Thread(target=wait, args=(job.id,)) for job in jobs]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while waiting(port) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    store = client.store
    store.transition_many([Change(job.id, JobState.QUEUED, JobState.RUNNING) for job in jobs])
    if gap_ms <= 0:
        store.transition_many([Change(job.id, JobState.RUNNING, JobState.SUCCEEDED) for job in jobs])
    else:
        for job in jobs:
            store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED)
            time.sleep(gap_ms / 1000)
    for thread in threads:
        thread.join(60)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sq-longpoll-"))
    (root / "in").mkdir()
    tenants = root / "tenants.toml"
    tenants.write_text(f'[tenants.bench]\ntoken_sha256 = "{token_digest(TOKEN)}"\ninputs = ["file://{root}/in/"]\n'
                       f'outputs = "file://{root}/outputs/bench/"\nrequests_per_minute = 1000000\n')
    with EmbeddedRedis(persist=False) as server:
        port = free_port()
        env = dict(os.environ, STYLEQUEUE_REDIS_URL=server.url, STYLEQUEUE_STORAGE_URL=f"file://{root}",
                   STYLEQUEUE_INPUT_ROOTS=str(root / "in"), STYLEQUEUE_API_TENANTS=str(tenants))
        env.pop("STYLEQUEUE_STYLES", None)  # the bundled registry: the gateway only reads it
        gateway = subprocess.Popen([sys.executable, "-m", "stylequeue", "api", "--port", str(port)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = Client(redis_url=server.url, storage_url=f"file://{root}", input_roots=str(root / "in"))
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if get(port, "/healthz", timeout=2)[0] == 200:
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.2)
            probe = client.submit(f"file://{root}/in/probe.jpg", "ink-demo", tenant="bench")
            for _ in range(20):  # connections, imports and the subscriber warm
                get(port, f"/v1/jobs/{probe.id}")
            started = time.perf_counter()
            rounds = 200
            for _ in range(rounds):
                get(port, f"/v1/jobs/{probe.id}")
            plain_ms = (time.perf_counter() - started) / rounds * 1000
            run_round(port, client, 20, args.gap_ms, root)  # warm the long-poll path
            spaced = run_round(port, client, args.jobs, args.gap_ms, root)
            burst = run_round(port, client, args.jobs, 0, root)
        finally:
            gateway.terminate()
            gateway.wait(30)
            client.close()
    print(f"## bench/longpoll.py — {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
    print(f"{args.jobs} requests waiting at once on one gateway process (uvicorn); jobs finished by a script "
          "(the finishing Lua, its PUBLISH).\n")
    print("| jobs finished | p50 ms | p99 ms | max ms | p50 / plain GET |")
    print("|---|---|---|---|---|")
    for name, values in ((f"one every {args.gap_ms:g} ms", spaced), (f"all {args.jobs} at once", burst)):
        p50 = statistics.median(values)
        print(f"| {name} | {p50:.1f} | {percentile(values, 99):.1f} | {max(values):.1f} | {p50 / plain_ms:.1f}x |")
    print(f"\nBaseline: a plain GET /v1/jobs/{{id}} round trip, same run: {plain_ms:.2f} ms.")


if __name__ == "__main__":
    main()
