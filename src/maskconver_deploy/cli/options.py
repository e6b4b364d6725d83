"""Option definitions shared by several commands (one place, the same help everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Model preset: coco-640, coco-256, cityscapes, shapes-256.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="PyTorch checkpoint (.pt) of the reference model.")]
ModelDirOpt = Annotated[Optional[Path], typer.Option("--model-dir", "-m", help="Model folder written by `maskconver export` (holds the ONNX graph and every compiled artifact).")]
BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="Backend name: torch, ort, ort-mobile, ort-int8-dynamic, ort-int8-static, tflite, tflite-fp16, tflite-int8-dynamic, tflite-int8, tensorrt[-fp16|-int8].")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads for the runtime (default: the runtime's own choice).")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
JsonOutOpt = Annotated[Optional[Path], typer.Option("--json-out", help="Also write the result as JSON to this file.")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help="COCO-panoptic data folder (images/SPLIT, annotations/panoptic_SPLIT.json + PNG folder).")]
SplitOpt = Annotated[str, typer.Option("--split", help="Data split to use.")]
