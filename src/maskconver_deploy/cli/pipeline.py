"""`maskconver pipeline`: the main job, what `make demo` runs (export, compile, parity, eval, bench, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskconver_deploy.cli.options import DataOpt, ForceOpt, SplitOpt
from maskconver_deploy.errors import CheckFailed


def pipeline(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="PyTorch checkpoint of the reference model.")] = Path("models/shapes-256.pt"),
    data: DataOpt = None,
    split: SplitOpt = "val",
    backends: Annotated[str, typer.Option("--backends", "-b", help="'all' (unavailable ones are listed as skipped) or a comma list; torch is always included.")] = "all",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: report.md, report.html, plots/ and results/.")] = Path("reports/pipeline"),
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="Images to evaluate (default 50, 4 with --quick).")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration folder for the int8 backends.")] = Path("calibration/shapes-64"),
    threads: Annotated[int, typer.Option("--threads", "-t", min=1, help="Threads for every runtime (evaluation and timing).")] = 2,
    sizes: Annotated[Optional[str], typer.Option("--sizes", help="Input sizes to time (default 256,384,640; none with --quick).")] = None,
    proposals: Annotated[Optional[str], typer.Option("--proposals", help="Proposal counts to time (default 100,50,20,15,10; none with --quick).")] = None,
    merges: Annotated[Optional[str], typer.Option("--merges", help="Merge paths to build and measure (default input,feature,input-legacy). The checkpoint's own goes through every step; each other path is built for fp32 ort and tflite, checked (fp32 parity against PyTorch of the same path), evaluated with ort on the same images and timed at the model's N and 100 proposals; input-legacy is only timed, for the post-processing comparison.")] = None,
    work: Annotated[Optional[Path], typer.Option("--work", help="Folder for the exported and compiled artifacts and generated data (default artifacts/pipeline/NAME).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run: few images, 5 timed runs, no size/proposal sweep.")] = False,
    force: ForceOpt = False,
) -> None:
    """Run everything on one checkpoint and write a report: data -> export -> compile -> parity -> eval -> bench -> report.

    Exit code 1, after the report is written, when a build this machine can do, a parity verdict, an evaluation,
    a timing or a step failed; backends that cannot run here are listed as skipped, with the reason.
    """
    from maskconver_deploy.bench import parse_int_list, parse_merges
    from maskconver_deploy.cli.console import ProgressBar, log, print_table
    from maskconver_deploy.pipeline import STEPS, Pipeline, PipelineOptions, summary_rows

    options = PipelineOptions(
        checkpoint=checkpoint,
        data=data,
        split=split,
        backends=backends,
        out=out,
        n_images=n,
        quick=quick,
        force=force,
        calib=calib,
        threads=threads,
        sizes=parse_int_list(sizes, "--sizes", minimum=32),
        proposals=parse_int_list(proposals, "--proposals"),
        work=work,
        merges=parse_merges(merges),
    )
    job = Pipeline(options, log)
    with ProgressBar("pipeline", total=len(STEPS)) as bar:
        record = job.run(bar)
    columns = ["backend", "merge", "status", "PQ", "ΔPQ", "parity", "median ms", "vs torch", "MB", "note"]
    print_table(summary_rows(job), columns=columns, title=f"maskconver pipeline: {record.seconds:.0f} s")
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    failures = job.failures()
    if failures:
        for line in failures:
            log(f"failed: {line}")
        raise CheckFailed(f"{len(failures)} failure(s) in the pipeline run (listed above and in the report)")
