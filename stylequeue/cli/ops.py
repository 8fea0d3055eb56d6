"""The operator's commands of `stylequeue`: worker, demo, serve, api, train, export, models import.

Heavy imports (Paddle, the worker, uvicorn) sit inside the command bodies, so `stylequeue submit` never pays them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from stylequeue.cli.common import EXIT_OK, ConfigOpt, DebugOpt, app, err, models_app, out, run
from stylequeue.errors import ConfigError
from stylequeue.models.quiet import import_paddle_quietly, quiet_paddle

# --- worker --------------------------------------------------------------------------------------


def setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        # Celery's two lines per message ("received", "succeeded") name task ids, not jobs, and a bulk
        # run sends thousands: job progress is in the job store, so they show at debug level only.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
def worker(
    device: Annotated[str | None, typer.Option(help="cpu or gpu:N (default: STYLEQUEUE_DEVICE).")] = None,
    gpus: Annotated[str | None, typer.Option(help="Supervise one worker process per GPU, e.g. 0,1.")] = None,
    styles: Annotated[str | None, typer.Option(help="Styles to load before consuming, e.g. a,b (default all).")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Largest batch (STYLEQUEUE_MAX_BATCH).")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Longest wait for batch-mates.")] = None,
    concurrency: Annotated[int, typer.Option(help="Job threads for fetch/decode/encode/store (0 = auto).")] = 0,
    codec_procs: Annotated[int | None, typer.Option(
        help="Processes that decode and encode bulk jobs (default: one per core up to 4 on a GPU or with "
             "the null runtime, none when the model runs on the CPU; 0 = none).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    metrics_addr: Annotated[str, typer.Option(
        help="Address the metrics port listens on; 0.0.0.0 where a scraper on another host must reach it.")
    ] = "127.0.0.1",
    no_callbacks: Annotated[bool, typer.Option("--no-callbacks", help="Do not deliver webhooks.")] = False,
    callbacks_only: Annotated[bool, typer.Option("--callbacks-only", help="Deliver webhooks only; no model.")] = False,
    hostname: Annotated[str | None, typer.Option(help="Celery node name (default stylequeue-DEVICE@HOST).")] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "info",
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run a worker: load models once, consume jobs in batches, store results, send callbacks."""

    def body() -> int:
        quiet_paddle(debug)  # before anything imports Paddle; the GPU children inherit it
        if gpus:
            return supervise_gpus(gpus)
        from stylequeue.config.settings import load_settings
        from stylequeue.worker.devices import check_device_usable, pin_device

        settings = load_settings(config, device=device, max_batch=max_batch, max_wait_ms=max_wait_ms)
        pin_device(settings.device)  # before anything imports Paddle
        setup_logging(loglevel)
        from stylequeue.broker import make_celery_app
        from stylequeue.worker import tasks
        from stylequeue.worker.service import WorkerOptions, WorkerService, require_runtime

        names = [s.strip() for s in styles.split(",") if s.strip()] if styles else None
        if not callbacks_only:
            require_runtime(settings, names)  # before Redis: a machine that cannot serve says so first
            if not debug:
                import_paddle_quietly()
            check_device_usable(settings.device)  # one line and exit 2, not a traceback from deep in a runtime

        options = WorkerOptions(
            styles=names,
            threads=concurrency, codec_processes=codec_procs, models=not callbacks_only, callbacks=not no_callbacks,
            metrics_port=metrics_port, metrics_addr=metrics_addr, lease_s=settings.lease_s,
        )
        celery_app = make_celery_app(settings)
        # Build (and load models) before Celery starts, so a bad setup exits 2/4 in one line.
        tasks.install(WorkerService(settings, options, celery_app).start())
        # Celery's own CLI expands %h; its Worker class, started from here, would show it as is.
        node = (hostname or f"stylequeue-{settings.device.replace(':', '')}-{options.worker_id}@%h").replace(
            "%h", socket.gethostname())
        celery_worker = celery_app.Worker(
            hostname=node, pool_cls="threads", concurrency=8, queues=options.queues, loglevel=loglevel.upper(),
            without_mingle=True, without_gossip=True, optimization="fair",
        )
        celery_worker.start()
        return int(celery_worker.exitcode or 0)

    run(debug, body)


