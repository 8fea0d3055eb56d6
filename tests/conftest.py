"""Real services for the suite, started once per session: a Redis server and an S3 (moto) server.

Nothing here touches a service the suite did not start (the machine's own Redis on 6379 included).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from stylequeue.embedded import EmbeddedRedis, free_port

# boto3 reads credentials from its usual chain; the moto server accepts any.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(_name, _value)
# No test may pick up a developer's own settings.
for _name in [n for n in os.environ if n.startswith("STYLEQUEUE_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(persist=False) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    """Database 0 of the session's Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    yield redis_server.url


def empty_database(server: EmbeddedRedis, db: int) -> str:
    """URL of database `db` of the session's Redis, emptied: test modules that run their own worker
    process each take a database of their own (1-15), so the per-test flush of db 0 never hits them."""
    url = server.url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real HTTP S3 endpoint (moto's server mode) on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    name = f"{name}-{free_port()}"[:63]
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


def write_tiny_style(directory: Path, *, name: str = "tiny", ngf: int = 4, n_blocks: int = 1,
                     max_side: int = 64, output: str = "png", seed: int = 0) -> Path:
    """A registry with one tiny, randomly initialised ResnetGenerator; returns the registry path."""
    import paddle

    from stylequeue.models.generator import ResnetGenerator

    directory.mkdir(parents=True, exist_ok=True)
    paddle.seed(seed)
    generator = ResnetGenerator(ngf=ngf, n_blocks=n_blocks)
    paddle.save(generator.state_dict(), str(directory / f"{name}.pdparams"))
    registry = directory / "styles.toml"
    registry.write_text(
        f'[styles.{name}]\nweights = "{name}.pdparams"\nngf = {ngf}\nn_blocks = {n_blocks}\n'
        f'max_side = {max_side}\noutput = "{output}"\ndescription = "tiny test style"\n'
    )
    return registry


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a styles.toml holding style `tiny` (ngf 4, 1 block, 64 px, png)."""
    return write_tiny_style(tmp_path_factory.mktemp("styles"))
