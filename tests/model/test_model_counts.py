"""Parameter and MAC counts against the official recount and the paper (official facts 6.2, paper Tables 1, 3)."""

from __future__ import annotations

import pytest

from maskconver_deploy.model.counting import OFFICIAL_PARAMS_WITHOUT_TAIL, count_macs, count_params, paper_macs
from maskconver_deploy.model.specs import get_preset


def test_parts_match_the_official_recount_exactly() -> None:
    params = count_params(get_preset("coco-640"))
    assert params["backbone"] == 2_209_504 - 576_000  # official MultiAVGSeg count without the ImageNet tail
    assert params["decoder"] == 916_288
    assert params["head_center_embedding"] == params["head_mask_features"] == 240_896
    assert params["mlp"] == 132_096
    assert params["class_embedding"] == 133 * 256
    official_classes = count_params(get_preset("coco-640").with_changes(num_classes=201, num_things=91))
    assert official_classes["head_heatmap"] == 226_761
    assert official_classes["total"] == OFFICIAL_PARAMS_WITHOUT_TAIL
    assert params["total"] == sum(v for k, v in params.items() if k != "total")


def test_total_params_within_three_percent_of_the_official_count() -> None:
    total = count_params(get_preset("coco-640"))["total"]
    assert abs(total - 3.44e6) / 3.44e6 < 0.03


@pytest.mark.parametrize(
    ("preset", "proposals"), [("coco-640", 100), ("coco-256", 100), ("coco-256", 10), ("coco-256", 50)]
)
def test_macs_within_ten_percent_of_the_paper(preset: str, proposals: int) -> None:
    macs = count_macs(get_preset(preset), proposals)
    reference = paper_macs(preset, proposals)
    assert reference is not None
    assert abs(macs["total"] - reference) / reference < 0.10


def test_network_macs_match_the_official_recount_at_256() -> None:
    network = count_macs(get_preset("coco-256"), 100)["network"]
    assert network["backbone"] == pytest.approx(0.6109e9, rel=1e-3)
    assert network["decoder"] == pytest.approx(0.2045e9, rel=1e-3)
    official_heads = count_macs(get_preset("coco-256").with_changes(num_classes=201, num_things=91), 100)["network"]
    heads = sum(v for k, v in official_heads.items() if k.startswith("head_"))
    assert heads == pytest.approx(0.7170e9, rel=1e-3)


def test_postprocess_macs_scale_with_proposals() -> None:
    spec = get_preset("coco-256")
    at_100, at_10 = count_macs(spec, 100), count_macs(spec, 10)
    assert at_100["network"] == at_10["network"]
    assert at_100["postprocess"]["mlp"] == 100 * 2 * 256 * 256
    assert at_100["postprocess"]["mask_dot_product"] == 100 * 256 * 32 * 32
    assert at_100["total"] - at_10["total"] == 90 * (2 * 256 * 256 + 256 * 32 * 32)
    assert count_macs(spec)["num_proposals"] == spec.num_proposals
