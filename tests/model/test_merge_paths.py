"""The four merge paths (input, input-legacy, official, feature) on hand-made logits, in eager PyTorch and in
ONNX Runtime (the captured graph uses the channel-last layout); `input` equals `input-legacy` bit for bit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from maskconver_deploy.model.postprocess import (
    MERGES,
    block_upsample,
    feature_small_area,
    half_threshold,
    mask_probabilities,
    merge_logits,
)

THINGS = 2  # classes 0, 1 are things; 2, 3 stuff
VOID_RULE = ("input", "input-legacy")  # the others: every pixel owned (official)


class _Merge(torch.nn.Module):
    """merge_logits as a module, for export (logits [N, h, w], scores [N], classes [N])."""

    def __init__(self, merge: str, stride: int, small_area: float = 0.0, activation: str = "hard-sigmoid") -> None:
        super().__init__()
        self.merge, self.stride, self.small_area, self.activation = merge, stride, small_area, activation

    def forward(self, logits: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return merge_logits(logits, scores, classes, merge=self.merge, activation=self.activation, stride=self.stride,
                            num_things=THINGS, object_mask_threshold=0.01, overlap_threshold=0.7,
                            small_area=self.small_area, feature_small_area_px=self.small_area)  # fmt: skip


def _onnx_run(module: _Merge, logits: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (logits, scores, classes), buffer, input_names=["l", "s", "c"],
                          output_names=["panoptic", "semantic"], opset_version=17, dynamo=False)  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feeds = {"l": logits.numpy(), "s": scores.numpy(), "c": classes.numpy()}
    return session.run(["panoptic"], feeds)[0]


def _run(merge: str, logits, scores, classes, *, stride: int = 1, small_area: float = 0.0, onnx: bool = False):
    module = _Merge(merge, stride, small_area)
    args = (torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32),
            torch.as_tensor(classes, dtype=torch.int64))  # fmt: skip
    if onnx:
        return _onnx_run(module, *args)
    with torch.inference_mode():
        return module(*args)[0].numpy()


def _logits(*rects: tuple[float, int, int, int, int], size: int = 8) -> np.ndarray:
    """Logits [N, size, size] whose hard-sigmoid is `prob` inside each rectangle (prob, y0, y1, x0, x1), 0 outside."""
    out = np.full((len(rects), size, size), -5.0, dtype=np.float32)
    for index, (prob, y0, y1, x0, x1) in enumerate(rects):
        out[index, y0:y1, x0:x1] = 6.0 * (prob - 0.5)
    return out


@pytest.fixture(params=[False, True], ids=["eager", "onnxruntime"])
def onnx(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.parametrize("merge", MERGES)
def test_ownership_void_and_every_pixel_owned(merge: str, onnx: bool) -> None:
    logits = _logits((0.9, 0, 8, 0, 4), (0.9, 0, 4, 4, 8))  # bottom-right: no mask there
    panoptic = _run(merge, logits, [0.9, 0.8], [0, 1], onnx=onnx)
    assert (panoptic[:, :4] == 1001).all() and (panoptic[:4, 4:] == 2002).all()
    # VOID rule: nobody owns a pixel where every weighted probability is 0; official rule: the argmax (slot 0) does
    assert (panoptic[4:, 4:] == (0 if merge in VOID_RULE else 1001)).all()


@pytest.mark.parametrize("merge", MERGES)
def test_ties_go_to_the_lower_slot(merge: str, onnx: bool) -> None:
    logits = _logits((0.75, 0, 8, 0, 8), (0.75, 0, 8, 0, 8))  # equal masks, equal scores: exact ties everywhere
    panoptic = _run(merge, logits, [0.5, 0.5], [0, 1], onnx=onnx)
    assert (panoptic == 1001).all()


@pytest.mark.parametrize("merge", MERGES)
def test_higher_weighted_value_wins_and_stuff_merges(merge: str, onnx: bool) -> None:
    logits = _logits((0.6, 0, 8, 0, 8), (1.0, 0, 8, 0, 4), (1.0, 0, 8, 4, 8))
    # slot 0 (score 0.9, p 0.6 = 0.54) loses to slots 1 and 2 (0.8 * 1.0); 1 and 2 are the same stuff class
    panoptic = _run(merge, logits, [0.9, 0.8, 0.8], [0, 3, 3], onnx=onnx)
    assert (panoptic == 4000).all()  # one stuff segment: (3 + 1) * 1000, instance 0


@pytest.mark.parametrize("merge", MERGES)
def test_low_scores_small_areas_and_occluded_masks_are_dropped(merge: str, onnx: bool) -> None:
    logits = _logits(
        (0.9, 0, 8, 0, 4),  # slot 0: 32 px, kept
        (0.9, 0, 1, 4, 6),  # slot 1: 2 px, under the small-area threshold (3)
        (0.9, 0, 8, 4, 8),  # slot 2: score under the object threshold
        (0.8, 0, 8, 2, 5),  # slot 3: 24 px, owns only the 8 px of column 4 (< 0.7 * 24)
    )
    panoptic = _run(merge, logits, [0.9, 0.8, 0.005, 0.7], [0, 1, 1, 0], small_area=3.0, onnx=onnx)
    assert (panoptic[:, :4] == 1001).all()
    assert not np.isin(panoptic, [2002, 2003, 1004]).any()
    assert (panoptic[:, 4] == 0).all()  # owned by the dropped slots 1 and 3: VOID under every rule
    # no weighted probability at all: VOID (VOID rule), else owned by the argmax, slot 0, which is kept (official)
    assert (panoptic[:, 6:] == (0 if merge in VOID_RULE else 1001)).all()


@pytest.mark.parametrize("merge", ["input", "official", "input-legacy"])
def test_stride_resizes_logits_before_the_merge(merge: str) -> None:
    logits = _logits((0.9, 0, 4, 0, 2), (0.9, 0, 4, 2, 4), size=4)
    panoptic = _run(merge, logits, [0.9, 0.8], [0, 1], stride=4)
    assert panoptic.shape == (16, 16)
    assert (panoptic[:, :6] == 1001).all() and (panoptic[:, 10:] == 2002).all()


def test_feature_path_merges_on_the_grid_then_copies_blocks() -> None:
    logits = _logits((0.9, 0, 4, 0, 2), (0.9, 0, 4, 2, 4), (0.9, 0, 1, 3, 4), size=4)
    # slot 2 owns no cell (slot 1 scores higher there); the merge is the stride-1 merge, nearest-upsampled
    low = _run("feature", logits, [0.9, 0.8, 0.7], [0, 1, 0], stride=1)
    full = _run("feature", logits, [0.9, 0.8, 0.7], [0, 1, 0], stride=4)
    nearest = torch.nn.functional.interpolate(torch.from_numpy(low)[None, None].float(), scale_factor=4.0)
    np.testing.assert_array_equal(full, nearest[0, 0].numpy().astype(np.int32))
    np.testing.assert_array_equal(block_upsample(torch.from_numpy(low), 4).numpy(), full)
    # the official threshold (256 px at 640 x 640) on a 32 x 32 grid: 0.64 cells, so one cell is enough
    assert feature_small_area(256, (32, 32)) == pytest.approx(0.64)


@pytest.mark.parametrize("activation", ["hard-sigmoid", "sigmoid"])
def test_half_threshold_is_the_probability_test(activation: str) -> None:
    c = np.float32(half_threshold(activation))
    x = torch.tensor([np.nextafter(c, np.float32(-1)), c, np.nextafter(c, np.float32(1)), 0.0, 1e-3, -1e-3])
    np.testing.assert_array_equal((x > float(c)).numpy(), (mask_probabilities(x, activation) > 0.5).numpy())


def _random_case(seed: int, num: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits with exact ties and saturated regions (quantised values), scores with ties and invalid slots."""
    rng = np.random.default_rng(seed)
    logits = np.round(rng.normal(0.0, 3.0, (num, size, size)) * 2) / 2
    logits[rng.random(num) < 0.3] -= 6.0  # some masks mostly below -3 (probability 0)
    scores = np.sort(np.round(rng.random(num) * 8) / 8)[::-1].copy()
    scores[rng.random(num) < 0.2] = 0.005  # invalid slots
    classes = rng.integers(0, 4, num)
    return logits.astype(np.float32), scores.astype(np.float32), classes


@pytest.mark.parametrize("num", [1, 7, 50, 100])
def test_input_equals_input_legacy_bit_for_bit(num: int) -> None:
    for seed in range(12):
        logits, scores, classes = _random_case(seed, num, 6)
        for stride in (1, 4):
            new = _run("input", logits, scores, classes, stride=stride, small_area=2.0)
            old = _run("input-legacy", logits, scores, classes, stride=stride, small_area=2.0)
            np.testing.assert_array_equal(new, old, err_msg=f"seed {seed}, N {num}, stride {stride}")


@pytest.mark.parametrize("num", [7, 50])
def test_input_graph_equals_input_legacy_graph_in_onnxruntime(num: int) -> None:
    for seed in range(3):
        logits, scores, classes = _random_case(100 + seed, num, 8)
        new = _run("input", logits, scores, classes, stride=8, small_area=20.0, onnx=True)
        old = _run("input-legacy", logits, scores, classes, stride=8, small_area=20.0, onnx=True)
        np.testing.assert_array_equal(new, old)
        np.testing.assert_array_equal(new, _run("input", logits, scores, classes, stride=8, small_area=20.0))
