"""`maskconver calib ...`: make and inspect calibration sets (the images every int8 build reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from maskconver_deploy.cli import command
from maskconver_deploy.cli.options import ForceOpt, JsonOpt, SplitOpt

app = typer.Typer(
    help="Calibration sets for int8 builds: images copied from a data split plus a manifest (source, sizes, hashes).",
    no_args_is_help=True,
)


def make(
    data: Annotated[Path, typer.Option("--data", "-d", help="COCO-panoptic data folder to draw the images from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration folder to write, e.g. calibration/NAME.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 64,
    split: SplitOpt = "train",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random choice of images.")] = 0,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Copy N images of a split (default train: disjoint from the val split used for evaluation) into
    OUT/images/ (byte for byte) and write OUT/manifest.json (source, seed, sizes, sha256 of every image)."""
    from maskconver_deploy.calibration import describe, load_calibration, make_calibration
    from maskconver_deploy.cli.console import print_json, print_table

    path = make_calibration(data, out, n=n, split=split, seed=seed, force=force)
    summary = describe(load_calibration(path))
    if json_out:
        print_json(summary)
    else:
        print_table([summary], columns=["path", "images", "sizes", "split", "seed", "bytes", "manifest_hash"])


def show(
    calib: Annotated[Path, typer.Option("--calib", "-c", help="Calibration folder.")],
    json_out: JsonOpt = False,
) -> None:
    """Check a calibration folder (manifest, every image's sha256) and print what it holds."""
    from maskconver_deploy.calibration import describe, load_calibration
    from maskconver_deploy.cli.console import print_json, print_table

    summary = describe(load_calibration(calib))
    if json_out:
        print_json(summary)
    else:
        print_table([summary], columns=["path", "images", "sizes", "source", "split", "seed", "generator_seed",
                                        "bytes", "manifest_hash"])  # fmt: skip


command(app, "make", make)
command(app, "show", show)
