"""Depth estimation data: a Hub-layout `datasets.Dataset` (NYUv2) -> VPD model inputs, lazily.

Input layout: one row per image with an RGB `image` column and a `depth_map` column, both `datasets.Image`:

* `sayakpaul/nyu_depth_v2`, the synthetic `scenes` config and `scripts/prepare_nyu.py`: mode "F" depth in metres;
* the BTS layout: 16-bit PNG depth in millimetres (modes "I;16"/"I").

The depth unit is read from the image mode (`depth_scale`, metres per stored unit: 1.0 for float images, 1/1000 for
integer images) unless given. An optional `scene_column` (scene names or file paths) gives each image its NYUv2 scene
index for the depth model's scene prompt, with the official rule (:func:`nyu_scene_id`).

Items (`depth_dataset(...)[i]`):

* `pixel_values`: float32 `(3, h, w)` in [-1, 1];
* `labels`: float32 `(h, w)` depth in metres, 0 = invalid (values outside `(min_depth, max_depth)` and padding);
* `scene_ids`: int64 `()` index into `scene_names`, -1 = unknown.

Train: the official augmentation (:class:`~vpd_hf.data.augmentation.DepthAugmentation`: CutDepth on every 4th row, flip,
`crop_size` random crop, albumentations photometric transforms), so `(h, w) = crop_size`; eval: the full image,
unchanged. Randomness depends on `(seed, epoch, row)` only: call `vpd_hf.data.set_epoch(dataset, epoch)` at the start
of every epoch (see :mod:`vpd_hf.data.augmentation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..prompts import NYU_SCENE_NAMES
from .augmentation import (
    AdapterTransform,
    DepthAugmentation,
    InvalidRowError,
    build_adapter_dataset,
    check_columns,
    check_image_feature,
    normalize_image,
    open_image,
    to_rgb_array,
    undecoded,
)

if TYPE_CHECKING:
    import datasets

__all__ = ["DepthTransform", "depth_dataset", "nyu_scene_id"]

_FLOAT_MODES = ("F",)
_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def nyu_scene_id(text: str | None, scene_names: Sequence[str] = NYU_SCENE_NAMES) -> int:
    """Index of the scene of an image from its scene name or path, with the official VPD rule: the first name of
    `scene_names` (in order) that is a substring of `text` wins, so `"study_room_0001"` is `"study"` and
    `"office_kitchen_0003"` is `"kitchen"` (as in the released code). `text` is lower-cased and its spaces read as
    underscores first. Returns -1 for `None`, an empty string or no match."""
    if not text:
        return -1
    text = str(text).lower().replace(" ", "_")
    for index, name in enumerate(scene_names):
        if name in text:
            return index
    return -1


def _depth_array(image: Image.Image, column: str, row: int, depth_scale: float | None) -> np.ndarray:
    """A decoded depth image -> float32 `(H, W)` metres; raises :class:`InvalidRowError` on a wrong mode or values."""
    if image.mode in _FLOAT_MODES:
        values, scale = np.asarray(image, dtype=np.float32), 1.0
    elif image.mode in _INTEGER_MODES:
        values, scale = np.asarray(image).astype(np.float32), 1e-3
    else:
        raise InvalidRowError(
            f"row {row}: column {column!r} has mode {image.mode!r}; a depth map must be a float image (mode 'F', "
            "metres) or a 16-bit integer image (modes 'I;16'/'I', millimetres by default)."
        )
    if not np.isfinite(values).all():
        raise InvalidRowError(f"row {row}: column {column!r} holds NaN or infinite depth values.")
    if values.size and values.min() < 0:
        raise InvalidRowError(f"row {row}: column {column!r} holds negative depth values (min {values.min():.4g}).")
    return values * np.float32(scale if depth_scale is None else depth_scale)


class DepthTransform(AdapterTransform):
    """The transform of :func:`depth_dataset` (see the module docstring for the item format)."""

    def __init__(
        self,
        source: datasets.Dataset,
        split: str,
        *,
        image_column: str,
        depth_column: str,
        scene_column: str | None,
        scene_names: Sequence[str],
        crop_size: tuple[int, int],
        min_depth: float,
        max_depth: float,
        seed: int,
        depth_scale: float | None,
        cutdepth_render: str,
    ) -> None:
        super().__init__(source, split, seed)
        self.image_column, self.depth_column, self.scene_column = image_column, depth_column, scene_column
        self.scene_names = tuple(scene_names)
        self.min_depth, self.max_depth, self.depth_scale = float(min_depth), float(max_depth), depth_scale
        self.augmentation = (
            DepthAugmentation(crop_size=crop_size, cutdepth_render=cutdepth_render, max_depth=max_depth)
            if split == "train"
            else None
        )

    def read_row(self, record: dict[str, Any], row: int) -> tuple[np.ndarray, np.ndarray, int]:
        image = to_rgb_array(open_image(record[self.image_column], self.image_column, row), self.image_column, row)
        depth = _depth_array(
            open_image(record[self.depth_column], self.depth_column, row), self.depth_column, row, self.depth_scale
        )
        if depth.shape != image.shape[:2]:
            raise InvalidRowError(
                f"row {row}: image {image.shape[:2]} and depth map {depth.shape} have different sizes (H, W)."
            )
        scene = record.get(self.scene_column) if self.scene_column is not None else None
        if scene is not None and not isinstance(scene, str):
            raise InvalidRowError(f"row {row}: column {self.scene_column!r} must hold strings, got {scene!r}.")
        return image, depth, nyu_scene_id(scene, self.scene_names)

    def make_item(self, sample: tuple[np.ndarray, np.ndarray, int], row: int, extra: dict[str, Any]) -> dict[str, Any]:
        image, depth, scene_id = sample
        if self.augmentation is not None:
            image, depth = self.augmentation(image, depth, self.rng(row), row)
        labels = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))
        labels = torch.where((labels > self.min_depth) & (labels < self.max_depth), labels, torch.zeros(()))
        return {
            "pixel_values": normalize_image(image),
            "labels": labels,
            "scene_ids": torch.tensor(scene_id, dtype=torch.long),
        }


def depth_dataset(
    dataset: datasets.Dataset,
    split: str,
    *,
    image_column: str = "image",
    depth_column: str = "depth_map",
    scene_column: str | None = None,
    scene_names: Sequence[str] = NYU_SCENE_NAMES,
    crop_size: tuple[int, int] = (480, 480),
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    seed: int = 0,
    skip_invalid: bool = False,
    depth_scale: float | None = None,
    cutdepth_render: str = "official",
) -> datasets.Dataset:
    """Depth-estimation inputs from a Hub-layout dataset, computed lazily on access (`Dataset.with_transform`).

    Args:
        dataset: one split, with an RGB image column and a depth image column (see the module docstring).
        split: `"train"` (official augmentation, `crop_size` crops) or `"eval"` (full images, unchanged).
        image_column, depth_column: column names.
        scene_column: optional column of scene names or paths (e.g. the BTS folder name); None: every `scene_ids` is -1.
        scene_names: the scene list the ids index (default: the 27 NYUv2 names in the official order).
        crop_size: `(h, w)` of the training crops.
        min_depth, max_depth: valid depth range in metres (exclusive); other values become 0 (invalid).
        seed: base seed of the augmentation (see :func:`vpd_hf.data.augmentation.sample_rng`).
        skip_invalid: read every row once up front and drop unreadable / invalid ones (logged; the count is in
            `get_adapter_transform(result).dropped_rows` and `result.info.description`) instead of raising.
        depth_scale: metres per stored depth unit; default 1.0 for float images and 1/1000 for integer ones.
        cutdepth_render: how CutDepth writes depth into the RGB strip, `"official"` or `"linear"` (see
            :class:`~vpd_hf.data.augmentation.DepthAugmentation`).

    Returns:
        A `datasets.Dataset` (an index table over `dataset`) whose items are dicts of tensors `pixel_values`, `labels`,
        `scene_ids`.

    Raises:
        ValueError: a missing column, a column that is not an image, a first row (or with `skip_invalid`, every row)
            that is unreadable or invalid (wrong mode, negative or non-finite depth, image/depth sizes differ), or
            bad arguments. Later invalid rows raise `ValueError` when fetched unless `skip_invalid`.
    """
    required = {image_column: "RGB images", depth_column: "depth maps"}
    if scene_column is not None:
        required[scene_column] = "scene names or paths"
    check_columns(dataset, required)
    check_image_feature(dataset, image_column)
    check_image_feature(dataset, depth_column)
    if not 0 <= min_depth < max_depth:
        raise ValueError(f"Need 0 <= `min_depth` < `max_depth`, got {min_depth!r} and {max_depth!r}.")
    if depth_scale is not None and not depth_scale > 0:
        raise ValueError(f"`depth_scale` must be positive (metres per stored unit) or None, got {depth_scale!r}.")
    if isinstance(scene_names, str) or not scene_names or not all(isinstance(n, str) and n for n in scene_names):
        raise ValueError(f"`scene_names` must be a non-empty list of non-empty strings, got {scene_names!r}.")
    columns = [image_column, depth_column] + ([scene_column] if scene_column is not None else [])
    source = undecoded(dataset.select_columns(columns), [image_column, depth_column])
    transform = DepthTransform(
        source,
        split,
        image_column=image_column,
        depth_column=depth_column,
        scene_column=scene_column,
        scene_names=scene_names,
        crop_size=crop_size,
        min_depth=min_depth,
        max_depth=max_depth,
        seed=seed,
        depth_scale=depth_scale,
        cutdepth_render=cutdepth_render,
    )
    return build_adapter_dataset(transform, name="depth", skip_invalid=skip_invalid)