def _check_new_style(registry: Path, style: str) -> None:
    """A style may be added to a registry only once; a malformed registry is reported before any conversion."""
    from stylequeue.config.styles import parse_registry

    if registry.exists() and registry.read_text().strip() and style in parse_registry(registry):
        raise ConfigError(f"{registry} already has a style {style!r}: choose another --style or edit the file")


def without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv minus `--name value` and `--name=value` for each name."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{n}=" for n in names)):
            kept.append(arg)
    return kept


def supervise_gpus(gpus: str) -> int:
    """`--gpus 0,1`: one `stylequeue worker --device gpu:N` child per GPU, restarted if it crashes."""
    from stylequeue.worker.devices import Supervisor

    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise ConfigError(f"--gpus takes GPU indices separated by commas, e.g. 0,1; got {gpus!r}")
    passthrough = without_options(sys.argv[2:], ("--gpus", "--device", "--hostname"))
    children = {
        f"gpu{g}": [sys.executable, "-m", "stylequeue", "worker", "--device", f"gpu:{g}",
                    "--hostname", f"stylequeue-gpu{g}@%h", *passthrough]
        for g in ids
    }
    setup_logging("info")
    supervisor = Supervisor(children)
    code = supervisor.run()
    if code and supervisor.reasons:
        err.print(f"error: stopped supervising: {'; '.join(supervisor.reasons.values())}", markup=False)
    return code


# --- one-machine use, models, training -------------------------------------------------------


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where inputs, outputs and the contact sheet go.")] = Path(
        "stylequeue-demo"),
    style: Annotated[str | None, typer.Option(help="Style to show (default: the bundled demo style).")] = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """End to end with no setup: private Redis, a worker, sample photos, callbacks, a before/after sheet."""

    def body() -> int:
        from stylequeue.config.settings import load_settings
        from stylequeue.demo import run_demo

        settings = load_settings(config)
        run_demo(out_dir, style=style, registry=settings.styles)
        return EXIT_OK

    run(debug, body)


