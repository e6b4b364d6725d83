"""`maskconver export`: a checkpoint -> a model folder with the ONNX graphs (post-processing fused in)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskconver_deploy.cli.options import CheckpointOpt, ForceOpt, JsonOpt
from maskconver_deploy.errors import UserError

OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Model folder to write, e.g. models/NAME.")]
SizeOpt = Annotated[
    Optional[int],
    typer.Option("--size", "-s", min=32, help="Input side in pixels (square), a multiple of 16 (default: the checkpoint's)."),
]
ProposalsOpt = Annotated[
    Optional[int], typer.Option("--proposals", "-n", min=1, help="Top-N proposals in the graph (default: the checkpoint's).")
]
MergeOpt = Annotated[
    Optional[str],
    typer.Option("--merge", help="Merge path: input (default; merge at the network input, VOID where no mask), "
                 "feature (official hardware path: merge on the feature grid), official (official evaluation path: "
                 "every pixel owned), input-legacy (input's answer, earlier graph)."),
]
ActivationOpt = Annotated[
    Optional[str],
    typer.Option("--mask-activation", help="hard-sigmoid or sigmoid (default: sigmoid for --merge official, "
                 "hard-sigmoid otherwise)."),
]
GraphsOpt = Annotated[
    Optional[list[str]],
    typer.Option("--output", help="Graphs: panoptic, raw, semantic; repeat or give a comma list (default panoptic,raw)."),
]


def export(
    checkpoint: CheckpointOpt = None,
    out: OutOpt = None,
    size: SizeOpt = None,
    proposals: ProposalsOpt = None,
    output: GraphsOpt = None,
    merge: MergeOpt = None,
    mask_activation: ActivationOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a checkpoint to ONNX: one graph from uint8 image to panoptic answer (no Python post-processing),
    static shapes, simplified, checked, with the model's metadata inside, verified against PyTorch in ONNX Runtime.

    Writes OUT/model.onnx (panoptic), OUT/model.raw.onnx (heatmap + mask logits, for parity), optionally
    OUT/model.semantic.onnx, plus OUT/model.json (metadata, op list, checks) and OUT/reference.pt.
    """
    from maskconver_deploy import api
    from maskconver_deploy.cli.console import ProgressBar, log, print_json, print_table
    from maskconver_deploy.export import parse_graphs

    if checkpoint is None or out is None:
        raise UserError("give --checkpoint (a .pt) and --out (the model folder to write)")
    with ProgressBar("export", total=len(parse_graphs(output))) as bar:
        folder = api.export(checkpoint, out, size=size, proposals=proposals, output=output, merge=merge,
                            mask_activation=mask_activation, force=force,
                            on_step=lambda graph: bar.update(1, status=f"{graph} verified"))  # fmt: skip
    record = folder.record
    rows = []
    for graph, entry in record["graphs"].items():
        check = record["verification"][graph]
        equal = [v for k, v in check.items() if k.endswith("_equal")]
        diffs = [v for k, v in check.items() if k.endswith("_max_abs_diff")]
        rows.append({"graph": graph, "file": entry["file"], "nodes": entry["nodes"], "MB": entry["bytes"] / 1e6,
                     "ints equal": min(equal) == 1.0 if equal else None,
                     "max float diff": f"{max(diffs):.2e}" if diffs else "-"})  # fmt: skip
    if json_out:
        print_json({"model_dir": str(folder.path), "meta": folder.meta.to_dict(), "export": record})
        return
    h, w = folder.meta.input_size
    print_table(rows, title=f"{folder.path}: {folder.meta.preset} {h}x{w}, {folder.meta.num_proposals} proposals, "
                            f"merge {folder.meta.merge_path}, opset {record['opset']}, "
                            f"{record['seconds']:.1f} s")  # fmt: skip
    log("ONNX Runtime matches PyTorch on the check images; next: maskconver compile --model-dir "
        f"{folder.path} --backend ort-mobile (or tflite, ort-int8-static --calib ...)")
