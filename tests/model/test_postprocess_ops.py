"""Post-processing on hand-made heatmaps and masks: peak NMS, top-N, centers, panoptic merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskconver_deploy.model.postprocess import (
    centers_from_positions,
    mask_probabilities,
    panoptic_merge,
    peak_nms,
    proposal_owners,
    top_proposals,
)


def _local_maxima_reference(heat: np.ndarray) -> np.ndarray:
    """Keep a value iff it is >= every value of its 3x3 neighbourhood (borders: only inside pixels)."""
    out = np.zeros_like(heat)
    channels, height, width = heat.shape
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                window = heat[c, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
                if heat[c, y, x] >= window.max():
                    out[c, y, x] = heat[c, y, x]
    return out


def test_peak_nms_keeps_exactly_the_local_maxima() -> None:
    rng = np.random.default_rng(0)
    heat = rng.random((3, 9, 11)).astype(np.float32)
    heat[1, 4, 4] = heat[1, 4, 5] = 2.0  # a plateau of two equal maxima: both kept, as with the official |p - max| test
    kept = peak_nms(torch.from_numpy(heat)[None])[0].numpy()
    np.testing.assert_array_equal(kept, _local_maxima_reference(heat))
    assert kept[1, 4, 4] == kept[1, 4, 5] == 2.0


def test_peak_nms_suppresses_neighbours_of_a_peak() -> None:
    heat = torch.zeros(1, 1, 5, 5)
    heat[0, 0, 2, 2] = 0.9
    heat[0, 0, 2, 3] = 0.5
    heat[0, 0, 0, 0] = 0.3
    kept = peak_nms(heat)
    assert torch.count_nonzero(kept) == 2
    assert kept[0, 0, 2, 2] == 0.9 and kept[0, 0, 0, 0] == 0.3 and kept[0, 0, 2, 3] == 0


def test_top_proposals_order_and_decoding() -> None:
    peaks = torch.zeros(1, 3, 5, 5)
    peaks[0, 1, 2, 3] = 0.9
    peaks[0, 0, 4, 0] = 0.8
    peaks[0, 2, 0, 4] = 0.7
    scores, classes, positions = top_proposals(peaks, 4)
    assert torch.allclose(scores, torch.tensor([[0.9, 0.8, 0.7, 0.0]]))
    assert classes[0, :3].tolist() == [1, 0, 2]
    assert positions[0, :3].tolist() == [13, 20, 4]
    centers = centers_from_positions(positions, 5)
    assert centers.dtype == torch.int32 and centers.shape == (1, 4, 2)
    assert centers[0, :3].tolist() == [[2, 3], [4, 0], [0, 4]]


def test_top_proposals_break_ties_like_onnx_topk() -> None:
    """Exactly equal scores (a saturated sigmoid) come lowest flat index first, as ONNX Runtime's TopK gives them."""
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper

    generator = torch.Generator().manual_seed(0)
    peaks = torch.randint(0, 4, (1, 3, 6, 6), generator=generator).float() / 3  # many exact ties (0, 1/3, 2/3, 1)
    k = 40
    _, classes, positions = top_proposals(peaks, k)
    flat_index = (classes * 36 + positions)[0].tolist()
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], largest=1, sorted=1)],
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 108])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, [1, k]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, [1, k])],
        initializer=[helper.make_tensor("k", TensorProto.INT64, [1], [k])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    _, onnx_index = session.run(None, {"x": peaks.flatten(1).numpy().astype(np.float32)})
    assert flat_index == onnx_index[0].tolist()


def test_hard_sigmoid_is_relu6_over_six() -> None:
    x = torch.tensor([-4.0, -3.0, 0.0, 1.5, 3.0, 5.0])
    assert torch.allclose(mask_probabilities(x), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    assert torch.allclose(mask_probabilities(x, "sigmoid"), torch.sigmoid(x))


def _masks(*rects: tuple[float, int, int, int, int], size: int = 8) -> torch.Tensor:
    """Probability maps [N, size, size]: each entry (prob, y0, y1, x0, x1) fills a rectangle."""
    out = torch.zeros(len(rects), size, size)
    for index, (prob, y0, y1, x0, x1) in enumerate(rects):
        out[index, y0:y1, x0:x1] = prob
    return out


def test_merge_ownership_and_void() -> None:
    # slot 0: thing class 0 on the left half; slot 1: thing class 1 top-right; bottom-right owned by nobody
    probs = _masks((0.9, 0, 8, 0, 4), (0.9, 0, 4, 4, 8))
    panoptic, semantic = panoptic_merge(probs, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), num_things=2)
    assert panoptic.dtype == torch.int32 and semantic.dtype == torch.int32
    assert (panoptic[:, :4] == 1001).all()
    assert (panoptic[:4, 4:] == 2002).all()
    assert (panoptic[4:, 4:] == 0).all()  # VOID: no proposal has a non-zero probability there
    assert (semantic[:, :4] == 1).all() and (semantic[:4, 4:] == 2).all() and (semantic[4:, 4:] == 0).all()


def test_merge_higher_weighted_value_wins_overlaps() -> None:
    # both cover the whole image; slot 1 has the lower score but a higher probability * score
    probs = _masks((0.6, 0, 8, 0, 8), (1.0, 0, 8, 0, 8))
    owner = proposal_owners(probs, torch.tensor([0.9, 0.8]))
    assert (owner == 1).all()
    panoptic, _ = panoptic_merge(probs, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), num_things=1)
    assert (panoptic == 1002).all()  # class 0, instance = slot 1 + 1


