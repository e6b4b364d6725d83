"""Augmentation geometry, sample stream, parameter groups and the LR schedule (no data set needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from maskconver_deploy.errors import UserError
from maskconver_deploy.training.augment import AugmentConfig, augment, resize_pair
from maskconver_deploy.training.train import StreamSampler, TrainConfig, collate, learning_rate, parameter_groups


def _scene() -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((64, 64), np.int32)
    ids[8:40, 4:20] = 3
    ids[30:60, 30:62] = 7
    palette = {0: (0, 0, 0), 3: (200, 10, 10), 7: (10, 200, 10)}
    image = np.zeros((64, 64, 3), np.uint8)
    for key, color in palette.items():
        image[ids == key] = color
    return image, ids


def test_augment_keeps_image_and_ids_aligned():
    image, ids = _scene()
    config = AugmentConfig(crop_size=(48, 48), reference_size=(64, 64), scale_range=(0.5, 1.5))
    for seed in range(20):
        img, out_ids, pad = augment(image, ids, config, np.random.default_rng(seed))
        assert img.shape == (48, 48, 3) and out_ids.shape == (48, 48) and pad.shape == (48, 48)
        assert set(np.unique(out_ids).tolist()) <= {0, 3, 7}  # nearest: no blended ids
        assert np.all(out_ids[pad] == 0) and np.all(img[pad] == 0)
        # away from region borders the colour matches the id
        for key, channel in ((3, 0), (7, 1)):
            inner = out_ids == key
            eroded = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
            if eroded.any():
                assert img[1:-1, 1:-1, channel][eroded].min() > 150
        if pad.any():  # padding is bottom/right only
            rows, cols = np.nonzero(~pad)
            assert not pad[: rows.max() + 1, : cols.max() + 1].any()


def test_augment_is_deterministic_and_flips():
    image, ids = _scene()
    config = AugmentConfig(crop_size=(64, 64), reference_size=(64, 64), scale_range=(1.0, 1.0), flip_prob=1.0)
    img, out_ids, pad = augment(image, ids, config, np.random.default_rng(0))
    assert np.array_equal(out_ids, ids[:, ::-1]) and np.array_equal(img, image[:, ::-1]) and not pad.any()
    a = augment(image, ids, AugmentConfig((32, 32), (64, 64)), np.random.default_rng(5))
    b = augment(image, ids, AugmentConfig((32, 32), (64, 64)), np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError):
        AugmentConfig((32, 32), (64, 64), scale_range=(1.5, 0.5))


def test_resize_pair_nearest_ids():
    image, ids = _scene()
    img2, ids2 = resize_pair(image, ids, (128, 128))
    assert ids2.dtype == ids.dtype and img2.shape == (128, 128, 3)
    assert np.array_equal(ids2[::2, ::2], ids)


def test_stream_sampler_resume_and_ranks():
    full = list(StreamSampler(n=10, batch=3, steps=8, start=0, seed=1))
    tail = list(StreamSampler(n=10, batch=3, steps=8, start=5, seed=1))
    assert tail == full[5:]
    epoch0 = [i for batch in full[:3] for i, _, _ in batch]
    assert len(set(epoch0)) == 9  # the first 9 positions are distinct records of epoch 0
    r0 = list(StreamSampler(10, 2, 4, 0, seed=1, rank=0, world=2))
    r1 = list(StreamSampler(10, 2, 4, 0, seed=1, rank=1, world=2))
    seeds0 = {s for b in r0 for _, s, _ in b}
    seeds1 = {s for b in r1 for _, s, _ in b}
    assert not seeds0 & seeds1  # ranks see disjoint stream positions
    assert list(StreamSampler(10, 2, 4, 0, seed=2))[0] != list(StreamSampler(10, 2, 4, 0, seed=1))[0]
    assert all(crop is None for batch in full for _, _, crop in batch)


def test_early_crop_schedule():
    config = TrainConfig(preset="shapes-256", data=Path("d"), out=Path("m.pt"), steps=6, early_size=128, early_steps=4)
    spec = config.spec()
    assert [config.crop_at(s, spec) for s in range(6)] == [(128, 128)] * 4 + [(256, 256)] * 2
    sampler = StreamSampler(10, 2, 6, 3, seed=0, crop_at=lambda s: config.crop_at(s, spec))
    assert [batch[0][2] for batch in sampler] == [(128, 128), (256, 256), (256, 256)]
    # the crop does not change which records and augmentation seeds a step sees
    plain = list(StreamSampler(10, 2, 6, 3, seed=0))
    assert [[item[:2] for item in b] for b in sampler] == [[item[:2] for item in b] for b in plain]
    for bad in ({"early_size": 120, "early_steps": 2}, {"early_steps": 2}):
        with pytest.raises(UserError, match="--early-s"):
            TrainConfig(preset="shapes-256", data=Path("d"), out=Path("m.pt"), **bad).validate()


def test_collate_trims_slots_to_batch_maximum():
    def sample(n: int) -> dict[str, np.ndarray]:
        classes = np.full(6, -1, np.int64)
        classes[:n] = 1
        return {
            "image": np.zeros((8, 8, 3), np.uint8),
            "heatmap": np.zeros((2, 1, 1), np.float32),
            "pixel_valid": np.ones((8, 8), np.uint8),
            "classes": classes,
            "positions": np.zeros(6, np.int64),
            "masks": np.zeros((6, 8, 8), np.uint8),
            "valid": (classes >= 0).astype(np.float32),
            "num_instances": np.asarray(n, np.int64),
        }

    batch = collate([sample(2), sample(4)])
    assert batch["classes"].shape == (2, 4) and batch["masks"].shape == (2, 4, 8, 8)
    assert batch["valid"].sum().item() == 6
    assert collate([sample(0)])["classes"].shape == (1, 1)


def test_weight_decay_groups():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=True),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, groups=8, bias=False),
        nn.Linear(8, 4),
        nn.LayerNorm(4),
        nn.Embedding(3, 4),
    )
    decay, no_decay = parameter_groups(model, 1e-5)
    decayed = {id(p) for p in decay["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_warmup_and_cosine():
    assert learning_rate(0, 0.1, 10, 110) == pytest.approx(0.01)
    assert learning_rate(9, 0.1, 10, 110) == pytest.approx(0.1)
    assert learning_rate(10, 0.1, 10, 110) == pytest.approx(0.1)
    assert learning_rate(60, 0.1, 10, 110) == pytest.approx(0.05)
    assert learning_rate(110, 0.1, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(5, 0.1, 0, 10) == pytest.approx(0.05)
