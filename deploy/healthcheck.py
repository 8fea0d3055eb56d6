"""Container health of a `stylequeue worker`: is a worker on this host sending heartbeats to Redis?

Every worker process writes a heartbeat (`{prefix}workers`, field `{hostname}-{pid}`) every few
seconds from its lease-keeper thread, and `"ready": true` once Celery is consuming. This script
reads those with the same settings as the worker (STYLEQUEUE_* or STYLEQUEUE_CONFIG):

    healthcheck.py            liveness: exit 1 only when Redis answers and no worker on this host
                              has sent a heartbeat for --max-age seconds (the process is wedged or
                              gone). Redis unreachable exits 0: restarting the worker cannot fix Redis.
    healthcheck.py --ready    readiness: exit 0 only when Redis answers and a worker on this host has
                              a fresh heartbeat that says ready (models loaded, consuming).

Exit codes: 0 healthy, 1 unhealthy. One line on stdout says why.
"""

from __future__ import annotations

import argparse
import socket
import sys

from stylequeue.config.redis_url import redis_client
from stylequeue.config.settings import load_settings
from stylequeue.errors import StyleQueueError
from stylequeue.jobs import Presence, RedisJobStore


def local_heartbeats(store: RedisJobStore, hostname: str, max_age_s: float) -> dict[str, dict[str, object]]:
    """Fresh heartbeats of worker processes on `hostname` (worker ids are `{hostname}-{pid}`)."""
    prefix = f"{hostname}-"
    return {
        worker_id: info
        for worker_id, info in Presence(store).workers(max_age_s=max_age_s).items()
        if worker_id.startswith(prefix) and worker_id[len(prefix):].isdigit()
    }


def check(*, ready: bool, max_age_s: float | None, hostname: str) -> tuple[int, str]:
    """Return (exit code, reason)."""
    try:
        settings = load_settings()
    except StyleQueueError as exc:
        return 1, f"unhealthy: {exc}"
    age = max_age_s if max_age_s is not None else 2 * settings.lease_s
    # Short timeouts: a probe must answer well inside its own timeout.
    client = redis_client(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)  # sentinel form too
    store = RedisJobStore(client, key_prefix=settings.key_prefix)
    try:
        beats = local_heartbeats(store, hostname, age)
    except StyleQueueError as exc:  # RedisUnavailable
        if ready:
            return 1, f"not ready: {exc}"
        return 0, f"alive (unverified): {exc}"
    finally:
        client.close()
    if not beats:
        return 1, f"unhealthy: no worker on {hostname} sent a heartbeat in the last {age:g} s"
    if ready and not any(info.get("ready") for info in beats.values()):
        return 1, f"not ready: worker(s) {', '.join(sorted(beats))} still starting (loading models)"
    return 0, f"{'ready' if ready else 'alive'}: {', '.join(sorted(beats))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Health of the stylequeue worker(s) on this host.")
    parser.add_argument("--ready", action="store_true", help="Readiness: also require the worker to be consuming.")
    parser.add_argument("--max-age", type=float, default=None, metavar="S",
                        help="Heartbeat age that counts as dead (default: 2 x STYLEQUEUE_LEASE_S).")
    args = parser.parse_args(argv)
    code, reason = check(ready=args.ready, max_age_s=args.max_age, hostname=socket.gethostname())
    print(reason)
    return code


if __name__ == "__main__":
    sys.exit(main())
