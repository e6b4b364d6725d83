"""Mask embeddings and mask logits: gather at centers, class-embedding fusion, padding classes, dot product."""

from __future__ import annotations

import pytest
import torch

from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.specs import get_preset


@pytest.fixture(scope="module")
def tiny_model() -> MaskConver:
    torch.manual_seed(0)
    spec = get_preset("shapes-256").with_changes(name="tiny-64", input_size=(64, 64))
    return MaskConver(spec).eval()


def test_class_embedding_separates_two_classes_at_one_center(tiny_model: MaskConver) -> None:
    torch.manual_seed(1)
    center = torch.randn(1, 256, 8, 8)
    features = torch.randn(1, 256, 8, 8)
    positions = torch.tensor([[19, 19]])  # two centers colliding at (2, 3)
    classes = torch.tensor([[1, 6]])
    with torch.no_grad():
        logits = tiny_model.mask_logits(tiny_model.mask_embeddings(center, positions, classes), features)
    assert logits.shape == (1, 2, 8, 8)
    assert (logits[0, 0] - logits[0, 1]).abs().max() > 1e-2

    without = MaskConver(tiny_model.spec.with_changes(class_embedding=False)).eval()
    without.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        same = without.mask_logits(without.mask_embeddings(center, positions, classes), features)
    assert torch.equal(same[0, 0], same[0, 1])


def test_mask_embeddings_gather_multiply_and_mlp(tiny_model: MaskConver) -> None:
    torch.manual_seed(2)
    center = torch.randn(2, 256, 8, 8)
    positions = torch.tensor([[0, 63, 10], [5, 5, 0]])
    classes = torch.tensor([[2, 8, -1], [0, 3, -1]])
    with torch.no_grad():
        got = tiny_model.mask_embeddings(center, positions, classes)
        table = tiny_model.class_embedding.weight
        for b in range(2):
            for k in range(3):
                y, x = divmod(int(positions[b, k]), 8)
                row = max(int(classes[b, k]), 0)  # padding -1 uses row 0
                expected = tiny_model.mlp(center[b, :, y, x] * table[row])
                assert torch.allclose(got[b, k], expected, atol=1e-5)


def test_mask_logits_is_a_dot_product_over_the_embedding(tiny_model: MaskConver) -> None:
    torch.manual_seed(3)
    embeddings = torch.randn(2, 5, 256)
    features = torch.randn(2, 256, 8, 8)
    expected = torch.einsum("bke,behw->bkhw", embeddings, features)
    assert torch.allclose(tiny_model.mask_logits(embeddings, features), expected, atol=1e-4)
