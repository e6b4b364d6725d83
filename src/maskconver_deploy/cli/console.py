"""All terminal output: results to stdout (a table for people, JSON for machines), logs and progress to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _stderr_console():  # rich is imported lazily: `--help` stays fast
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def log(message: str) -> None:
    """A progress or status line on stderr."""
    _stderr_console().print(message, markup=False)


def warn(message: str) -> None:
    _stderr_console().print(f"warning: {message}", style="yellow", markup=False)


def print_json(obj: Any) -> None:
    """Machine-readable result on stdout."""
    from maskconver_deploy.fileio import _json_default

    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def fmt(value: Any, digits: int = 2) -> str:
    """Human formatting for table cells."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        text = f"{value:.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None) -> None:
    """A table on stdout, one row per dict; `columns` picks and orders the keys."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=escape(title) if title else None, show_lines=False)
    for col in columns:
        table.add_column(escape(col), overflow="fold")
    for row in rows:  # cells are text, never markup: 'pip install ".[tflite]"' must print as written
        table.add_row(*(escape(fmt(row.get(col))) for col in columns))
    Console(highlight=False, width=max(120, len(columns) * 14)).print(table)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr (quiet when stderr is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=_stderr_console(), transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(description, total=total, status="")
        for item in items:
            yield item
            bar.advance(task)


class ProgressBar:
    """A progress bar whose status text can be updated (e.g. training losses)."""

    def __init__(self, description: str, total: int, completed: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=_stderr_console(),
            disable=not sys.stderr.isatty(),
        )
        self._task = self._progress.add_task(description, total=total, completed=completed, status="")

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, advance: int = 1, status: str = "") -> None:
        self._progress.update(self._task, advance=advance, status=status)
