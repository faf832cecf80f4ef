"""Augmentations of the official recipes: geometry moves image and label together, mmseg/mmcv semantics, seeding."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vpd_hf.data.augmentation import (
    IGNORE_INDEX,
    DepthAugmentation,
    SegmentationAugmentation,
    normalize_image,
    photometric_distortion,
    random_crop_with_cat_max_ratio,
    rescale_size,
    resize_bilinear,
    resize_nearest,
    resize_referring,
    sample_rng,
)

cv2 = pytest.importorskip("cv2")
pytest.importorskip("albumentations")


class ScriptedRng:
    """Stands in for a numpy Generator: returns scripted values, so mmseg's draw order can be checked exactly."""

    def __init__(self, integers, uniforms):
        self._integers, self._uniforms = list(integers), list(uniforms)

    def integers(self, *args, **kwargs):
        return self._integers.pop(0)

    def uniform(self, low, high):
        value = self._uniforms.pop(0)
        assert low <= value <= high
        return value


def square_scene(height=60, width=80, box=(20, 35, 30, 55), klass=7, background=3):
    """A grey image with a red box and its label map (box = class `klass`)."""
    image = np.full((height, width, 3), 90, np.uint8)
    label = np.full((height, width), background, np.uint8)
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = (230, 20, 20)
    label[y0:y1, x0:x1] = klass
    return image, label


def dilate(mask):
    """3x3 dilation of a bool (H, W) tensor."""
    return torch.nn.functional.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0


# -- seeding --------------------------------------------------------------------------------------------------------


def test_sample_rng_depends_on_seed_epoch_index_only():
    draw = lambda *key: sample_rng(*key).random(4).tolist()  # noqa: E731
    assert draw(0, 0, 5) == draw(0, 0, 5)
    assert len({tuple(draw(*key)) for key in [(0, 0, 5), (1, 0, 5), (0, 1, 5), (0, 0, 6)]}) == 4
    with pytest.raises(ValueError, match="epoch"):
        sample_rng(0, -1, 0)
    with pytest.raises(ValueError, match="seed"):
        sample_rng(1.5, 0, 0)


# -- resizing (mmcv semantics) --------------------------------------------------------------------------------------


def test_rescale_size_follows_mmcv_imrescale():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(256, 341, (2048, 512)) == (512, 682)  # 341 * 2 = 682
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side limits: factor 2.048
    assert rescale_size(480, 640, (1024, 256)) == (256, 341)  # int(341.33 + 0.5)


def test_resize_nearest_matches_opencv():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 150, (37, 53)).astype(np.uint8)
    for size in [(74, 106), (20, 31), (64, 40), (37, 53)]:
        expected = cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(resize_nearest(label, size), expected)


def test_resize_bilinear_torch_fallback_close_to_opencv(monkeypatch):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (31, 45, 3)).astype(np.uint8)
    with_cv2 = resize_bilinear(image, (50, 70))
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    fallback = resize_bilinear(image, (50, 70))
    assert fallback.dtype == np.uint8 and fallback.shape == (50, 70, 3)
    assert np.abs(with_cv2.astype(int) - fallback.astype(int)).max() <= 1


def test_normalize_image_range():
    image = np.array([[[0, 127, 255]]], np.uint8)
    values = normalize_image(image)
    assert values.shape == (3, 1, 1) and values.dtype == torch.float32
    torch.testing.assert_close(values.flatten(), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))


# -- PhotoMetricDistortion -----------------------------------------------------------------------------------------


def test_photometric_brightness_only_truncates_like_mmseg():
    image = np.array([[[10, 200, 250]]], np.uint8)
    # brightness on (+10.7), contrast last, saturation off, hue off, final contrast off
    out = photometric_distortion(image, ScriptedRng([1, 0, 0, 0, 0], [10.7]))
    np.testing.assert_array_equal(out, [[[20, 210, 255]]])  # float add, clip, truncate


