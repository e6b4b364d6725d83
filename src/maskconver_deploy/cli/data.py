"""`maskconver data ...`: generate the synthetic shapes data set, and check a data folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from maskconver_deploy.cli import command
from maskconver_deploy.cli.options import ForceOpt, JsonOpt, SplitOpt

app = typer.Typer(
    help="Data sets: generate the synthetic shapes set (COCO-panoptic folder) and check data folders.",
    no_args_is_help=True,
)


def synth(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Data folder to write (images/SPLIT, annotations/panoptic_SPLIT.json + PNGs)."),
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images (train + val).")] = 1000,
    size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels (square images).")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Data set seed; image i uses a seed derived from (seed, i).")] = 0,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", min=0.0, max=0.99, help="Share of images in the val split.")
    ] = 0.1,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write the synthetic shapes data set (5 thing shapes, 4 stuff textures; the shapes-256 preset's classes)."""
    from maskconver_deploy.cli.console import ProgressBar, print_json, print_table
    from maskconver_deploy.data.synthetic import write_dataset

    with ProgressBar("synth", total=n) as bar:
        summary = write_dataset(
            out, n, size=size, seed=seed, val_fraction=val_fraction, force=force, on_image=lambda _: bar.update()
        )
    result = summary.to_dict()
    result["images_per_s"] = round(n / max(summary.seconds, 1e-9), 1)
    if json_out:
        print_json(result)
    else:
        columns = ["out", "train", "val", "size", "seed", "segments", "crowd_segments", "seconds", "images_per_s"]
        print_table([result], columns=columns)


def check(
    data: Annotated[Path, typer.Option("--data", "-d", help="COCO-panoptic data folder.")],
    split: SplitOpt = "val",
    json_out: JsonOpt = False,
) -> None:
    """Read every PNG of a split and check it against the JSON and the photos' presence."""
    from maskconver_deploy.cli.console import print_json, print_table
    from maskconver_deploy.data.coco_panoptic import load_split

    meta, records = load_split(data, split, verify=True)
    n_segments = sum(len(r.segments) for r in records)
    result = {
        "data": str(data),
        "split": split,
        "images": len(records),
        "segments": n_segments,
        "crowd_segments": sum(1 for r in records for s in r.segments if s.iscrowd),
        "categories": meta.num_classes,
        "things": meta.num_things,
    }
    if json_out:
        print_json(result)
    else:
        print_table([result])


command(app, "synth", synth)
command(app, "check", check)
