"""`maskconver info`: parameters and multiply-accumulates of a preset, network and post-processing apart."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from maskconver_deploy.cli.options import JsonOpt, PresetOpt

ProposalsOpt = Annotated[
    Optional[int],
    typer.Option("--proposals", "-n", min=1, help="Number of proposals N (top-N centers); default: the preset's."),
]


def _millions(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}M"


def _billions(value: float | None) -> str:
    """MACs in billions; small post-processing figures in millions so they do not print as 0.000B."""
    if value is None:
        return "-"
    return f"{value / 1e9:.3f}B" if value >= 1e8 else f"{value / 1e6:.2f}M"


def info(preset: PresetOpt, proposals: ProposalsOpt = None, json: JsonOpt = False) -> None:
    """Show the model's parameters and MACs per part (network and post-processing separately), with the
    paper's numbers beside ours for the COCO presets."""
    from maskconver_deploy.cli import console
    from maskconver_deploy.errors import UserError
    from maskconver_deploy.model.counting import (
        OFFICIAL_PARAMS_WITHOUT_TAIL,
        PAPER_PARAMS,
        count_macs,
        count_params,
        paper_macs,
    )
    from maskconver_deploy.model.postprocess import MAX_TOPK
    from maskconver_deploy.model.specs import get_preset

    spec = get_preset(preset)
    feature_h, feature_w = spec.feature_size
    limit = min(MAX_TOPK, spec.num_classes * feature_h * feature_w)
    if proposals is not None and not 1 <= proposals <= limit:
        raise UserError(f"--proposals must be between 1 and {limit} for preset '{preset}', got {proposals}")
    params = count_params(spec)
    macs = count_macs(spec, proposals)
    num = macs["num_proposals"]
    network_params = params["backbone"] + params["decoder"] + sum(v for k, v in params.items() if k.startswith("head_"))
    postprocess_params = params["class_embedding"] + params["mlp"]
    paper: dict[str, Any] | None = None
    if preset in ("coco-640", "coco-256"):
        paper = {
            "params": PAPER_PARAMS,
            "params_official_recount_without_tail": OFFICIAL_PARAMS_WITHOUT_TAIL,
            "macs": paper_macs(preset, num),
            "note": "paper counts 201 heatmap classes (raw COCO ids); this model has 133",
        }
    result = {
        "preset": preset,
        "input_size": list(spec.input_size),
        "num_proposals": num,
        "params": {
            **{k: v for k, v in params.items() if k != "total"},
            "network": network_params,
            "postprocess": postprocess_params,
            "total": params["total"],
        },
        "macs": {"network": macs["network"], "postprocess": macs["postprocess"], "total": macs["total"]},
        "paper": paper,
    }
    if json:
        console.print_json(result)
        return
    net, post = macs["network"], macs["postprocess"]
    rows: list[dict[str, str]] = []
    for part in ("backbone", "decoder", *(k for k in net if k.startswith("head_"))):
        rows.append({"part": part, "params": _millions(params[part]), "MACs": _billions(net[part])})
    rows.append({"part": "network total", "params": _millions(network_params), "MACs": _billions(net["total"])})
    rows.append({"part": "class embedding", "params": _millions(params["class_embedding"]), "MACs": "-"})
    rows.append({"part": "mask MLP", "params": _millions(params["mlp"]), "MACs": _billions(post["mlp"])})
    rows.append({"part": "mask dot product", "params": "-", "MACs": _billions(post["mask_dot_product"])})
    rows.append(
        {"part": "post-processing total", "params": _millions(postprocess_params), "MACs": _billions(post["total"])}
    )
    rows.append({"part": "merge (element ops, not MACs)", "params": "-", "MACs": _billions(post["merge_element_ops"])})
    rows.append({"part": "total", "params": _millions(params["total"]), "MACs": _billions(macs["total"])})
    if paper is not None:
        rows.append({"part": "paper", "params": _millions(paper["params"]), "MACs": _billions(paper["macs"])})
        recount = _millions(OFFICIAL_PARAMS_WITHOUT_TAIL)
        rows.append({"part": "official recount, no ImageNet tail", "params": recount, "MACs": "-"})
    h, w = spec.input_size
    console.print_table(rows, ["part", "params", "MACs"], title=f"{preset}: {h}x{w} input, N = {num} proposals")
