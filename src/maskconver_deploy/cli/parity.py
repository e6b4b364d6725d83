"""`maskconver parity`: does each artifact of a model folder give the reference's answer? (parity.py does the work.)

Exit codes: 0 every candidate passed (or, with `all`, was skipped because it cannot run here); 1 a candidate
failed its tolerance or raised; 2 bad input, or a candidate named explicitly that was skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from maskconver_deploy.cli.options import DataOpt, ForceOpt, JsonOpt, JsonOutOpt, ModelDirOpt, SplitOpt, ThreadsOpt
from maskconver_deploy.errors import CheckFailed, UserError

COLUMNS = ["backend", "precision", "pixel agr %", "category agr %", "top-N match %", "merge check px differ",
           "heatmap max abs err", "PQ ref", "PQ cand", "ΔPQ", "ΔAP", "verdict", "reason"]  # fmt: skip


def _short(reason: str) -> str:
    """A reason without the leading 'PATH: ' of a file error (the table has no room for paths twice)."""
    head, sep, rest = reason.partition(": ")
    return rest if sep and "/" in head and " " not in head else reason


def _merge_differ(check: dict[str, Any]) -> str:
    """The merge check's differing pixels, "0 / 3,276,800"; "-" without a raw graph."""
    if not check.get("available"):
        return "-"
    return f"{int(check['pixels_differ']):,} / {int(check['pixels']):,}"


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for c in result["candidates"]:
        decision, metric, tensor = c.get("decision") or {}, c.get("metric") or {}, c.get("tensor") or {}
        heatmap = (tensor.get("heatmap") or {}).get("max_abs_err") if tensor.get("available") else None
        rows.append({
            "backend": c["backend"], "precision": c["precision"],
            "pixel agr %": decision.get("pixel_agreement"), "category agr %": decision.get("category_agreement"),
            "top-N match %": decision.get("topn_match"),
            "merge check px differ": _merge_differ(decision.get("merge_check") or {}),
            "heatmap max abs err": f"{heatmap:.2e}" if heatmap is not None else "-",
            "PQ ref": metric.get("pq_reference"), "PQ cand": metric.get("pq"), "ΔPQ": metric.get("delta_pq"),
            "ΔAP": metric.get("delta_mask_ap"),
            "verdict": c["verdict"], "reason": _short(c.get("reason", "")) + (f" ({c['hint']})" if c.get("hint") else ""),
        })  # fmt: skip
    return rows


def _print(result: dict[str, Any]) -> None:
    from maskconver_deploy.cli.console import fmt, log, print_table

    model = result.get("model") or {}
    title = f"parity against {result['reference']} on {result['n_images']} images ({result['model_dir']}"
    title += f", merge path {model['merge']}/{model.get('mask_activation', '-')})" if model.get("merge") else ")"
    print_table(table_rows(result), columns=COLUMNS, title=title)
    for c in result["candidates"]:
        b = c.get("bisect")
        if not b:
            continue
        if not b.get("ran"):
            log(f"bisect {c['backend']}: {b.get('reason')}")
        elif b.get("first_node"):
            node = b["first_node"]
            changed = f"; changed weights: {', '.join(node['changed_inputs'])}" if node.get("changed_inputs") else ""
            log(f"bisect {c['backend']}: first node outside tolerance: {node['name']} ({node['op_type']}), output "
                f"{node['output']}: {node.get('problem')}, max abs err {fmt(node.get('max_abs_err'), 4)}{changed} "
                f"[image {b.get('image')}, source {b.get('source_note')}]")  # fmt: skip
        else:
            log(f"bisect {c['backend']}: {b.get('reason')} ({b.get('tensors_compared', 0)} tensors compared)")


ReferenceOpt = Annotated[str, typer.Option("--reference", "-r", help="Backend whose answers are the reference.")]
CandidatesOpt = Annotated[
    str,
    typer.Option("--candidates", help="Comma list of backends to compare (ort,ort-mobile,ort-int8-static,...), or "
                 "'all'."),
]  # fmt: skip
CountOpt = Annotated[
    Optional[int],
    typer.Option("--n", min=1, help="Compare on the first N images (default: all; 50 generated ones without --data)."),
]
CalibOpt = Annotated[
    Optional[Path],
    typer.Option("--calib", help="Calibration folder the int8 artifacts were built from: an artifact built from "
                 "another set is stale (fails)."),
]  # fmt: skip
BisectOpt = Annotated[
    bool,
    typer.Option("--bisect", help="On a failing fp32 ONNX Runtime candidate, find the first ONNX node outside "
                 "tolerance."),
]  # fmt: skip


def parity(
    model_dir: ModelDirOpt = None,
    reference: ReferenceOpt = "torch",
    candidates: CandidatesOpt = "all",
    data: DataOpt = None,
    split: SplitOpt = "val",
    n: CountOpt = None,
    threads: ThreadsOpt = None,
    bisect: BisectOpt = False,
    calib: CalibOpt = None,
    json_out: JsonOutOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Compare each candidate with the reference on the same images: tensors (raw graphs), decisions (top-N, pixels,
    segments) and PQ, with a pass/fail verdict per candidate by the tolerance of its precision.

    Without --data, a small synthetic validation set is generated (deterministically) in a temporary folder.
    """
    from maskconver_deploy import api
    from maskconver_deploy.cli.console import log, print_json, progress
    from maskconver_deploy.parity import resolve_candidates

    if model_dir is None:
        raise UserError("--model-dir is required (a folder written by `maskconver export`)")
    _, explicit = resolve_candidates(candidates, reference)
    result = api.parity(model_dir, reference=reference, candidates=candidates, data=data, split=split, n=n,
                        threads=threads, bisect=bisect, calib=calib, json_out=json_out, force=force, log=log,
                        progress=progress)  # fmt: skip
    if as_json:
        print_json(result)
    else:
        _print(result)
    bad = [c for c in result["candidates"] if c["verdict"] in ("fail", "error")]
    if bad:
        raise CheckFailed(f"{len(bad)} of {len(result['candidates'])} candidates failed parity: "
                          + "; ".join(f"{c['backend']}: {c['reason']}" for c in bad))  # fmt: skip
    skipped = [c for c in result["candidates"] if c["verdict"] == "skipped"]
    if explicit and skipped:
        raise UserError("requested candidates could not run: "
                        + "; ".join(f"{c['backend']}: {c['reason']}" for c in skipped))  # fmt: skip

