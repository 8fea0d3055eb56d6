"""The worker's metrics endpoint listens on loopback unless told otherwise (issue 14.7)."""

from __future__ import annotations

import urllib.request

from stylequeue.embedded import free_port
from stylequeue.worker.metrics import WorkerMetrics


def test_metrics_listen_on_loopback_by_default_and_on_the_address_given() -> None:
    metrics = WorkerMetrics()
    metrics.count_job("succeeded", "tiny")
    server, _ = metrics.serve(free_port())
    try:
        assert server.server_address[0] == "127.0.0.1"
        port = server.server_address[1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'stylequeue_jobs_total{state="succeeded",style="tiny"} 1.0' in text
    finally:
        server.shutdown()
        server.server_close()
    opened, _ = WorkerMetrics().serve(free_port(), "0.0.0.0")
    try:
        assert opened.server_address[0] == "0.0.0.0"
    finally:
        opened.shutdown()
        opened.server_close()