def test_photometric_contrast_position_follows_the_mode_coin():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)

    def saturate(img, alpha):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = np.clip(hsv[:, :, 1].astype(np.float32) * alpha, 0, 255).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def contrast(img, alpha):
        return np.clip(img.astype(np.float32) * alpha, 0, 255).astype(np.uint8)

    # mode 1: contrast (x1.4) before saturation (x0.6); hue off
    first = photometric_distortion(image, ScriptedRng([0, 1, 1, 1, 0], [1.4, 0.6]))
    np.testing.assert_array_equal(first, saturate(contrast(image, 1.4), 0.6))
    # mode 0: saturation first, contrast at the end
    last = photometric_distortion(image, ScriptedRng([0, 0, 1, 0, 1], [0.6, 1.4]))
    np.testing.assert_array_equal(last, contrast(saturate(image, 0.6), 1.4))


def test_photometric_hue_shift_is_modulo_180():
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0] = 255  # pure red: hue 0
    out = photometric_distortion(image, ScriptedRng([0, 0, 0, 1, -18, 0], []))
    hue = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[..., 0]
    assert (hue == 162).all()  # (0 - 18) mod 180


def test_photometric_is_deterministic_per_generator():
    image = np.random.default_rng(3).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    a = photometric_distortion(image, sample_rng(0, 0, 1))
    b = photometric_distortion(image, sample_rng(0, 0, 1))
    np.testing.assert_array_equal(a, b)
    outs = {photometric_distortion(image, sample_rng(0, 0, i)).tobytes() for i in range(8)}
    assert len(outs) > 4


# -- RandomCrop with cat_max_ratio ----------------------------------------------------------------------------------


def striped_label(ignore_background=False):
    """64 x 256: columns < 96 alternate classes 1/2, the rest is class 0 (or ignored). A 64x64 crop at column x
    passes the 0.75 rule iff x < 80, i.e. 80 of the 193 possible crops (41 %): most crops violate it."""
    label = np.zeros((64, 256), np.uint8)
    label[:, :96] = np.where(np.arange(96) % 2 == 0, 1, 2)[None, :]
    if ignore_background:
        label[:, 96:] = IGNORE_INDEX
    return label


def passes(label, offset, size=64, ratio=0.75):
    y, x = offset
    crop = label[y : y + size, x : x + size]
    values, counts = np.unique(crop, return_counts=True)
    counts = counts[values != IGNORE_INDEX]
    return counts.size > 1 and counts.max() / counts.sum() < ratio


def test_cat_max_ratio_rule_picks_a_valid_crop():
    label = striped_label()
    single = [
        passes(label, random_crop_with_cat_max_ratio(label, (64, 64), sample_rng(0, 0, i), 1.0)) for i in range(200)
    ]
    assert np.mean(single) < 0.5  # without the rule most crops violate it
    chosen = [random_crop_with_cat_max_ratio(label, (64, 64), sample_rng(0, 0, i), 0.75) for i in range(200)]
    assert np.mean([passes(label, c) for c in chosen]) > 0.97
    # exactly mmseg's loop: first passing offset among <= 11 draws, else the last drawn
    for i in range(50):
        rng = sample_rng(0, 0, i)
        offsets = [(int(rng.integers(0, 1)), int(rng.integers(0, 193))) for _ in range(11)]
        expected = next((o for o in offsets[:10] if passes(label, o)), offsets[10])
        assert random_crop_with_cat_max_ratio(label, (64, 64), sample_rng(0, 0, i), 0.75) == expected


def test_cat_max_ratio_ignores_the_ignore_index():
    label = striped_label(ignore_background=True)
    for i in range(30):
        offset = random_crop_with_cat_max_ratio(label, (64, 64), sample_rng(1, 0, i), 0.75)
        assert passes(label, offset)
        assert offset[1] <= 94  # a crop of ignored pixels only (one class or none) never passes


# -- segmentation pipeline ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(8))
def test_segmentation_augmentation_keeps_image_and_label_aligned(index):
    image, label = square_scene()
    aug = SegmentationAugmentation(crop_size=(64, 64), img_scale=(160, 60), ratio_range=(0.5, 2.0), photometric=False)
    pixel_values, labels = aug(image, label, sample_rng(0, 0, index))
    assert pixel_values.shape == (3, 64, 64) and pixel_values.dtype == torch.float32
    assert labels.shape == (64, 64) and labels.dtype == torch.int64
    red = (pixel_values[0] > 0.5) & (pixel_values[1] < -0.5)
    square = labels == 7
    # bilinear image vs nearest label: they may only disagree within one pixel of the box border of both
    disagree = red ^ square
    assert not (disagree & ~(dilate(red) & dilate(square))).any()
    assert square.sum() == 0 or (red & square).sum() / (red | square).sum() > 0.5
    assert set(labels.unique().tolist()) <= {3, 7, IGNORE_INDEX}
    padding = labels == IGNORE_INDEX
    assert (pixel_values[:, padding] == 0).all()


