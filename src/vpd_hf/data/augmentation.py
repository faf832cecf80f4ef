"""Training augmentations of the official VPD recipes, per-sample seeding, and the plumbing shared by the adapters.

Recipes (see `docs/vpd-method.md` §5.2, §6.2, §7.2):

* **Segmentation** (mmsegmentation 0.x ADE20K pipeline): :class:`SegmentationAugmentation` -- ratio resize of
  `img_scale=(2048, 512)` by r ~ U[0.5, 2.0] keeping the aspect ratio (bilinear image, nearest label), `RandomCrop`
  512x512 with `cat_max_ratio=0.75`, horizontal flip p=0.5, :func:`photometric_distortion` (mmseg's
  `PhotoMetricDistortion`), normalisation to [-1, 1] and padding to 512x512 (image 0 after normalisation, label 255).
* **Depth** (official VPD/GLPDepth NYUv2 training): :class:`DepthAugmentation` -- CutDepth on every 4th sample, then
  albumentations `HorizontalFlip`, `RandomCrop` 480x480, `RandomBrightnessContrast`, `RandomGamma`,
  `HueSaturationValue` with their default parameters, as the official code calls them.
* **Referring** (LAVT protocol): :func:`resize_referring` -- a plain 512x512 resize, no flip, no photometric change.

Randomness: every random draw of sample `index` in epoch `epoch` comes from :func:`sample_rng` =
`numpy.random.default_rng([seed, epoch, index])`; albumentations transforms are re-seeded from that generator before
each call (one seed per transform: albumentations' own `Compose.set_random_seed` gives every transform the *same* seed,
which would make their "apply with p=0.5" decisions identical). A sample is therefore the same whatever the DataLoader
worker count, the process rank or the order in which samples are fetched.

Epochs: the adapters (`vpd_hf.data.depth` / `segmentation` / `referring`) return a `datasets.Dataset` whose transform
is an :class:`AdapterTransform`; call :func:`set_epoch` (`set_epoch(train_dataset, epoch)`) at the start of every
epoch. The epoch is an attribute of the transform object, so it reaches DataLoader workers that are started after the
call -- the default (`persistent_workers=False`) starts them at every epoch; with `persistent_workers=True` the
workers keep the epoch they were started with, so do not combine the two.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "AdapterTransform",
    "DepthAugmentation",
    "InvalidRowError",
    "SegmentationAugmentation",
    "get_adapter_transform",
    "normalize_image",
    "photometric_distortion",
    "random_crop_with_cat_max_ratio",
    "rescale_size",
    "resize_bilinear",
    "resize_nearest",
    "resize_referring",
    "sample_rng",
    "set_epoch",
]

IGNORE_INDEX = 255  # label of ignored pixels: padding, the reduced "other" class of ADE20K

# --------------------------------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------------------------------


def _check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return int(value)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of every random draw of sample `index` in epoch `epoch` of a dataset seeded with `seed`.

    `numpy.random.default_rng([seed, epoch, index])`: independent streams for every triple (SeedSequence hashes the
    whole list), so a sample never depends on which other samples were drawn before it or in which process.
    """
    return np.random.default_rng(
        [
            _check_non_negative_int("seed", seed),
            _check_non_negative_int("epoch", epoch),
            _check_non_negative_int("index", index),
        ]
    )