def test_merge_drops_low_scores_small_areas_and_occluded_masks() -> None:
    probs = _masks(
        (0.9, 0, 8, 0, 4),  # slot 0: 32 px, kept
        (0.9, 0, 1, 4, 6),  # slot 1: 2 px, under the small-area threshold
        (0.9, 0, 8, 4, 8),  # slot 2: score under the object threshold
        (0.8, 0, 8, 2, 5),  # slot 3: 24 px of which it owns only 7 px of column 4 (< 0.7 * 24)
    )
    scores = torch.tensor([0.9, 0.9, 0.005, 0.85])
    panoptic, _ = panoptic_merge(probs, scores, torch.tensor([0, 0, 0, 0]), num_things=1, small_area=4)
    assert (panoptic[:, :4] == 1001).all()
    # column 4 belongs to slot 3 (dropped by overlap) except row 0 (slot 1, dropped by area): all VOID, not given away
    assert (panoptic[:, 4] == 0).all()
    assert (panoptic[:, 5:] == 0).all()  # slot 2 is invalid, nobody else covers it
    assert not (panoptic == 1002).any() and not (panoptic == 1004).any()


def test_merge_stuff_proposals_of_one_class_form_one_segment() -> None:
    probs = _masks((0.9, 0, 4, 0, 8), (0.9, 4, 8, 0, 8), (0.9, 0, 8, 0, 0))
    classes = torch.tensor([3, 3, 0])  # class 3 is stuff (num_things = 2)
    panoptic, semantic = panoptic_merge(probs, torch.tensor([0.9, 0.7, 0.5]), classes, num_things=2)
    assert (panoptic == 4000).all()
    assert (semantic == 4).all()


def _merge_reference(
    probs: np.ndarray, scores: np.ndarray, classes: np.ndarray, num_things: int, small: float
) -> np.ndarray:
    """Straightforward numpy version of the documented merge (official generator + VOID where nothing owns)."""
    valid = scores > 0.01
    weighted = probs * (scores * valid)[:, None, None]
    owner = weighted.argmax(0)
    owner[weighted.max(0) <= 0] = -1
    out = np.zeros(owner.shape, np.int32)
    for slot in range(len(scores)):
        owned = owner == slot
        original = (probs[slot] > 0.5).sum()
        area = owned.sum()
        if valid[slot] and area > small and original > 0 and area > 0.7 * original:
            instance = slot + 1 if classes[slot] < num_things else 0
            out[owned] = (classes[slot] + 1) * 1000 + instance
    return out


def test_merge_matches_a_straightforward_reference() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        logits = rng.normal(0, 3, (12, 24, 24)).astype(np.float32)
        probs = mask_probabilities(torch.from_numpy(logits))
        scores = np.sort(rng.random(12).astype(np.float32))[::-1].copy()
        scores[-2:] = 0.0
        classes = rng.integers(0, 6, 12)
        scores_t, classes_t = torch.from_numpy(scores), torch.from_numpy(classes)
        panoptic, _ = panoptic_merge(probs, scores_t, classes_t, num_things=3, small_area=3)
        expected = _merge_reference(probs.numpy(), scores, classes, 3, 3)
        np.testing.assert_array_equal(panoptic.numpy(), expected)


def test_graph_and_eager_owner_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    from maskconver_deploy.model import postprocess

    probs = torch.from_numpy(np.random.default_rng(2).integers(0, 4, (6, 10, 10)).astype(np.float32) / 3)  # many ties
    probs[:, :2, :2] = 0.0  # nobody owns the top-left corner
    weights = torch.tensor([0.5, 0.5, 0.9, 0.0, 0.3, 0.5])
    eager = proposal_owners(probs, weights)
    monkeypatch.setattr(postprocess, "_capturing_graph", lambda: True)
    captured = proposal_owners(probs, weights)
    assert torch.equal(eager, captured)
    assert (eager == -1).any() and (eager >= 0).any()
