"""Parameter and multiply-accumulate (MAC) counts of a spec, per part, without running real arithmetic.

The model is built on the meta device and traced under torch's FlopCounterMode (convolutions, linear layers,
matmuls; it counts 2 FLOPs per MAC, we report MACs). BN, activations, resizes and pooling are not counted,
as in the paper (whose "FLOPs" are MACs: official facts 6.2). Post-processing is counted separately:
MLP = N * 2 * E^2, mask dot product = N * E * h * w; the rest of the merge is reported as element
operations, not MACs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from maskconver_deploy.model.blocks import count_parameters
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.specs import MaskConverSpec

# Element passes over N x H x W in the merge: resize, activation, weighting, argmax, prob > 0.5 count, owner count.
MERGE_PASSES = 6

# The paper's numbers (Tables 1 and 3; 201 heatmap channels in the official code) and the official recount.
PAPER_PARAMS = 3.99e6
OFFICIAL_PARAMS_WITHOUT_TAIL = 3_441_897
PAPER_MACS: dict[str, dict[int | None, float]] = {
    "coco-640": {None: 9.53e9},
    "coco-256": {None: 1.54e9, 100: 1.57e9, 50: 1.55e9, 20: 1.54e9, 15: 1.53e9, 10: 1.53e9},
}


def _meta_model(spec: MaskConverSpec) -> MaskConver:
    with torch.device("meta"):
        return MaskConver(spec).eval()


def count_params(spec: MaskConverSpec) -> dict[str, int]:
    """Trainable parameters per part: backbone, decoder, head_<name> for each head, class_embedding, mlp, total."""
    model = _meta_model(spec)
    counts: dict[str, int] = {"backbone": count_parameters(model.backbone), "decoder": count_parameters(model.decoder)}
    for name, head in model.heads.items():
        counts[f"head_{name}"] = count_parameters(head)
    counts["class_embedding"] = count_parameters(model.class_embedding)
    counts["mlp"] = count_parameters(model.mlp)
    counts["total"] = count_parameters(model)
    return counts


def _macs(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, Any]:
    """MACs of one call of `module` and its output."""
    with FlopCounterMode(display=False) as counter:
        output = module(*inputs)
    return counter.get_total_flops() // 2, output


def count_macs(spec: MaskConverSpec, num_proposals: int | None = None) -> dict[str, Any]:
    """MACs of one image at the spec's input size.

    Returns {"network": {backbone, decoder, head_<name>..., total}, "postprocess": {mlp, mask_dot_product, total,
    merge_element_ops}, "total": network + post-processing MACs, "num_proposals": N}.
    """
    num = spec.num_proposals if num_proposals is None else int(num_proposals)
    model = _meta_model(spec)
    height, width = spec.input_size
    images = torch.empty(1, 3, height, width, device="meta")
    network: dict[str, int] = {}
    network["backbone"], features = _macs(model.backbone, images)
    network["decoder"], decoded = _macs(model.decoder, features[model.decoder_endpoint])
    for name, head in model.heads.items():
        network[f"head_{name}"], _ = _macs(head, features[model.low_level_endpoint], decoded)
    network["total"] = sum(network.values())
    feature_h, feature_w = spec.feature_size
    dim = spec.embedding_dim
    postprocess = {
        "mlp": num * 2 * dim * dim,
        "mask_dot_product": num * dim * feature_h * feature_w,
    }
    postprocess["total"] = postprocess["mlp"] + postprocess["mask_dot_product"]
    postprocess["merge_element_ops"] = MERGE_PASSES * num * height * width
    return {
        "num_proposals": num,
        "network": network,
        "postprocess": postprocess,
        "total": network["total"] + postprocess["total"],
    }


def paper_macs(preset: str, num_proposals: int | None = None) -> float | None:
    """The paper's MAC figure for a preset (Table 3 by proposals where it has one, else the headline), or None."""
    table = PAPER_MACS.get(preset)
    if table is None:
        return None
    return table.get(num_proposals, table[None])
