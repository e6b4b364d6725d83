"""`maskconver bench`: latency of every artifact of a model folder, interleaved, against PyTorch eager."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from maskconver_deploy.cli.options import ForceOpt, JsonOpt, JsonOutOpt, ModelDirOpt
from maskconver_deploy.errors import CheckFailed, UserError


def bench(
    model_dir: ModelDirOpt = None,
    backends: Annotated[str, typer.Option("--backends", "-b", help="Comma list of backends, or 'all'. The PyTorch reference 'torch' is always timed too (the speed-up baseline).")] = "torch,ort",
    sizes: Annotated[Optional[str], typer.Option("--sizes", help="Square input sizes, e.g. 256,384,640 (others than the model folder's are exported into MODEL_DIR/variants/).")] = None,
    proposals: Annotated[Optional[str], typer.Option("--proposals", help="Proposal counts, e.g. 100,50,20,15,10. Sizes are swept at the first count, counts at the first size.")] = None,
    merge: Annotated[Optional[str], typer.Option("--merge", help="Merge paths to time, a comma list of input, feature, official, input-legacy (default: the model folder's own). Other paths are exported into MODEL_DIR/variants/ and timed in the same interleaved groups, each with PyTorch eager of the same path as its speed-up baseline; the raw graph (network alone) is timed once a group, it has no merge in it.")] = None,
    threads: Annotated[Optional[str], typer.Option("--threads", "-t", help="Thread counts, e.g. 1,2 (default: the cores this process may use).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs per runner before timing.")] = 10,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per runner (interleaved rounds).")] = 50,
    gap_ms: Annotated[float, typer.Option("--gap-ms", min=0, help="Pause before every turn of timed calls so the previous runtime's spinning threads park (0: none).")] = 20.0,
    burst: Annotated[int, typer.Option("--burst", min=1, help="Timed calls per turn, back to back after the pause: the median is then a stream's call, as runtimes' own benchmark tools time it, and 'after pause ms' the first call of each turn; 1: every call after a pause (frames at a camera's rate).")] = 5,
    quick: Annotated[bool, typer.Option("--quick", help="2 warm-up and 5 timed runs, a small matmul for the peak: a smoke test, not a measurement.")] = False,
    grid: Annotated[bool, typer.Option("--grid", help="Time every (size, proposals) pair instead of the two sweeps.")] = False,
    network: Annotated[bool, typer.Option("--network/--no-network", help="Also time the raw graphs (network alone) where they exist.")] = True,
    profile: Annotated[bool, typer.Option("--profile", help="Run ONNX Runtime's profiler on the ORT artifacts: time per op type.")] = False,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration folder for int8 variants at other sizes/proposals.")] = None,
    json_out: JsonOutOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Time each artifact end to end (image in, panoptic answer out) and the network alone, interleaved.

    Exit code 1 when an artifact that exists could not be timed (it cannot be loaded, is stale, or raised), after
    the table and --json-out are written; backends that cannot run here or are not built are listed as skipped.
    """
    from maskconver_deploy import api
    from maskconver_deploy.cli.console import log, print_json
    from maskconver_deploy.results import STATUS_FAILED

    if model_dir is None:
        raise UserError("--model-dir is required (a folder written by `maskconver export`)")
    result = api.bench(model_dir, backends=backends, sizes=sizes, proposals=proposals, merge=merge, threads=threads,
                       warmup=warmup, runs=runs, gap_ms=gap_ms, burst=burst, quick=quick, grid=grid, network=network,
                       profile=profile, calib=calib, json_out=json_out, force=force, log=log)  # fmt: skip
    if json_out is not None:
        log(f"wrote {json_out}")
    if as_json:
        print_json(result.to_dict())
    else:
        _print(result)
    failed = [e for e in result.entries if e.status == STATUS_FAILED]
    if failed:
        names = {e.backend: e.reason for e in failed}
        raise CheckFailed(f"{len(names)} backend(s) failed: " + "; ".join(f"{b}: {r}" for b, r in names.items()))


def _print(result: Any) -> None:
    from maskconver_deploy.bench import summary_rows
    from maskconver_deploy.cli.console import log, print_table

    columns = ["backend", "merge", "graph", "size", "N", "threads", "status", "median ms", "p90 ms", "min ms", "after pause ms",
               "vs torch", "vs compiled", "floor ms", "MB", "peak MB"]  # fmt: skip
    title = f"maskconver bench: {result.machine.get('cpu')} (model merge path {result.native_merge}/" \
            f"{result.model.get('mask_activation', '-')})"
    print_table(summary_rows(result), columns=columns, title=title)
    for peak in result.peak:
        log(f"float32 matmul peak at {peak['threads'] or 'default'} threads: {peak['gflops']:.1f} GFLOP/s")
    skipped = [e for e in result.entries if not e.ok and e.hint]
    for e in {e.backend: e for e in skipped}.values():
        log(f"{e.backend}: {e.reason} ({e.hint})")