def test_segmentation_augmentation_pads_small_crops_bottom_right():
    image, label = square_scene(height=20, width=30, box=(5, 10, 5, 10))
    aug = SegmentationAugmentation(crop_size=(64, 64), img_scale=(30, 20), ratio_range=(1.0, 1.0), photometric=False)
    pixel_values, labels = aug(image, label, sample_rng(0, 0, 0))
    assert (labels[20:] == IGNORE_INDEX).all() and (labels[:, 30:] == IGNORE_INDEX).all()
    assert (labels[:20, :30] != IGNORE_INDEX).all()
    assert (pixel_values[:, 20:] == 0).all() and (pixel_values[:, :, 30:] == 0).all()


def test_segmentation_augmentation_flips_both():
    image, label = square_scene()
    aug = SegmentationAugmentation(crop_size=(60, 80), img_scale=(80, 60), ratio_range=(1.0, 1.0), photometric=False)
    outs = [aug(image, label, sample_rng(0, 0, i)) for i in range(12)]
    # the box covers columns 30..54; mirrored, 25..49
    flipped = [bool(labels[25, 27] == 7) for _, labels in outs]
    assert [bool(labels[25, 52] == 7) for _, labels in outs] == [not f for f in flipped]
    assert any(flipped) and not all(flipped)
    for pixel_values, labels in outs:
        assert torch.equal((pixel_values[0] > 0.5) & (pixel_values[1] < -0.5), labels == 7)


