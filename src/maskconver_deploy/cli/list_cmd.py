"""`maskconver list`: what a model folder holds (exported graphs, compiled artifacts, whether they are current)."""

from __future__ import annotations

from maskconver_deploy.cli.options import JsonOpt, ModelDirOpt
from maskconver_deploy.errors import UserError


def list_cmd(model_dir: ModelDirOpt = None, json_out: JsonOpt = False) -> None:
    """List a model folder's artifacts: backend, graph, precision, file, size, build time, and whether each was
    built from the current export (source ok) or needs `maskconver compile --force`."""
    from maskconver_deploy.cli.console import print_json, print_table
    from maskconver_deploy.modeldir import ModelDir

    if model_dir is None:
        raise UserError("give --model-dir (a folder written by `maskconver export`)")
    folder = ModelDir(model_dir)
    rows = folder.artifacts()
    meta = folder.meta
    if json_out:
        print_json({"model_dir": str(folder.path), "preset": meta.preset, "input_size": list(meta.input_size),
                    "num_proposals": meta.num_proposals, "merge": meta.merge, "mask_activation": meta.mask_activation,
                    "graphs": folder.graphs(), "artifacts": rows})  # fmt: skip
        return
    table = [{**row, "MB": row["bytes"] / 1e6, "source ok": row["source_ok"]} for row in rows]
    h, w = meta.input_size
    print_table(table, columns=["backend", "graph", "precision", "file", "MB", "built", "source ok"],
                title=f"{folder.path}: {meta.preset} {h}x{w}, {meta.num_proposals} proposals, "
                      f"merge path {meta.merge}/{meta.mask_activation}")  # fmt: skip
