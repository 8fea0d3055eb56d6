"""The page at `/`, driven in a real headless Chromium through the whole flow: token, style, photo, presigned
upload straight to the S3 test server, long poll, before and after, download link. Real gateway, worker, moto.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); without them this test skips.
`SQ_PAGE_SCREENSHOT=docs/page.png` also saves the 390-px-wide screenshot the README shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import boto3
import pytest

from stylequeue.config.tenants import token_digest
from stylequeue.embedded import EmbeddedRedis, free_port
from stylequeue.jobs import RedisJobStore
from tests.conftest import empty_database
from tests.workers import WorkerProcess, wait_for, worker_env

TOKEN = "page-test-token-0123456789"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PHONE_WIDTH = 390


def browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM or ""
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", "--window-size=500,900"):
        options.add_argument(argument)
    # Both paths given: Selenium Manager (which would download a browser and driver) is never asked.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER or ""))
    # A window is never narrower than 500 px; a phone's viewport is emulated instead.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": PHONE_WIDTH, "height": 820, "deviceScaleFactor": 1, "mobile": True})
    return driver


@pytest.fixture
def stack(redis_server: EmbeddedRedis, s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> Iterator[str]:
    """A gateway (tenant `page`, uploads in the bucket) and a worker with the bundled demo style; yields the URL."""
    port = free_port()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    # The browser posts the photo and fetches the result straight from the store: it must allow this origin.
    s3.put_bucket_cors(Bucket=s3_bucket, CORSConfiguration={"CORSRules": [{
        "AllowedOrigins": [f"http://127.0.0.1:{port}"], "AllowedMethods": ["GET", "POST"], "AllowedHeaders": ["*"]}]})
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.page]\ntoken_sha256 = "{token_digest(TOKEN)}"\ninputs = ["s3://{s3_bucket}/page/"]\n'
                       f'outputs = "s3://{s3_bucket}/results/page/"\nuploads = "s3://{s3_bucket}/page/up/"\n')
    registry = Path(str(files("stylequeue.config").joinpath("bundled/styles.toml")))
    env = worker_env(empty_database(redis_server, 14), registry, f"s3://{s3_bucket}", s3_endpoint_url=s3_endpoint,
                     s3_addressing_style="path", api_tenants=str(tenants))
    worker = WorkerProcess(env, tmp_path / "worker.log")
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115 - closed below
    gateway = subprocess.Popen([sys.executable, "-m", "stylequeue", "api", "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        worker.wait_ready(180)

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
            except OSError:
                return False

        assert wait_for(up, timeout=60), (tmp_path / "api.log").read_text()[-2000:]
        yield f"http://127.0.0.1:{port}"
    finally:
        gateway.terminate()
        gateway.wait(30)
        log.close()
        worker.stop()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
def test_a_person_restyles_a_photo_on_a_phone_sized_page(stack: str, tmp_path: Path, s3_bucket: str,
                                                         redis_server: EmbeddedRedis) -> None:
    pytest.importorskip("selenium", reason="the page test drives Chromium with selenium (the dev extra)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    photo = Path(str(files("stylequeue").joinpath("demo_assets/cat.jpg")))
    driver = browser(tmp_path / "profile")
    try:
        driver.get(stack + "/")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#style option"))
        Select(driver.find_element(By.ID, "style")).select_by_value("ink-demo")
        driver.find_element(By.ID, "photo").send_keys(str(photo))
        driver.find_element(By.ID, "go").click()
        done = WebDriverWait(driver, 240, poll_frequency=0.5).until(
            lambda d: d.find_element(By.ID, "status").text.startswith(("Done", "Job failed", "Job cancelled"))
            or "refused" in d.find_element(By.ID, "status").text or None)
        assert done, driver.find_element(By.ID, "status").text
        status = driver.find_element(By.ID, "status").text
        assert status.startswith("Done"), status
        sizes = driver.execute_script(
            "return [before.naturalWidth, after.naturalWidth, after.naturalHeight, download.href, "
            "sessionStorage.getItem('stylequeue-token'), localStorage.length, document.cookie, "
            "document.documentElement.scrollWidth, after.getBoundingClientRect().right]")
        before_width, after_width, after_height, download, kept, stored, cookies, page_width, right = sizes
        assert before_width > 0 and after_width > 0 and after_height > 0  # both photos show
        assert download.startswith("blob:")  # the result was fetched, ready to save
        assert kept == TOKEN and stored == 0 and cookies == ""  # the token lives in this tab only
        assert page_width <= PHONE_WIDTH and right <= PHONE_WIDTH  # nothing runs off a phone's screen
        job_id = driver.find_element(By.ID, "job-id").text
        screenshot = tmp_path / "page.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get("SQ_PAGE_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["SQ_PAGE_SCREENSHOT"])
    finally:
        driver.quit()
    from PIL import Image

    with Image.open(screenshot) as shot:
        assert shot.width == PHONE_WIDTH
    store = RedisJobStore.from_url(empty_database_url(redis_server))
    job = store.get(job_id)
    # the photo went phone -> store (under the tenant's uploads) -> job, never through the gateway
    assert job.input_uri.startswith(f"s3://{s3_bucket}/page/up/u_") and job.state == "succeeded"
    assert job.output_uri.startswith(f"s3://{s3_bucket}/results/page/ink-demo/")


def empty_database_url(server: EmbeddedRedis) -> str:
    return server.url.rsplit("/", 1)[0] + "/14"