def test_segmentation_augmentation_is_deterministic_and_checks_arguments():
    image, label = square_scene()
    aug = SegmentationAugmentation(crop_size=(32, 32), img_scale=(160, 60))
    a, b = aug(image, label, sample_rng(5, 2, 9)), aug(image, label, sample_rng(5, 2, 9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="ratio_range"):
        SegmentationAugmentation(ratio_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationAugmentation(crop_size=(0, 512))
    with pytest.raises(ValueError, match="sizes differ"):
        aug(image, label[:10], sample_rng(0, 0, 0))


# -- depth pipeline -------------------------------------------------------------------------------------------------


def depth_scene(height=40, width=64):
    image = np.full((height, width, 3), 20, np.uint8)
    depth = np.full((height, width), 2.0, np.float32)
    image[10:25, 30:50] = 240
    depth[10:25, 30:50] = 7.0
    return image, depth


class Identity:
    """A stand-in for the albumentations pipeline, to look at CutDepth alone."""

    transforms = ()

    def set_random_seed(self, seed):
        pass

    def __call__(self, image, depth):
        return {"image": image, "depth": depth}


@pytest.mark.parametrize("render", ["official", "linear"])
def test_cutdepth_applies_to_every_fourth_index_only(render):
    image, depth = depth_scene()
    depth[:, :] = np.linspace(0.5, 9.5, 64, dtype=np.float32)[None, :]
    aug = DepthAugmentation(crop_size=(40, 64), cutdepth_render=render)
    aug._compose = Identity()
    for index in range(12):
        out, out_depth, params = aug(image, depth, sample_rng(0, 0, index), index, return_params=True)
        np.testing.assert_array_equal(out_depth, depth)
        if index % 4:
            assert params["cutdepth"] is None
            np.testing.assert_array_equal(out, image)
            continue
        rng = sample_rng(0, 0, index)
        alpha, beta = rng.random(), rng.random()
        left, width = int(alpha * 64), int(max((64 - alpha * 64) * beta * 0.75, 1))
        assert params["cutdepth"] == (left, width)
        strip = depth[:, left : left + width]
        expected = np.floor(strip * 1000).astype(np.int64) % 256 if render == "official" else strip / 10 * 255
        for channel in range(3):
            np.testing.assert_array_equal(out[:, left : left + width, channel], expected.astype(np.uint8))
        outside = np.ones(64, bool)
        outside[left : left + width] = False
        np.testing.assert_array_equal(out[:, outside], image[:, outside])


def test_cutdepth_official_render_wraps_millimetres():
    aug = DepthAugmentation()
    np.testing.assert_array_equal(aug.render_depth(np.array([[2.5, 0.2559, 10.0]])), [[196, 255, 16]])


def test_depth_augmentation_moves_depth_with_image():
    image, depth = depth_scene()
    aug = DepthAugmentation(crop_size=(32, 48))
    flips = 0
    for index in [1, 2, 3, 5, 6, 7, 9, 10]:  # not multiples of 4: no CutDepth
        out, out_depth, params = aug(image, depth, sample_rng(0, 0, index), index, return_params=True)
        assert out.shape == (32, 48, 3) and out.dtype == np.uint8 and out_depth.shape == (32, 48)
        assert torch.equal(torch.from_numpy(out.mean(-1) > 128), torch.from_numpy(out_depth == 7.0))
        flips += "HorizontalFlip" in params["applied"]
    assert 0 < flips < 8


def test_depth_augmentation_is_deterministic_with_independent_transform_seeds():
    image = np.random.default_rng(4).integers(0, 256, (40, 64, 3)).astype(np.uint8)
    depth = np.random.default_rng(5).uniform(0.5, 9.0, (40, 64)).astype(np.float32)
    aug = DepthAugmentation(crop_size=(32, 32))
    a = aug(image, depth, sample_rng(0, 3, 5), 5)
    b = aug(image, depth, sample_rng(0, 3, 5), 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = aug(image, depth, sample_rng(0, 4, 5), 5)
    assert not np.array_equal(a[0], c[0])
    # each transform has its own seed: the p=0.5 decisions are not all the same
    applied = [set(aug(image, depth, sample_rng(0, 0, i), i, return_params=True)[2]["applied"]) for i in range(40)]
    flip = [("HorizontalFlip" in a) for a in applied]
    gamma = [("RandomGamma" in a) for a in applied]
    hsv = [("HueSaturationValue" in a) for a in applied]
    assert flip != gamma and flip != hsv and 5 < sum(flip) < 35


def test_depth_augmentation_pads_small_images_with_invalid_depth():
    image, depth = depth_scene(height=20, width=30)
    out, out_depth = DepthAugmentation(crop_size=(32, 48))(image, depth, sample_rng(0, 0, 1), 1)
    assert out.shape == (32, 48, 3) and out_depth.shape == (32, 48)
    assert (out_depth[20:] == 0).all() and (out_depth[:, 30:] == 0).all() and (out_depth[:20, :30] > 0).all()


def test_depth_augmentation_pickles_without_its_pipeline():
    import pickle

    aug = DepthAugmentation(crop_size=(16, 16))
    image, depth = depth_scene()
    aug(image, depth, sample_rng(0, 0, 1), 1)
    clone = pickle.loads(pickle.dumps(aug))
    assert clone._compose is None
    np.testing.assert_array_equal(
        clone(image, depth, sample_rng(0, 0, 1), 1)[0], aug(image, depth, sample_rng(0, 0, 1), 1)[0]
    )


def test_depth_augmentation_checks_arguments():
    with pytest.raises(ValueError, match="cutdepth_render"):
        DepthAugmentation(cutdepth_render="colormap")
    with pytest.raises(ValueError, match="cutdepth_p"):
        DepthAugmentation(cutdepth_p=1.5)


# -- referring ------------------------------------------------------------------------------------------------------


def test_resize_referring_plain_square_resize():
    image, label = square_scene(height=30, width=60, box=(10, 20, 30, 60))
    pixel_values, labels = resize_referring(Image.fromarray(image), label == 7, size=32)
    assert pixel_values.shape == (3, 32, 32) and labels.shape == (32, 32) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == {0, 1}
    # aspect ratio not kept: the box covers rows 10/30..20/30 and columns 30/60..1 of the square
    assert labels[11:21, 16:].all() and not labels[:10].any() and not labels[:, :15].any()
    with pytest.raises(ValueError, match="sizes differ"):
        resize_referring(Image.fromarray(image), label[:5] == 7)
