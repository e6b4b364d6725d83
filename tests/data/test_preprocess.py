"""The input policy: what `load_image` accepts, and letterbox / unletterbox."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskconver_deploy.data.preprocess import Letterbox, letterbox, load_image, unletterbox
from maskconver_deploy.errors import UserError


def test_rgb_jpeg_of_the_real_sample(shared_data: Path) -> None:
    image = load_image(shared_data / "coco_panoptic_sample" / "input_images" / "000000142238.jpg")
    assert image.dtype == np.uint8 and image.shape == (427, 640, 3)


def test_grayscale_is_replicated(tmp_path: Path) -> None:
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (6, 10, 3) and (out == gray[..., None]).all()


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[255, 0], [128, 51]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out[..., 0].tolist() == [[200, 0], [100, 40]]
    la = np.stack([np.full((2, 2), 100, np.uint8), rgba[..., 3]], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[..., 1].tolist() == [[100, 0], [50, 20]]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    img.putdata([0, 1, 1])
    img.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[0].tolist() == [[10, 20, 30], [200, 100, 0], [200, 100, 0]]
    img.save(tmp_path / "pt.png", transparency=1)
    assert load_image(tmp_path / "pt.png")[0].tolist() == [[10, 20, 30], [0, 0, 0], [0, 0, 0]]


def test_sixteen_bit_is_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 257, 65535, 32896]], np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert load_image(tmp_path / "d.png")[0, :, 0].tolist() == [0, 1, 255, 128]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((4, 8, 3), np.uint8)
    stored[0, 0] = 255  # top-left pixel marked
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "e.jpg", exif=exif, quality=100)
    shown = load_image(tmp_path / "e.jpg")
    assert shown.shape == (8, 4, 3)
    assert shown[0, -1].mean() > 128  # the marked corner is now top-right
    assert load_image(tmp_path / "e.jpg", apply_exif=False).shape == (4, 8, 3)


@pytest.mark.parametrize("case", ["missing", "text", "truncated"])
def test_bad_files_name_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.jpg"
    if case == "text":
        path.write_text("not an image")
    elif case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="bad.jpg"):
        load_image(path)


def test_letterbox_identity() -> None:
    image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    out, box = letterbox(image, (32, 48))
    assert out is image and box.is_identity
    ids = np.arange(32 * 48).reshape(32, 48)
    assert unletterbox(ids, box) is ids


def test_letterbox_keeps_aspect_and_pads_bottom_right() -> None:
    image = np.full((100, 200, 3), 77, np.uint8)
    out, box = letterbox(image, (64, 64))
    assert out.shape == (64, 64, 3)
    assert box == Letterbox((100, 200), (32, 64), (64, 64), 0.32)
    assert (out[:32] == 77).all() and (out[32:] == 0).all()
    tall, box = letterbox(np.full((90, 30, 3), 5, np.uint8), (60, 60))
    assert box.resized == (60, 20) and (tall[:, 20:] == 0).all() and (tall[:, :20] == 5).all()
    up, box = letterbox(np.full((10, 20, 3), 9, np.uint8), (64, 64))
    assert box.resized == (32, 64) and box.scale == 3.2


def test_unletterbox_inverts_a_label_map() -> None:
    rng = np.random.default_rng(1)
    h, w = 75, 130
    blocks = rng.integers(0, 50, (5, 10))
    labels = np.kron(blocks, np.ones((15, 13), int))  # 75 x 130, blocks of 15 x 13
    _, box = letterbox(np.zeros((h, w, 3), np.uint8), (64, 64))
    net = np.full((64, 64), -7)
    rh, rw = box.resized
    ys = np.minimum((np.arange(rh) + 0.5) * h / rh, h - 1).astype(int)
    xs = np.minimum((np.arange(rw) + 0.5) * w / rw, w - 1).astype(int)
    net[:rh, :rw] = labels[ys[:, None], xs[None, :]]  # what a perfect model answers on the letterboxed input
    back = unletterbox(net, box)
    assert back.shape == (h, w) and not (back == -7).any()
    assert (back == labels).mean() > 0.9  # only block borders can move, by under one network pixel
    with pytest.raises(UserError):
        unletterbox(net[:10], box)


def test_letterbox_rejects_bad_arrays() -> None:
    with pytest.raises(UserError):
        letterbox(np.zeros((4, 4), np.uint8), (8, 8))
    with pytest.raises(UserError):
        letterbox(np.zeros((4, 4, 3), np.float32), (8, 8))
