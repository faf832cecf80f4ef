"""SiLog loss and the picture helpers."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vpd_hf.losses import silog_loss
from vpd_hf.visualization import apply_colormap, colorize_depth, depth_to_uint16_png


def test_silog_matches_numpy_and_pools_over_the_batch():
    rng = np.random.default_rng(0)
    pred = rng.uniform(0.5, 5, (2, 4, 5))
    target = rng.uniform(0.5, 5, (2, 4, 5))
    target[0, 0, :3] = 0.0
    target[1, 2, 2] = np.nan
    target[1, 3, 0] = np.inf
    valid = np.isfinite(target) & (target > 0)
    d = np.log(target[valid]) - np.log(pred[valid])
    want = math.sqrt(np.mean(d**2) - 0.5 * np.mean(d) ** 2)
    got = silog_loss(torch.tensor(pred), torch.tensor(target), lambd=0.5)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(want, rel=1e-6)
    lam1 = silog_loss(torch.tensor(pred), torch.tensor(target), lambd=1.0)
    assert float(lam1) == pytest.approx(math.sqrt(np.var(d)), rel=1e-5)


def test_silog_is_scale_invariant_at_lambda_one_and_masks():
    pred = torch.rand(1, 8, 8) + 0.5
    target = pred * 3.0  # a pure scale error
    assert float(silog_loss(pred, target, lambd=1.0)) < 1e-5
    assert float(silog_loss(pred, target, lambd=0.0)) == pytest.approx(math.log(3.0), rel=1e-5)
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :4] = 1
    target2 = target.clone()
    target2[0, 4:] = 100.0  # outside the mask: ignored
    assert float(silog_loss(pred, target2, 0.0, valid_mask=mask)) == pytest.approx(math.log(3.0), rel=1e-5)


def test_silog_without_valid_pixels_is_zero_and_differentiable():
    pred = torch.rand(1, 4, 4, requires_grad=True)
    loss = silog_loss(pred, torch.zeros(1, 4, 4))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(pred.grad, torch.zeros(1, 4, 4))


def test_silog_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="`labels` must have the shape"):
        silog_loss(torch.ones(1, 4, 4), torch.ones(1, 4, 5))
    with pytest.raises(ValueError, match="`pixel_mask` must have the shape"):
        silog_loss(torch.ones(1, 4, 4), torch.ones(1, 4, 4), valid_mask=torch.ones(4, 4))


def test_colormap_endpoints_and_interpolation():
    rgb = apply_colormap(np.array([0.0, 1.0, 0.5, -3.0, 7.0, np.nan]), "viridis")
    assert rgb[0].tolist() == [0x44, 0x01, 0x54] and rgb[1].tolist() == [0xFD, 0xE7, 0x25]
    assert rgb[2].tolist() == [0x21, 0x91, 0x8C]  # the middle anchor
    assert (
        rgb[3].tolist() == rgb[0].tolist() and rgb[4].tolist() == rgb[1].tolist() and rgb[5].tolist() == rgb[0].tolist()
    )
    gray = apply_colormap(np.array([0.25]), "gray")
    assert gray.tolist() == [[64, 64, 64]]
    with pytest.raises(ValueError, match="`colormap` must be one of"):
        apply_colormap(np.zeros(2), "jet")


def test_colorize_depth_near_is_bright_and_invalid_is_marked():
    depth = torch.tensor([[1.0, 2.0, 3.0], [0.0, float("nan"), 3.0]])
    image = colorize_depth(depth, vmin=1.0, vmax=3.0, colormap="gray")
    assert isinstance(image, Image.Image) and image.size == (3, 2) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 2].tolist() == [0, 0, 0]
    assert pixels[0, 1].tolist() == [128, 128, 128]
    assert pixels[1, 0].tolist() == [0, 0, 0] and pixels[1, 1].tolist() == [0, 0, 0]
    far_bright = np.asarray(colorize_depth(depth, vmin=1.0, vmax=3.0, colormap="gray", invert=False))
    assert far_bright[0, 2].tolist() == [255, 255, 255]
    auto = np.asarray(colorize_depth(np.linspace(1, 10, 100).reshape(10, 10)))  # 2nd-98th percentile by default
    assert auto[0, 0].tolist() == [0xFD, 0xE7, 0x25] and auto[-1, -1].tolist() == [0x44, 0x01, 0x54]
    flat = np.asarray(colorize_depth(5.0 + 1e-7 * np.random.default_rng(0).standard_normal((8, 8))))
    assert len(np.unique(flat.reshape(-1, 3), axis=0)) == 1  # float noise is not stretched into a pattern
    with pytest.raises(ValueError, match="2-D numeric array"):
        colorize_depth(np.zeros((2, 3, 4)))


def test_uint16_png_round_trip(tmp_path):
    depth = np.array([[0.0, 1.2345], [9.999, 70.0]])
    image = depth_to_uint16_png(depth)
    image.save(tmp_path / "depth.png")
    back = np.asarray(Image.open(tmp_path / "depth.png"))
    assert back.dtype == np.uint16 and back.tolist() == [[0, 1234], [9999, 65535]]