# --------------------------------------------------------------------------------------------------------------------
# Image helpers (uint8 RGB arrays `(H, W, 3)`; labels `(H, W)` integer arrays)
# --------------------------------------------------------------------------------------------------------------------


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB `(H, W, 3)` -> float32 `(3, H, W)` in [-1, 1] (mean = std = 127.5, Stable Diffusion's input range)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"`image` must be a uint8 (H, W, 3) array, got {image.dtype} {image.shape}.")
    # np.asarray(PIL image) is read-only and torch warns about non-writable arrays: copy (the float cast copies anyway).
    array = np.ascontiguousarray(image) if image.flags.writeable else np.array(image, order="C")
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's `imrescale` size rule: the largest `(new_h, new_w)` with the aspect ratio of `(height, width)` whose long
    side fits `max(scale)` and short side fits `min(scale)`; sides rounded half up (`int(x + 0.5)`) as mmcv does."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 `(H, W, C)` image to `size = (h, w)`, as `cv2.resize(INTER_LINEAR)` (what mmcv uses:
    half-pixel centres, no antialiasing). Uses OpenCV when installed, otherwise an equivalent torch interpolation
    (identical up to OpenCV's fixed-point rounding: at most 1 grey level)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    try:
        import cv2
    except ImportError:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        out = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
        return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[:, :, None]


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a `(H, W)` or `(H, W, C)` array of any dtype to `size = (h, w)` with OpenCV's
    `INTER_NEAREST` rule (source index `floor(i * H / h)`), which mmcv uses for label maps."""
    height, width = size
    src_h, src_w = array.shape[:2]
    if (src_h, src_w) == (height, width):
        return array
    rows = np.minimum(np.floor(np.arange(height) * (src_h / height)).astype(np.int64), src_h - 1)
    cols = np.minimum(np.floor(np.arange(width) * (src_w / width)).astype(np.int64), src_w - 1)
    return array[rows[:, None], cols[None, :]]


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - opencv comes with albumentations (the `train` extra)
        raise ImportError(
            "The segmentation training augmentation needs OpenCV (HSV conversion as in mmcv): "
            "`pip install opencv-python-headless` or `pip install vpd-hf[train]`."
        ) from error
    return cv2


def _import_albumentations() -> Any:
    # albumentations asks PyPI for a newer version at import time unless told not to: no network calls from here.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations
    except ImportError as error:
        raise ImportError(
            "The depth training augmentation uses albumentations (as the official VPD code does): "
            "`pip install vpd-hf[train]` or `pip install albumentations`."
        ) from error
    return albumentations


# --------------------------------------------------------------------------------------------------------------------
# Segmentation (mmsegmentation 0.x ADE20K training pipeline)
# --------------------------------------------------------------------------------------------------------------------


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg's `PhotoMetricDistortion.convert`: float32 affine map, clip to [0, 255], truncate to uint8.
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmsegmentation 0.x `PhotoMetricDistortion` on a uint8 RGB `(H, W, 3)` image; returns a new uint8 image.

    In order: brightness (+U[-delta, delta]), then a coin decides whether contrast (x U[0.5, 1.5]) comes first or last;
    saturation (HSV S channel x U[0.5, 1.5]); hue (H channel + randint[-18, 18), modulo 180); contrast if it was not
    applied first. Each of the four is applied with probability 0.5. The draws come from `rng` in mmseg's order
    (`randint(2)` -> `rng.integers(2)`, `uniform` -> `rng.uniform`). HSV conversions use OpenCV on uint8 as mmcv's
    `bgr2hsv`/`hsv2bgr` do (mmcv works on BGR, this function on RGB: the HSV values are the same).
    """
    cv2 = _import_cv2()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"`image` must be a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}.")

    def contrast(img: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            return _convert(img, alpha=rng.uniform(*contrast_range))
        return img

    if rng.integers(2):  # brightness
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        image = contrast(image)
    if rng.integers(2):  # saturation
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):  # hue
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = int(rng.integers(-hue_delta, hue_delta))
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int64) + shift) % 180).astype(np.uint8)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        image = contrast(image)
    return image


def _crop_bbox(shape: tuple[int, ...], crop_size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    # mmseg `RandomCrop.get_crop_bbox`: offset_h then offset_w, each uniform in [0, margin].
    margin_h, margin_w = max(shape[0] - crop_size[0], 0), max(shape[1] - crop_size[1], 0)
    return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))


