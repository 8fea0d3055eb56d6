"""`stylequeue.restyle()`: a PaddleGAN-layout checkpoint restyles an image like a reference forward pass."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import paddle
import pytest
from PIL import Image

import stylequeue
from stylequeue.config.settings import load_settings
from stylequeue.models.generator import ResnetGenerator
from stylequeue.pipeline.images import decode_image, to_array, working_size
from tests.workers import make_image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def cyclegan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ResnetGenerator]:
    """A 9-block PaddleGAN weights file {netG_A, netG_B, netD_A, netD_B}; registry style uses netG_B."""
    folder = tmp_path_factory.mktemp("cyclegan")
    paddle.seed(11)
    g_a, g_b = ResnetGenerator(ngf=8, n_blocks=9), ResnetGenerator(ngf=8, n_blocks=9)
    paddle.save({"netG_A": g_a.state_dict(), "netG_B": g_b.state_dict(), "netD_A": {}, "netD_B": {}},
                str(folder / "cyclegan.pdparams"))
    registry = folder / "styles.toml"
    registry.write_text('[styles.paint]\nweights = "cyclegan.pdparams"\ndirection = "BtoA"\nngf = 8\n'
                        'n_blocks = 9\nmax_side = 96\noutput = "png"\n')
    g_b.eval()
    return registry, g_b


def reference(generator: ResnetGenerator, data: bytes, max_side: int) -> np.ndarray:
    image = decode_image(data, max_pixels=10**8)
    size = working_size(image.width, image.height, max_side)
    with paddle.no_grad():
        out = generator(paddle.to_tensor(to_array(image, size)[None])).numpy()[0]
    return np.clip(np.rint(out * 127.5 + 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def test_restyle_matches_a_reference_forward_pass(cyclegan, tmp_path: Path) -> None:
    registry, generator = cyclegan
    source = tmp_path / "photo.jpg"
    source.write_bytes(make_image(150, 100, "JPEG", seed=4))
    settings = load_settings(styles=registry, cache_dir=tmp_path / "cache")  # runtime auto
    result = stylequeue.restyle(source, "paint", tmp_path / "out.png", settings=settings)
    produced = np.asarray(Image.open(result.output).convert("RGB"))
    assert produced.shape == (64, 96, 3) and (result.width, result.height) == (96, 64)
    assert psnr(produced, reference(generator, source.read_bytes(), 96)) >= 40
    assert result.model.startswith("paint@") and result.runtime != "?"


def test_restyle_default_destination_and_uris(cyclegan, tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    registry, _ = cyclegan
    source = tmp_path / "cat.png"
    source.write_bytes(make_image(40, 40))
    settings = load_settings(styles=registry, cache_dir=tmp_path / "cache", runtime="dygraph",
                             s3_endpoint_url=s3_endpoint, s3_addressing_style="path")
    local = stylequeue.restyle(source, "paint", settings=settings)
    assert local.output == str(tmp_path / "cat-paint.png") and Path(local.output).exists()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="in/cat.png", Body=source.read_bytes())
    remote = stylequeue.restyle(f"s3://{s3_bucket}/in/cat.png", "paint", f"s3://{s3_bucket}/out/cat.png",
                                settings=settings)
    body = s3.get_object(Bucket=s3_bucket, Key="out/cat.png")
    assert body["ContentType"] == "image/png" and remote.width == 40
    assert Image.open(io.BytesIO(body["Body"].read())).size == (40, 40)


def test_restyle_unknown_style(cyclegan, tmp_path: Path) -> None:
    registry, _ = cyclegan
    with pytest.raises(stylequeue.UnknownStyle):
        stylequeue.restyle(tmp_path / "x.jpg", "nope", settings=load_settings(styles=registry))


PADDLE_NOISE = re.compile(r"No ccache found|!!!!!|^[IWE]\d{4} \d\d:\d\d|OMP_NUM_THREADS", re.MULTILINE)


def test_restyle_keeps_paddles_unactionable_warnings_out_of_the_callers_terminal(
        tiny_registry: Path, tmp_path: Path) -> None:
    # A fresh process, as a user's script is: Paddle first loads inside restyle(), and exports a static graph.
    (tmp_path / "a.png").write_bytes(make_image(40, 40))
    code = ("import sys; from stylequeue import restyle; from stylequeue.config.settings import Settings; "
            "print(restyle(sys.argv[1], 'tiny', settings=Settings(styles=sys.argv[2], runtime='paddle-inference', "
            "cache_dir=sys.argv[3])).output)")
    env = {k: v for k, v in os.environ.items() if k != "GLOG_minloglevel"}  # set by an in-process test, maybe
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png"), str(tiny_registry),
                             str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_file()
    assert not PADDLE_NOISE.search(result.stderr), result.stderr
