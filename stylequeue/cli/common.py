"""What every `stylequeue` command shares: the Typer app, the consoles, exit codes and the error edge (docs/cli.md).

Exit codes: 0 ok; 1 a waited job failed or was cancelled; 2 usage/configuration; 3 job not found;
4 Redis unreachable; 5 `wait` timed out. Several ids: each is handled, and the exit code is the first
of 4, 3, 5, 1 that occurred. Errors are one line on stderr (a traceback only with --debug).

Command modules (`cli/jobs.py`, `cli/ops.py`) import this one and never each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from stylequeue.errors import JobNotFound, RedisUnavailable, StyleQueueError, WaitTimeout

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REDIS, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_PRECEDENCE = (EXIT_REDIS, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_JOB_FAILED)

app = typer.Typer(
    name="stylequeue",
    help="Restyle photos with CycleGAN generators, asynchronously: Redis + Celery workers + object storage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(help="Manage model weights.", no_args_is_help=True)
app.add_typer(models_app, name="models")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Settings TOML file (keys = STYLEQUEUE_* names, lower case).", envvar="STYLEQUEUE_CONFIG")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table (the job record: docs/jobs.md).")]


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, RedisUnavailable):
        return EXIT_REDIS
    if isinstance(exc, JobNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, WaitTimeout):
        return EXIT_TIMEOUT
    return EXIT_USAGE


def fail(exc: BaseException, debug: bool) -> NoReturn:
    if debug:
        err.print_exception()
    err.print(f"error: {exc}", markup=False)
    raise typer.Exit(exit_code_for(exc))


def run(debug: bool, body: Callable[[], int | None]) -> None:
    """Run a command body, turning stylequeue's errors into one line and an exit code."""
    try:
        code = body()
    except typer.Exit:
        raise
    except (StyleQueueError, TimeoutError) as exc:
        fail(exc, debug)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    raise typer.Exit(code or EXIT_OK)


def first_exit(codes: Iterable[int]) -> int:
    seen = set(codes)
    return next((code for code in EXIT_PRECEDENCE if code in seen), EXIT_OK)
