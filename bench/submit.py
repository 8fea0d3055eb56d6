"""How fast producers enqueue: `Client.submit_many` and `Client.submit` against a private Redis.

Prints a Markdown table: jobs/s for bulk submission (pipelined records, BULK_CHUNK_SIZE jobs per message) and for
single interactive submits, each next to a plain Celery `send_task` per job measured in the same run.

    python bench/submit.py [--jobs 20000]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from stylequeue.broker import BULK_CHUNK_SIZE
from stylequeue.embedded import EmbeddedRedis
from stylequeue.producer.client import Client


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--singles", type=int, default=2000)
    args = parser.parse_args()
    registry = Path(tempfile.mkdtemp()) / "styles.toml"
    registry.write_text('[styles.bench]\nweights = "none.pdparams"\nmax_side = 256\n')
    with EmbeddedRedis(persist=False) as server:
        client = Client(redis_url=server.url, styles=registry, storage_url="s3://bench-out")
        uris = [f"s3://bench-in/photos/{i:06d}.jpg" for i in range(args.jobs)]
        client.submit_many(uris[:100], style="bench")  # connections, scripts, imports warm
        server_flush = client.store.redis
        server_flush.flushdb()

        started = time.perf_counter()
        client.submit_many(uris, style="bench")
        bulk_s = time.perf_counter() - started
        server_flush.flushdb()

        started = time.perf_counter()
        for uri in uris[: args.singles]:
            client.submit(uri, style="bench")
        single_s = time.perf_counter() - started
        server_flush.flushdb()

        # Baseline: what a one-message-per-job producer pays, with no record at all.
        app = client.app
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(args.singles):
                app.send_task("bench.noop", args=[i], queue="bench", producer=producer)
        celery_s = time.perf_counter() - started
        client.close()

    bulk_rate, single_rate, celery_rate = args.jobs / bulk_s, args.singles / single_s, args.singles / celery_s
    print(f"# submit throughput — {cpu_name()}, {platform.python_version()}, Redis on 127.0.0.1:{server.port}\n")
    print("| path | jobs | seconds | jobs/s | vs plain Celery send_task |")
    print("|---|---|---|---|---|")
    print(f"| `submit_many` (bulk, {BULK_CHUNK_SIZE} jobs/message) | {args.jobs} | {bulk_s:.2f} | {bulk_rate:,.0f} | "
          f"{bulk_rate / celery_rate:.1f}x |")
    print(f"| `submit` (interactive, 1 job/message) | {args.singles} | {single_s:.2f} | {single_rate:,.0f} | "
          f"{single_rate / celery_rate:.1f}x |")
    print(f"| plain Celery `send_task`, no job record | {args.singles} | {celery_s:.2f} | {celery_rate:,.0f} | 1.0x |")


if __name__ == "__main__":
    main()
