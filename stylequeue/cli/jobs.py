"""The job commands of `stylequeue`: submit, status, wait, cancel, styles, bulk (docs/cli.md).

The producer's side: nothing here imports `stylequeue.worker` or Paddle, so these commands stay light.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from stylequeue.cli.common import (
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    ConfigOpt,
    DebugOpt,
    JsonOpt,
    app,
    err,
    first_exit,
    out,
    run,
)
from stylequeue.config.settings import file_uri_absolute
from stylequeue.errors import ConfigError, JobNotFound, RedisUnavailable, WaitTimeout


def make_client(config: Path | None) -> Any:
    from stylequeue.producer.client import Client

    client = Client(config=config)
    client.store.ping()  # fail fast (exit 4) before doing anything else
    return client


# --- output -------------------------------------------------------------------------------------

_STATE_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}


def print_records(records: list[dict[str, Any]], as_json: bool, single: bool) -> None:
    if as_json:
        payload: Any = records[0] if single and len(records) == 1 else records
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=28)
    for column in ("state", "style", "attempts"):
        table.add_column(column, no_wrap=True)
    table.add_column("output / error", overflow="fold")
    for rec in records:
        detail = rec["output_uri"] if rec["state"] != "failed" else f"{rec['error']['code']}: {rec['error']['message']}"
        colour = _STATE_STYLE.get(rec["state"], "")
        table.add_row(rec["id"], f"[{colour}]{rec['state']}[/]", rec["style"], str(rec["attempts"]), detail)
    out.print(table)


# --- job commands -------------------------------------------------------------------------------


@app.command()
def submit(
    uris: Annotated[list[str], typer.Argument(
        help="Input images: s3://, file:// (a relative file://./a.jpg means this directory), http(s)://",
        show_default=False)],
    style: Annotated[str, typer.Option("--style", "-s", help="Registered style name.")],
    output: Annotated[str | None, typer.Option(help="Output URI (one input) or prefix ending in / (several).")] = None,
    callback: Annotated[str | None, typer.Option(help="Webhook URL called when the job finishes.")] = None,
    priority: Annotated[str, typer.Option(help="interactive or bulk.")] = "interactive",
    deadline: Annotated[float | None, typer.Option(
        help="Seconds the job may wait to be started; later it ends cancelled (error 'expired').")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the jobs to finish.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: seconds to wait.")] = 600,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Submit images for restyling; prints the job id(s)."""

    def body() -> int:
        client = make_client(config)
        if output and len(uris) > 1 and not output.endswith("/"):
            raise ConfigError("with several inputs, --output is a prefix and must end with '/'")
        inputs = [file_uri_absolute(uri) for uri in uris]
        target = file_uri_absolute(output) if output else None
        if len(inputs) == 1:
            jobs = [client.submit(inputs[0], style=style, callback_url=callback, output_uri=target, priority=priority,
                                  deadline_s=deadline)]
        else:
            jobs = client.submit_many(inputs, style, callback_url=callback, output_prefix=target, priority=priority,
                                      deadline_s=deadline)
        codes: list[int] = []
        if wait:
            jobs, codes = wait_all(client, [j.id for j in jobs], timeout)
        records = [client.to_json(j) for j in jobs]
        if as_json:
            print_records(records, True, single=len(uris) == 1)
        elif wait:
            print_records(records, False, single=False)
        else:
            for job in jobs:
                out.print(job.id)
        return first_exit(codes)

    run(debug, body)


def wait_all(client: Any, ids: list[str], timeout: float | None) -> tuple[list[Any], list[int]]:
    deadline = None if timeout is None else time.monotonic() + timeout
    jobs, codes = [], []
    for job_id in ids:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            job = client.wait(job_id, timeout=left)
            if job.state != "succeeded":
                codes.append(EXIT_JOB_FAILED)
        except WaitTimeout as exc:
            err.print(f"error: {exc}", markup=False)
            job = client.get(job_id)
            codes.append(EXIT_TIMEOUT)
        except JobNotFound as exc:
            err.print(f"error: {exc}", markup=False)
            codes.append(EXIT_NOT_FOUND)
            continue
        jobs.append(job)
    return jobs, codes


