"""`maskconver report`: a results folder -> report.md, a self-contained report.html and plots/*.png."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskconver_deploy.cli.options import ForceOpt, JsonOpt
from maskconver_deploy.errors import UserError


def report(
    results: Annotated[Optional[Path], typer.Option("--results", "-r", help="Results folder (bench.json, parity.json, eval/, overlays/), or a pipeline output folder holding results/.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder, e.g. reports/NAME (gets report.md, report.html, plots/).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the deployment report from result files only (tables, performance targets, plots, paper reference)."""
    from maskconver_deploy.cli.console import log, print_json, print_table
    from maskconver_deploy.report import write_report

    if results is None or out is None:
        raise UserError("--results and --out are both required")
    written = write_report(results, out, force=force)
    if as_json:
        print_json({k: (str(v) if isinstance(v, Path) else v) for k, v in written.items()})
        return
    rows = [{"target": t["target"], "backend": t["subject"], "status": t["status"], "detail": t["detail"]} for t in written["targets"]]
    print_table(rows, columns=["target", "backend", "status", "detail"], title="Performance targets")
    log(f"wrote {written['markdown']}, {written['html']} and {len(written['plots'])} plots")