def random_crop_with_cat_max_ratio(
    label: np.ndarray,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    max_tries: int = 10,
) -> tuple[int, int]:
    """Top-left corner `(y, x)` of mmseg's `RandomCrop` with `cat_max_ratio`.

    A crop is accepted when it holds more than one non-ignored class and the most frequent one covers less than
    `cat_max_ratio` of its non-ignored pixels. Like mmseg: a first offset is drawn; up to `max_tries` times, if the
    current crop fails the rule a new offset is drawn; the last one drawn is used when none passed (so at most
    `max_tries + 1` draws). `cat_max_ratio >= 1` disables the rule (one draw).
    """
    offset = _crop_bbox(label.shape, crop_size, rng)
    if cat_max_ratio >= 1.0:
        return offset
    for _ in range(max_tries):
        y, x = offset
        crop = label[y : y + crop_size[0], x : x + crop_size[1]]
        counts = np.bincount(crop.ravel().astype(np.int64), minlength=ignore_index + 1)
        counts[ignore_index] = 0
        counts = counts[counts > 0]
        if counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        offset = _crop_bbox(label.shape, crop_size, rng)
    return offset


def _pair(name: str, value: Any, kind: type = int) -> tuple[Any, Any]:
    if not isinstance(value, Sequence) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"`{name}` must be a pair of numbers, got {value!r}.")
    pair = (kind(value[0]), kind(value[1]))
    if min(pair) <= 0:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")
    return pair


