"""DeployModel: output names, dtypes and shapes for every mode, consistency between modes, export safety."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.postprocess import DeployModel
from maskconver_deploy.model.specs import get_preset
from maskconver_deploy.types import LABEL_DIVISOR, OUTPUT_NAMES

SIZE = 64
PROPOSALS = 12


@pytest.fixture(scope="module")
def tiny_model() -> MaskConver:
    """A small-input model whose BN statistics come from a few batches (so its heatmap is not saturated) and whose
    embedding heads are scaled up (so an untrained model still produces confident, non-empty segments)."""
    torch.manual_seed(0)
    spec = get_preset("shapes-256").with_changes(name="tiny-64", input_size=(SIZE, SIZE), num_proposals=PROPOSALS)
    model = MaskConver(spec)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(model.normalize(torch.randint(0, 256, (4, SIZE, SIZE, 3), dtype=torch.uint8)))
        for name in ("center_embedding", "mask_features"):
            model.heads[name].predict.weight.mul_(10.0)
    return model.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8))


def _run(model: MaskConver, image: torch.Tensor, output: str) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return DeployModel(model, output).forward(image)


def test_output_dtypes_and_shapes(tiny_model: MaskConver, image: torch.Tensor) -> None:
    n, c, h = PROPOSALS, tiny_model.spec.num_classes, SIZE // 8
    expected = {
        "panoptic": [
            (torch.int32, (1, SIZE, SIZE)),
            (torch.float32, (1, n)),
            (torch.int32, (1, n)),
            (torch.int32, (1, n, 2)),
        ],
        "raw": [
            (torch.float32, (1, c, h, h)),
            (torch.float32, (1, n, h, h)),
            (torch.float32, (1, n)),
            (torch.int32, (1, n)),
            (torch.int32, (1, n, 2)),
        ],
        "semantic": [(torch.int32, (1, SIZE, SIZE))],
    }
    for output, specs in expected.items():
        outputs = _run(tiny_model, image, output)
        assert len(outputs) == len(OUTPUT_NAMES[output])
        assert [(t.dtype, tuple(t.shape)) for t in outputs] == specs, output


def test_modes_agree(tiny_model: MaskConver, image: torch.Tensor) -> None:
    panoptic, scores, classes, centers = _run(tiny_model, image, "panoptic")
    heatmap, mask_logits, raw_scores, raw_classes, raw_centers = _run(tiny_model, image, "raw")
    (semantic,) = _run(tiny_model, image, "semantic")
    assert torch.equal(scores, raw_scores) and torch.equal(classes, raw_classes) and torch.equal(centers, raw_centers)
    assert torch.equal(semantic, panoptic // LABEL_DIVISOR)
    assert torch.all(scores[0, :-1] >= scores[0, 1:])
    rows, cols = centers[0, :, 0].long(), centers[0, :, 1].long()
    assert torch.allclose(scores[0], torch.sigmoid(heatmap)[0, classes[0].long(), rows, cols])
    assert torch.count_nonzero(panoptic) > 0
    # every segment id decodes to a proposal: things carry their slot, whose class matches
    for seg_id in torch.unique(panoptic).tolist():
        if seg_id == 0:
            continue
        cls, inst = divmod(seg_id, LABEL_DIVISOR)
        if inst:
            assert classes[0, inst - 1] == cls - 1 and cls - 1 < tiny_model.spec.num_things
        else:
            assert cls - 1 >= tiny_model.spec.num_things


def test_num_proposals_is_validated(tiny_model: MaskConver) -> None:
    with pytest.raises(ValueError, match="num_proposals"):
        DeployModel(tiny_model, "panoptic", num_proposals=0)
    with pytest.raises(ValueError, match="num_proposals"):
        DeployModel(tiny_model, "panoptic", num_proposals=9 * 8 * 8 + 1)
    with pytest.raises(ValueError, match="output"):
        DeployModel(tiny_model, "masks")
    assert DeployModel(tiny_model, "raw", num_proposals=5).num_proposals == 5


def test_onnx_export_is_static_and_matches(tiny_model: MaskConver, image: torch.Tensor, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    path = tmp_path / "deploy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            DeployModel(tiny_model, "panoptic"),
            (image,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES["panoptic"]),
        )
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"NonZero", "Loop", "If", "ReduceMax"}
    assert "ArgMax" in ops and "TopK" in ops
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image.numpy()})
    expected = _run(tiny_model, image, "panoptic")
    for name, ours, theirs in zip(OUTPUT_NAMES["panoptic"], got, expected):
        assert ours.dtype == theirs.numpy().dtype and ours.shape == tuple(theirs.shape), name
    np.testing.assert_allclose(got[1], expected[1].numpy(), atol=1e-5)
    assert (got[0] == expected[0].numpy()).mean() > 0.99
