"""The `stylequeue` command (docs/cli.md): one Typer app, its commands in two modules that never import each other.

`cli/common.py` holds the app, consoles, exit codes and the error edge; `cli/jobs.py` the producer's commands;
`cli/ops.py` the operator's. Importing both here registers every command on `app`.
"""

from __future__ import annotations

import sys

from stylequeue.cli import jobs, ops  # noqa: F401 - importing registers the commands
from stylequeue.cli.common import EXIT_USAGE, app, err
from stylequeue.errors import ConfigError


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # raised while building settings outside a command body
        err.print(f"error: {exc}", markup=False)
        sys.exit(EXIT_USAGE)


__all__ = ["app", "main"]
