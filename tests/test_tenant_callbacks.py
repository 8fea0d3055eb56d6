"""A tenant's callbacks are signed with its own webhook secret (worker/service.py's `callback_secrets`), by a
real callbacks-only worker reading the tenants file."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from stylequeue import verify_webhook
from stylequeue.config.tenants import token_digest
from stylequeue.embedded import EmbeddedRedis
from stylequeue.errors import StyleQueueError
from stylequeue.producer.client import Client
from tests.conftest import empty_database
from tests.workers import CallbackReceiver, WorkerProcess, wait_for, worker_env

TENANT_SECRET = "whsec_" + base64.b64encode(b"tenant-a-secret-bytes-0123").decode()
WORKER_SECRET = "whsec_" + base64.b64encode(b"the-workers-own-secret-bytes").decode()


@pytest.mark.slow
def test_callbacks_are_signed_with_the_jobs_tenants_secret(redis_server: EmbeddedRedis, tiny_registry: Path,
                                                          tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.a]\ntoken_sha256 = "{token_digest("a-token")}"\ninputs = ["s3://inputs/a/"]\n'
                       f'outputs = "s3://outputs/a/"\nwebhook_secret = "{TENANT_SECRET}"\n\n'
                       f'[tenants.b]\ntoken_sha256 = "{token_digest("b-token")}"\ninputs = ["s3://inputs/b/"]\n'
                       'outputs = "s3://outputs/b/"\n')
    url = empty_database(redis_server, 11)
    env = worker_env(url, tiny_registry, "s3://outputs", webhook_secret=WORKER_SECRET, api_tenants=str(tenants))
    receiver = CallbackReceiver()
    worker = WorkerProcess(env, tmp_path / "worker.log", "--callbacks-only").wait_ready()
    client = Client(redis_url=url, styles=tiny_registry, storage_url="s3://outputs", allow_private_networks=True)
    try:
        for tenant in ("a", "b", None):
            job = client.submit(f"s3://inputs/{tenant or 'x'}/p.jpg", "tiny", callback_url=receiver.url, tenant=tenant)
            client.cancel(job.id)  # a finished job with a callback owes one: the worker delivers it
        assert wait_for(lambda: len(receiver.received) == 3, timeout=60), worker.output()[-2000:]
        signed = {(body["input_uri"].split("/")[3]): item for body, item in zip(receiver.bodies(), receiver.received,
                                                                                 strict=True)}
        verify_webhook(TENANT_SECRET, signed["a"]["headers"], signed["a"]["body"])
        with pytest.raises(StyleQueueError):
            verify_webhook(WORKER_SECRET, signed["a"]["headers"], signed["a"]["body"])
        for other in ("b", "x"):  # a tenant without a secret, and a job of no tenant: the worker's secret
            verify_webhook(WORKER_SECRET, signed[other]["headers"], signed[other]["body"])
    finally:
        worker.stop()
        receiver.close()
        client.close()