def each_job(ids: list[str], action: Callable[[str], Any], render: Callable[[Any], dict[str, Any]],
             as_json: bool) -> int:
    """Apply `action` to each id, print the records, and return the exit code (3 if any id is unknown)."""
    records, codes = [], []
    for job_id in ids:
        try:
            records.append(render(action(job_id)))
        except JobNotFound as exc:
            err.print(f"error: {exc}", markup=False)
            codes.append(EXIT_NOT_FOUND)
    if records:
        print_records(records, as_json, single=len(ids) == 1)
    return first_exit(codes)


@app.command()
def status(
    ids: Annotated[list[str], typer.Argument(help="Job ids.", show_default=False)],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show jobs' current records."""

    def body() -> int:
        client = make_client(config)
        return each_job(ids, client.get, client.to_json, as_json)

    run(debug, body)


@app.command()
def wait(
    ids: Annotated[list[str], typer.Argument(help="Job ids.", show_default=False)],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for all of them.")] = 600,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Wait until jobs finish; exit 1 if one failed or was cancelled, 5 on timeout."""

    def body() -> int:
        client = make_client(config)
        jobs, codes = wait_all(client, ids, timeout)
        if jobs:
            print_records([client.to_json(j) for j in jobs], as_json, single=len(ids) == 1)
        return first_exit(codes)

    run(debug, body)


@app.command()
def cancel(
    ids: Annotated[list[str], typer.Argument(help="Job ids.", show_default=False)],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Cancel queued or running jobs (a finished job is left as it is)."""

    def body() -> int:
        client = make_client(config)
        return each_job(ids, client.cancel, client.to_json, as_json)

    run(debug, body)


@app.command()
def styles(as_json: JsonOpt = False, config: ConfigOpt = None, debug: DebugOpt = False) -> None:
    """List registered styles and the runtime each live worker chose for them."""

    def body() -> int:
        from stylequeue.config.settings import load_settings
        from stylequeue.config.styles import StyleCatalog

        settings = load_settings(config)
        try:
            entries = make_client(config).styles()
        except RedisUnavailable:
            # The registry is a file: list it even when no Redis answers (no worker info then).
            entries = [spec.public_dict() | {"workers": {}} for _, spec in
                       sorted(StyleCatalog(settings.styles).all().items())]
        if as_json:
            sys.stdout.write(json.dumps(entries, indent=2) + "\n")
            return EXIT_OK
        table = Table(show_edge=False, pad_edge=False)
        for column in ("name", "model", "size", "output", "runtime (workers)", "description"):
            table.add_column(column)
        for entry in entries:
            chosen = sorted({f"{i.get('runtime')}/{i.get('precision')}" for i in entry["workers"].values()})
            table.add_row(entry["name"], entry.get("model") or "-", f"{entry['max_side']}px", entry["output"],
                          ", ".join(chosen) or "-", entry["description"])
        out.print(table)
        return EXIT_OK

    run(debug, body)


@app.command()
def bulk(
    src_prefix: Annotated[str, typer.Argument(help="Where the photos are: s3://bucket/prefix/ or file:///dir/.",
                                              metavar="SRC_PREFIX", show_default=False)],
    style: Annotated[str, typer.Option("--style", "-s", help="Registered style name.")],
    output: Annotated[str, typer.Option("--output", "-o", help="DST_PREFIX: outputs go to DST_PREFIX/<key>.<ext>.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the earlier run of SRC, style, DST.")] = False,
    max_in_flight: Annotated[int, typer.Option(help="Most jobs of this run unfinished at once.", min=1)] = 2000,
    limit: Annotated[int | None, typer.Option(help="Submit at most N jobs now; --resume does the rest.", min=0)] = None,
    failures: Annotated[Path | None, typer.Option(help="Write failed inputs here, one JSON object a line.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final report as JSON.")] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Restyle every image under SRC_PREFIX into DST_PREFIX, resumably; exit 1 if any failed, 130 on Ctrl-C."""

    def body() -> int:
        from stylequeue.producer.bulk import print_report, run_bulk, write_failures

        client = make_client(config)
        report = run_bulk(client, file_uri_absolute(src_prefix), style=style, dst_prefix=file_uri_absolute(output),
                          resume=resume, max_in_flight=max_in_flight, limit=limit, console=err)
        if failures is not None:
            write_failures(report.failures, failures)
        if as_json:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        else:
            print_report(report, out)
        return report.exit_code

    run(debug, body)