@app.command()
def serve(
    data: Annotated[Path, typer.Option(
        help="Data directory: redis/ and logs/ (private), files/ (inputs/, outputs/), client.env.")] = Path(
        "stylequeue-data"),
    styles: Annotated[str | None, typer.Option(help="Styles to preload, e.g. a,b.")] = None,
    redis_port: Annotated[int, typer.Option(help="Port of the embedded Redis (127.0.0.1).", min=1, max=65535)] = 6390,
    api_port: Annotated[int, typer.Option(help="Port of the HTTP gateway (127.0.0.1).", min=1, max=65535)] = 8000,
    no_api: Annotated[bool, typer.Option("--no-api", help="Do not start the HTTP gateway.")] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """All-in-one for a single machine: embedded Redis + a worker + the HTTP gateway, until Ctrl-C.

    Writes DATA/client.env with every variable a client needs: `set -a; . DATA/client.env; set +a`.
    """

    def body() -> int:
        from stylequeue.config.settings import load_settings
        from stylequeue.serve import ServeOptions, run_serve

        if config is not None:
            load_settings(config)  # a bad file is one line and exit 2 here, not in the worker's log
            os.environ["STYLEQUEUE_CONFIG"] = str(config.resolve())  # the worker and the gateway read it too
        worker_args = ["--styles", styles] if styles else []
        options = ServeOptions(data, redis_port=redis_port, api_port=None if no_api else api_port,
                               worker_args=worker_args + (["--debug"] if debug else []))
        return run_serve(options, console=out)

    run(debug, body)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """HTTP gateway (docs/http.md): the job API over HTTP for the tenants of STYLEQUEUE_API_TENANTS
    (and the unscoped tokens of STYLEQUEUE_API_TOKENS), and a page to try it at /."""

    def body() -> int:
        import logging

        from stylequeue.config.settings import load_settings
        from stylequeue.config.tenants import load_tenants

        settings = load_settings(config)
        try:
            import python_multipart  # noqa: F401 - FastAPI's form parser (python-multipart), for photos sent to /v1/jobs
            import uvicorn

            from stylequeue.producer.gateway import make_app
        except ImportError as exc:
            raise ConfigError(f"the HTTP gateway needs its extra: pip install 'stylequeue[api]' ({exc})") from None
        from stylequeue.producer.client import Client

        tenants = load_tenants(settings.api_tenants) if settings.api_tenants else []
        tokens = [token.get_secret_value() for token in settings.api_tokens or []]
        gateway = make_app(Client(settings=settings), tokens, tenants=tenants)
        setup_logging("info")
        if tokens:
            logging.getLogger("stylequeue.gateway").warning(
                "STYLEQUEUE_API_TOKENS holds %d unscoped token(s): such a caller may name any input the workers can "
                "read and any output they may write; give each caller a tenant in STYLEQUEUE_API_TENANTS instead",
                len(tokens))
        uvicorn.run(gateway, host=host, port=port, log_level="info")
        return EXIT_OK

    run(debug, body)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Training recipe (YAML or TOML).", show_default=False)],
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming the checkpoint.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps in this run.")] = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Train a CycleGAN from a recipe; prints the registry entry of the trained style.

    The recipe holds everything training needs; `--config` is checked like every command's, and used by none
    of training's steps.
    """

    def body() -> int:
        quiet_paddle(debug)
        if config is not None:
            from stylequeue.config.settings import load_settings

            load_settings(config)
        from stylequeue.models.train import train as run_training

        run_training(recipe, resume=not fresh, max_steps=max_steps, console=out)  # prints paths and the entry
        return EXIT_OK

    run(debug, body)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to file descriptor 1 (C++ libraries included) to stderr for a while."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@app.command()
def export(
    style: Annotated[str, typer.Option("--style", "-s", help="Registered style name.")],
    fmt: Annotated[str, typer.Option("--format", help="paddle or onnx.")] = "paddle",
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Export a style's generator for fast inference (cached by weights hash)."""

    def body() -> int:
        quiet_paddle(debug)
        from stylequeue.config.settings import load_settings
        from stylequeue.config.styles import StyleCatalog
        from stylequeue.models.export import export_model

        if fmt not in ("paddle", "onnx"):
            raise ConfigError(f"--format must be paddle or onnx, got {fmt!r}")
        settings = load_settings(config)
        spec = StyleCatalog(settings.styles).get(style)
        with stdout_to_stderr():  # paddle2onnx prints progress on fd 1; stdout carries only the path
            path = export_model(spec, fmt=fmt, cache_dir=settings.cache_dir)  # type: ignore[arg-type]
        out.print(str(path))
        return EXIT_OK

    run(debug, body)


@models_app.command("import")
def models_import(
    file: Annotated[Path, typer.Argument(help="PaddleGAN .pdparams or original-CycleGAN .pth.", show_default=False)],
    style: Annotated[str, typer.Option("--style", "-s", help="Name for the style.")],
    direction: Annotated[str, typer.Option(help="AtoB (netG_A) or BtoA (netG_B) for full checkpoints.")] = "AtoB",
    dest: Annotated[Path | None, typer.Option(help="Where to write the converted weights.")] = None,
    registry: Annotated[Path | None, typer.Option(
        help="Add the entry to this styles registry (made if missing; workers see it within a second). "
             "Default: STYLEQUEUE_STYLES if set, else only print the entry.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Convert a checkpoint to a bare Paddle generator and print its registry entry.

    Checkpoints are pickles: import only files you trust.
    """

    def body() -> int:
        quiet_paddle(debug)
        from stylequeue.models.weights import import_weights

        if direction not in ("AtoB", "BtoA"):
            raise ConfigError(f"--direction must be AtoB or BtoA, got {direction!r}")
        if not file.exists():
            raise ConfigError(f"{file} not found")
        target = dest or file.with_name(f"{style}.pdparams")
        registry_file = registry or (Path(os.environ["STYLEQUEUE_STYLES"]) if os.environ.get("STYLEQUEUE_STYLES")
                                     else None)
        if registry_file is not None:
            _check_new_style(registry_file, style)
        snippet = import_weights(file, target, direction=direction, style=style)
        if registry_file is None:
            err.print(f"wrote {target}; add this to your styles registry (STYLEQUEUE_STYLES), or pass --registry:")
            sys.stdout.write(snippet)
            return EXIT_OK
        registry_file.parent.mkdir(parents=True, exist_ok=True)
        existing = registry_file.read_text() if registry_file.exists() else ""
        registry_file.write_text(existing + ("\n" if existing and not existing.endswith("\n\n") else "") + snippet)
        err.print(f"wrote {target}; added style {style!r} to {registry_file} (workers reading it pick it up "
                  "within a second)")
        sys.stdout.write(snippet)
        return EXIT_OK

    run(debug, body)
