"""The `maskconver` command line. Thin: each command parses options and calls the library.

Errors: a `UserError` (bad input, unavailable backend) prints one line and exits 2; a `CheckFailed`
exits 1 with a summary; nothing prints a traceback for either. Heavy libraries (torch, runtimes,
matplotlib) are imported inside commands, so `maskconver --help` is instant.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from maskconver_deploy.errors import MaskconverError

app = typer.Typer(
    name="maskconver",
    help=(
        "MaskConver panoptic segmentation from a PyTorch reference to every runtime: train, export one ONNX "
        "graph with the post-processing fused in, compile per backend (ONNX Runtime, ORT mobile, TFLite, "
        "TensorRT), check parity against the reference, evaluate PQ, benchmark latency and write reports."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings wrap like prose: single line breaks are joined
)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map the toolkit's errors to one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MaskconverError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def command(target: typer.Typer, name: str, fn: Callable[..., Any]) -> None:
    """Register `fn` as command `name` of `target`, with the error mapping."""
    target.command(name)(handle_errors(fn))


def _register() -> None:
    from maskconver_deploy.cli import (
        bench,
        calib,
        compile,
        data,
        doctor,
        eval,
        export,
        info,
        list_cmd,
        parity,
        pipeline,
        predict,
        report,
        train,
    )

    command(app, "info", info.info)
    command(app, "predict", predict.predict)
    app.add_typer(data.app, name="data")
    command(app, "train", train.train)
    command(app, "eval", eval.eval_cmd)
    command(app, "export", export.export)
    command(app, "compile", compile.compile_cmd)
    command(app, "list", list_cmd.list_cmd)
    app.add_typer(calib.app, name="calib")
    command(app, "parity", parity.parity)
    command(app, "bench", bench.bench)
    command(app, "report", report.report)
    command(app, "pipeline", pipeline.pipeline)
    command(app, "doctor", doctor.doctor)


_register()


def main() -> None:
    """Console entry point."""
    try:
        app()
    except MaskconverError as exc:  # raised outside a command (should not happen, but never a traceback)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