class SegmentationAugmentation:
    """The ADE20K training augmentation of VPD (mmsegmentation 0.x), applied identically to image and label.

    Args:
        crop_size: `(h, w)` of the crop and of the padded output (512, 512).
        img_scale: mmseg `Resize.img_scale` `(long, short)` = (2048, 512): before cropping, the image is rescaled,
            keeping its aspect ratio, to fit inside `(long * r, short * r)` with r ~ U[ratio_range].
        ratio_range: `(low, high)` of r, (0.5, 2.0).
        cat_max_ratio: crop rule (see :func:`random_crop_with_cat_max_ratio`), 0.75.
        flip_prob: probability of a horizontal flip, 0.5.
        photometric: apply :func:`photometric_distortion` (True).
        ignore_index: label of ignored pixels and of the label padding (255).

    Call with a uint8 RGB `(H, W, 3)` image, its `(H, W)` integer label map (already reduced: 255 = ignore) and the
    sample's generator; returns `pixel_values` float32 `(3, *crop_size)` in [-1, 1] (0 on padding) and `labels` int64
    `crop_size` (`ignore_index` on padding). Random draws, in mmseg's order: ratio, crop offsets, flip, photometric.
    """

    def __init__(
        self,
        crop_size: tuple[int, int] = (512, 512),
        img_scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.crop_size = _pair("crop_size", crop_size)
        self.img_scale = _pair("img_scale", img_scale)
        self.ratio_range = _pair("ratio_range", ratio_range, float)
        if self.ratio_range[0] > self.ratio_range[1]:
            raise ValueError(f"`ratio_range` must be (low, high) with low <= high, got {ratio_range!r}.")
        if not isinstance(cat_max_ratio, (int, float)) or not cat_max_ratio > 0:
            raise ValueError(f"`cat_max_ratio` must be a positive number (>= 1 disables it), got {cat_max_ratio!r}.")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"`flip_prob` must be in [0, 1], got {flip_prob!r}.")
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = bool(photometric)
        self.ignore_index = int(ignore_index)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ.")
        # Resize (mmseg `Resize(ratio_range=...)` with keep_ratio): scale = (long * r, short * r), truncated to int.
        low, high = self.ratio_range
        ratio = rng.random() * (high - low) + low
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        size = rescale_size(image.shape[0], image.shape[1], scale)
        image, label = resize_bilinear(image, size), resize_nearest(label, size)
        # RandomCrop with the cat_max_ratio rule; a crop larger than the image keeps the whole image (padded below).
        y, x = random_crop_with_cat_max_ratio(label, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
        image = image[y : y + self.crop_size[0], x : x + self.crop_size[1]]
        label = label[y : y + self.crop_size[0], x : x + self.crop_size[1]]
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        # Normalize, then Pad(size=crop_size): image padded with 0 in the normalised space, label with 255.
        pixel_values = normalize_image(np.ascontiguousarray(image))
        labels = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        pad_h, pad_w = self.crop_size[0] - labels.shape[0], self.crop_size[1] - labels.shape[1]
        if pad_h or pad_w:
            pixel_values = torch.nn.functional.pad(pixel_values, (0, pad_w, 0, pad_h), value=0.0)
            labels = torch.nn.functional.pad(labels, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return pixel_values, labels


# --------------------------------------------------------------------------------------------------------------------
# Depth (official VPD / GLPDepth NYUv2 training)
# --------------------------------------------------------------------------------------------------------------------

CUTDEPTH_RENDERS = ("official", "linear")


class DepthAugmentation:
    """The NYUv2 training augmentation of VPD (`depth/dataset/base_dataset.py`, from GLPDepth).

    1. **CutDepth** on samples whose index is a multiple of 4 (the official code counts samples per dataset copy,
       i.e. per DataLoader worker; the per-sample index makes it independent of the worker count): with
       `alpha, beta ~ U[0, 1)` and `p = 0.75`, the columns `[l, l + w)` with `l = int(alpha * W)` and
       `w = int(max((W - alpha * W) * beta * p, 1))` of all three RGB channels are replaced by the depth map
       (`W` = width of the full image: CutDepth runs before the crop).
       How the depth is "rendered" into the uint8 image (`cutdepth_render`):

       * `"official"` (default, faithful): the official code assigns the float depth **in millimetres** (NYU PNGs are
         divided by 1000 only later) to the uint8 image, which NumPy casts by wrapping: the grey value is
         `floor(depth_mm) mod 256`, a saw-tooth that repeats every 25.6 cm. This is reproduced exactly.
       * `"linear"`: `255 * clip(depth / max_depth, 0, 1)`, the intent of the CutDepth paper (a depth image in the
         range of the RGB values).

    2. albumentations `Compose([HorizontalFlip(), RandomCrop(*crop_size), RandomBrightnessContrast(), RandomGamma(),
       HueSaturationValue()])` with their default parameters (p = 0.5 each), the depth map passed as a `mask` target so
       that the flip and the crop move it with the image. Images smaller than the crop are padded at the bottom/right
       (image 0, depth 0 = invalid) instead of failing as the official code would.

    Args:
        crop_size: `(h, w)` of the random crop, (480, 480).
        cutdepth: apply CutDepth on every 4th sample (True).
        cutdepth_p: the width factor `p` (0.75).
        cutdepth_render: `"official"` or `"linear"` (see above).
        max_depth: metres mapped to 255 by the `"linear"` rendering (10.0).

    Call with a uint8 RGB `(H, W, 3)` image, a float32 `(H, W)` depth map in metres, the sample's generator and its
    index; returns the augmented uint8 image `(h, w, 3)` and float32 depth `(h, w)`. Random draws: `alpha`, `beta`
    (always drawn), then one seed per albumentations transform.
    """

    def __init__(
        self,
        crop_size: tuple[int, int] = (480, 480),
        cutdepth: bool = True,
        cutdepth_p: float = 0.75,
        cutdepth_render: str = "official",
        max_depth: float = 10.0,
    ) -> None:
        self.crop_size = _pair("crop_size", crop_size)
        if not 0.0 <= cutdepth_p <= 1.0:
            raise ValueError(f"`cutdepth_p` must be in [0, 1], got {cutdepth_p!r}.")
        if cutdepth_render not in CUTDEPTH_RENDERS:
            raise ValueError(f"`cutdepth_render` must be one of {CUTDEPTH_RENDERS}, got {cutdepth_render!r}.")
        if not max_depth > 0:
            raise ValueError(f"`max_depth` must be positive, got {max_depth!r}.")
        self.cutdepth, self.cutdepth_p, self.cutdepth_render = bool(cutdepth), float(cutdepth_p), cutdepth_render
        self.max_depth = float(max_depth)
        self._compose: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_compose"] = None  # rebuilt on first use in the worker
        return state

    @property
    def compose(self) -> Any:
        """The albumentations pipeline (built on first use)."""
        if self._compose is None:
            A = _import_albumentations()
            transforms = [
                A.HorizontalFlip(),
                A.RandomCrop(*self.crop_size, pad_if_needed=True, pad_position="top_left", fill=0, fill_mask=0),
                A.RandomBrightnessContrast(),
                A.RandomGamma(),
                A.HueSaturationValue(),
            ]
            self._compose = A.Compose(transforms, additional_targets={"depth": "mask"}, save_applied_params=True)
        return self._compose

    def render_depth(self, depth: np.ndarray) -> np.ndarray:
        """Depth in metres `(H, w)` -> uint8 grey values, per `cutdepth_render`."""
        if self.cutdepth_render == "official":
            # +1 micrometre: depth read from millimetre PNGs (k * 0.001 in float32) must floor back to k exactly.
            millimetres = np.floor(depth.astype(np.float64) * 1000.0 + 1e-3).astype(np.int64)
            return (millimetres % 256).astype(np.uint8)
        return (np.clip(depth / self.max_depth, 0.0, 1.0) * 255.0).astype(np.uint8)

    def cutdepth_strip(self, width: int, alpha: float, beta: float) -> tuple[int, int]:
        """`(left, strip_width)` of the CutDepth strip of an image `width` pixels wide."""
        left = int(alpha * width)
        return left, int(max((width - alpha * width) * beta * self.cutdepth_p, 1))

    def __call__(
        self, image: np.ndarray, depth: np.ndarray, rng: np.random.Generator, index: int, *, return_params: bool = False
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if image.shape[:2] != depth.shape:
            raise ValueError(f"image {image.shape[:2]} and depth {depth.shape} sizes differ.")
        alpha, beta = float(rng.random()), float(rng.random())
        params: dict[str, Any] = {"cutdepth": None}
        if self.cutdepth and index % 4 == 0:
            left, width = self.cutdepth_strip(image.shape[1], alpha, beta)
            image = image.copy()
            image[:, left : left + width, :] = self.render_depth(depth[:, left : left + width])[:, :, None]
            params["cutdepth"] = (left, width)
        compose = self.compose
        seeds = rng.integers(0, 2**32, size=len(compose.transforms) + 1)
        compose.set_random_seed(int(seeds[0]))
        for transform, seed in zip(compose.transforms, seeds[1:], strict=True):
            transform.set_random_seed(int(seed))
        out = compose(image=np.ascontiguousarray(image), depth=np.ascontiguousarray(depth, dtype=np.float32))
        if return_params:
            params["applied"] = dict(out.get("applied_transforms", []))
            return out["image"], out["depth"], params
        return out["image"], out["depth"]


# --------------------------------------------------------------------------------------------------------------------
# Referring (LAVT protocol)
# --------------------------------------------------------------------------------------------------------------------


def resize_referring(image: Image.Image, mask: np.ndarray, size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """LAVT/VPD referring transform: image and mask resized to `size x size` (aspect ratio not kept; PIL bilinear for
    the image as torchvision's `resize` of a PIL image, nearest for the mask), no flip, no photometric change.

    Returns `pixel_values` float32 `(3, size, size)` in [-1, 1] and `labels` int64 `(size, size)` in {0, 1}.
    """
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask {mask.shape} and image {(image.height, image.width)} sizes differ.")
    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    mask_image = Image.fromarray((mask != 0).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    return normalize_image(np.asarray(rgb)), torch.from_numpy(np.asarray(mask_image).astype(np.int64))


# --------------------------------------------------------------------------------------------------------------------
# Adapter plumbing: decoding, validation, the lazy index dataset, epochs
# --------------------------------------------------------------------------------------------------------------------


class InvalidRowError(ValueError):
    """A row that cannot be turned into a sample (unreadable image, wrong mode, out-of-range value...)."""


def open_image(value: Any, column: str, row: int) -> Image.Image:
    """Decodes a cell of an image column (a PIL image, a `{"bytes", "path"}` dict as stored by `datasets.Image`, a path
    or raw bytes) into a loaded PIL image; raises :class:`InvalidRowError` naming `column` and `row` if unreadable."""
    if isinstance(value, Image.Image):
        return value
    try:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            source: Any = io.BytesIO(data) if data is not None else path
        elif isinstance(value, (bytes, bytearray)):
            source = io.BytesIO(value)
        elif isinstance(value, (str, Path)):
            source = value
        else:
            raise InvalidRowError(f"row {row}: column {column!r} holds a {type(value).__name__}, not an image.")
        if source is None:
            raise InvalidRowError(f"row {row}: column {column!r} is empty (no bytes and no path).")
        image = Image.open(source)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InvalidRowError(f"row {row}: column {column!r} is not a readable image ({error}).") from error


def undecoded(dataset: datasets.Dataset, columns: Sequence[str]) -> datasets.Dataset:
    """`dataset` with the given `datasets.Image` columns left undecoded (raw bytes/paths), so that this module decodes
    them itself and can report (or skip) unreadable files row by row. Only the column metadata changes."""
    import datasets

    for column in columns:
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def check_columns(dataset: Any, required: dict[str, str]) -> None:
    """Raises `ValueError` naming the first missing column; `required` maps column names to what they should hold."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`dataset` must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    for column, meaning in required.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"Column {column!r} ({meaning}) is missing; the dataset has {dataset.column_names}. "
                "Pass the right column name to the adapter."
            )


def check_image_feature(dataset: datasets.Dataset, column: str) -> None:
    """Raises `ValueError` unless `column` is a `datasets.Image` feature."""
    import datasets

    feature = dataset.features[column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(f"Column {column!r} must be a `datasets.Image` feature, got {feature!r}.")


_RGB_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


def to_rgb_array(image: Image.Image, column: str, row: int) -> np.ndarray:
    """A decoded picture -> uint8 RGB `(H, W, 3)`; 8-bit modes only (a float or 16-bit image is most likely a depth
    map or a label in the wrong column, so it raises :class:`InvalidRowError`)."""
    if image.mode not in _RGB_MODES:
        raise InvalidRowError(
            f"row {row}: column {column!r} has mode {image.mode!r}, not an 8-bit picture (expected one of {_RGB_MODES})."
        )
    return np.asarray(image.convert("RGB"))


def _check_split(split: str) -> str:
    if split not in ("train", "eval"):
        raise ValueError(f"`split` must be 'train' or 'eval', got {split!r}.")
    return split


class AdapterTransform:
    """Base of the adapters' `with_transform` functions.

    The dataset an adapter returns is a light **index table** (column `__index__`: the row of the source dataset, and
    for referring evaluation `__sentence__`); this transform reads those rows from the source dataset lazily, decodes
    and validates them (:meth:`read_row`) and turns them into model inputs (:meth:`make_item`). Keeping the row index
    with each item is what makes the randomness depend on `(seed, epoch, index)` only -- it survives `shuffle`,
    `select`, DataLoader sampling and worker sharding -- and it avoids copying the source (an added column would
    rewrite it when it has an indices mapping, e.g. after `filter`).

    Attributes:
        source: the source dataset (image columns undecoded).
        split: "train" or "eval".
        seed, epoch: see :func:`sample_rng`; `epoch` is changed with :meth:`set_epoch` / :func:`set_epoch`.
        num_dropped, dropped_rows: rows removed by `skip_invalid` (0 / [] otherwise).
    """

    def __init__(self, source: datasets.Dataset, split: str, seed: int) -> None:
        self.source = source
        self.split = _check_split(split)
        self.seed = _check_non_negative_int("seed", seed)
        self.epoch = 0
        self.dropped_rows: list[int] = []

    @property
    def num_dropped(self) -> int:
        return len(self.dropped_rows)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the random draws (training augmentation, referring sentence choice)."""
        self.epoch = _check_non_negative_int("epoch", epoch)

    def rng(self, index: int) -> np.random.Generator:
        return sample_rng(self.seed, self.epoch, index)

    # -- to implement -------------------------------------------------------------------------------------------------

    def read_row(self, record: dict[str, Any], row: int) -> Any:
        """Decodes and validates one source row; raises :class:`InvalidRowError` when it is unusable."""
        raise NotImplementedError

    def make_item(self, sample: Any, row: int, extra: dict[str, Any]) -> dict[str, Any]:
        """One model input dict from a :meth:`read_row` result; `extra` holds the other index-table columns."""
        raise NotImplementedError

    # -- plumbing -----------------------------------------------------------------------------------------------------

    def _records(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        batch = self.source[list(rows)]
        return [{key: values[i] for key, values in batch.items()} for i in range(len(rows))]

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [int(r) for r in batch["__index__"]]
        extras = [{key: values[i] for key, values in batch.items() if key != "__index__"} for i in range(len(rows))]
        items = [
            self.make_item(self.read_row(record, row), row, extra)
            for record, row, extra in zip(self._records(rows), rows, extras, strict=True)
        ]
        return {key: [item[key] for item in items] for key in items[0]} if items else {}

    def valid_rows(self, progress: bool = True, batch_size: int = 64) -> list[int]:
        """Reads every source row once and returns the readable, valid ones; the others go to `dropped_rows`."""
        from tqdm.auto import tqdm

        valid: list[int] = []
        self.dropped_rows = []
        total = len(self.source)
        for start in tqdm(range(0, total, batch_size), desc="checking rows", unit="batch", disable=not progress):
            rows = list(range(start, min(start + batch_size, total)))
            for record, row in zip(self._records(rows), rows, strict=True):
                try:
                    self.read_row(record, row)
                except InvalidRowError as error:
                    self.dropped_rows.append(row)
                    logger.debug("dropping %s", error)
                else:
                    valid.append(row)
        return valid


def build_adapter_dataset(
    transform: AdapterTransform,
    *,
    name: str,
    skip_invalid: bool,
    expand: Callable[[list[int]], dict[str, list[Any]]] | None = None,
) -> datasets.Dataset:
    """The index table of `transform.source`, checked, with `transform` attached by `with_transform`.

    Without `skip_invalid` the first row is read (so a wrong mode or column content fails here, not in the middle of
    training) and any later bad row raises `ValueError` when it is fetched. With `skip_invalid` every row is read once
    up front and the bad ones are dropped: their number is logged, stored in `transform.dropped_rows` and written to
    the returned dataset's `info.description`. `expand(rows)` may return the index-table columns (e.g. one row per
    sentence); the default is `{"__index__": rows}`.
    """
    import datasets

    source = transform.source
    if len(source) == 0:
        raise ValueError(f"The {name} dataset is empty.")
    if skip_invalid:
        rows = transform.valid_rows()
        if transform.num_dropped:
            logger.warning(
                "%s: dropped %d of %d rows that could not be read or are invalid (rows %s%s).",
                name,
                transform.num_dropped,
                len(source),
                transform.dropped_rows[:10],
                "..." if transform.num_dropped > 10 else "",
            )
        if not rows:
            raise ValueError(f"Every row of the {name} dataset is invalid.")
    else:
        transform.read_row(transform._records([0])[0], 0)
        rows = list(range(len(source)))
    columns = expand(rows) if expand is not None else {"__index__": rows}
    description = (
        f"vpd_hf {name} adapter ({transform.split}) over {len(source)} source rows; "
        f"dropped {transform.num_dropped} invalid rows"
        + (f": {transform.dropped_rows}" if 0 < transform.num_dropped <= 100 else "")
        + "."
    )
    table = datasets.Dataset.from_dict(columns, info=datasets.DatasetInfo(description=description))
    return table.with_transform(transform)


def get_adapter_transform(dataset: datasets.Dataset) -> AdapterTransform:
    """The :class:`AdapterTransform` of a dataset returned by one of the adapters (also after `shuffle`/`select`)."""
    transform = (getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform")
    if not isinstance(transform, AdapterTransform):
        raise ValueError(
            "`dataset` was not returned by a vpd_hf adapter (depth_dataset, segmentation_dataset, referring_dataset) "
            "or its transform was replaced (e.g. by set_format / with_transform)."
        )
    return transform


def set_epoch(dataset: datasets.Dataset, epoch: int) -> None:
    """Sets the epoch of an adapter dataset's random draws; call it at the start of every training epoch."""
    get_adapter_transform(dataset).set_epoch(epoch)
