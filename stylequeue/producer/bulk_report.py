"""What `stylequeue bulk` reports: the live report of a run, its failures, and how the operator sees them."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

EXIT_INTERRUPTED = 130


@dataclass
class BulkFailure:
    """An input whose job did not succeed; `code` is the job's error code, `cancelled` or `missing`."""

    input_uri: str
    output_uri: str
    job_id: str
    code: str
    message: str


@dataclass
class BulkReport:
    """What a `run_bulk` call did; updated live while it runs (`on_progress` sees it)."""

    run_id: str
    src_prefix: str
    style: str
    dst_prefix: str
    total: int = 0  # images under SRC_PREFIX
    ignored: int = 0  # other objects there
    skipped: int = 0  # succeeded in an earlier invocation of the run
    submitted: int = 0  # jobs this invocation created
    succeeded: int = 0
    failures: list[BulkFailure] = field(default_factory=list)
    in_flight: int = 0  # jobs of the run not finished yet
    not_submitted: int = 0  # images left for a later --resume (Ctrl-C or `limit`)
    elapsed_s: float = 0.0
    interrupted: bool = False
    resumed: bool = False

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def failed_by_code(self) -> dict[str, int]:
        return dict(sorted(Counter(f.code for f in self.failures).items()))

    @property
    def images_per_s(self) -> float:
        return (self.succeeded + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """130 when interrupted, 1 when an input failed, else 0."""
        return EXIT_INTERRUPTED if self.interrupted else (1 if self.failures else 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(failed=self.failed, failed_by_code=self.failed_by_code,
                    images_per_s=round(self.images_per_s, 3), elapsed_s=round(self.elapsed_s, 3),
                    resume_command=resume_command(self))
        return data


# --- what the operator sees ----------------------------------------------------------------------


def progress_bar(console: Console | None, total: int) -> Any:
    """A started Rich progress bar (done/total, submitted, succeeded, failed, img/s, ETA), or None."""
    if console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("bulk"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                   TextColumn("ETA"), TimeRemainingColumn(), console=console)
    bar.add_task("bulk", total=total, detail="")
    bar.start()
    return bar


def resume_command(report: BulkReport) -> str:
    """The command line that continues this run."""
    return (f"stylequeue bulk {shlex.quote(report.src_prefix)} --style {shlex.quote(report.style)} "
            f"--output {shlex.quote(report.dst_prefix)} --resume")


def print_report(report: BulkReport, console: Console, *, max_failures: int = 10) -> None:
    """Counts, rate and the first failures, as the operator reads them at the end of a run."""
    codes = ", ".join(f"{code} {n}" for code, n in report.failed_by_code.items())
    lines = [
        f"bulk {report.src_prefix} -> {report.dst_prefix} (style {report.style}, run {report.run_id})",
        f"  images     {report.total}" + (f" ({report.ignored} other objects ignored)" if report.ignored else ""),
        f"  skipped    {report.skipped} (succeeded in an earlier invocation)",
        f"  submitted  {report.submitted}",
        f"  succeeded  {report.succeeded}",
        f"  failed     {report.failed}" + (f" ({codes})" if codes else ""),
        f"  elapsed    {report.elapsed_s:.1f} s, {report.images_per_s:.2f} img/s",
    ]
    if report.in_flight or report.not_submitted:
        lines.append(f"  left       {report.in_flight} still running, {report.not_submitted} not submitted yet")
    for failure in report.failures[:max_failures]:
        lines.append(f"  FAILED {failure.input_uri}: {failure.code}: {failure.message}")
    if report.failed > max_failures:
        lines.append(f"  ... and {report.failed - max_failures} more (write them all with --failures FILE)")
    if report.interrupted or report.not_submitted:
        lines.append(f"to continue: {resume_command(report)}")
    for line in lines:
        console.print(line, markup=False)


def write_failures(failures: list[BulkFailure], path: Path) -> None:
    """One JSON object per failed input: input_uri, output_uri, job_id, code, message."""
    with open(path, "w", encoding="utf-8") as handle:
        for failure in failures:
            handle.write(json.dumps(asdict(failure)) + "\n")
