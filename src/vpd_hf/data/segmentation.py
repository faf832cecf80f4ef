"""Semantic segmentation data: a Hub-layout `datasets.Dataset` (ADE20K) -> VPD model inputs, lazily.

Input layout (`scene_parse_150`, the synthetic `scenes` config, `scripts/prepare_ade20k.py`): an RGB `image` column and
an `annotation` column, both `datasets.Image`, the annotation an integer image (mode "L"/"P"/"I;16"/"I") of class
indices with ADE20K's convention 0 = "other". With `reduce_labels` (default, `reduce_zero_label=True` in mmseg) 0
becomes 255 (ignored) and k becomes k - 1; a stored 255 always means "ignore".

Items (`segmentation_dataset(...)[i]`):

* train: `pixel_values` float32 `(3, 512, 512)` in [-1, 1] (0 on padding), `labels` int64 `(512, 512)` (reduced
  classes, 255 = ignore and padding), after the mmseg augmentation
  (:class:`~vpd_hf.data.augmentation.SegmentationAugmentation`);
* eval: `pixel_values` float32 `(3, h, w)`, the image resized as mmseg's test pipeline does (aspect ratio kept, short
  side 512 unless the long side would exceed 2048; bilinear, no padding) and `labels` int64 `(H, W)` at the
  **original** annotation size (reduced): metrics are computed at the original resolution.

Randomness depends on `(seed, epoch, row)` only: call `vpd_hf.data.set_epoch(dataset, epoch)` at the start of every
epoch (see :mod:`vpd_hf.data.augmentation`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..prompts import ADE20K_CLASS_NAMES
from .augmentation import (
    IGNORE_INDEX,
    AdapterTransform,
    InvalidRowError,
    SegmentationAugmentation,
    build_adapter_dataset,
    check_columns,
    check_image_feature,
    normalize_image,
    open_image,
    rescale_size,
    resize_bilinear,
    to_rgb_array,
    undecoded,
)

if TYPE_CHECKING:
    import datasets

__all__ = ["SegmentationTransform", "ade20k_id2label", "reduce_labels", "segmentation_dataset"]

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


def ade20k_id2label() -> dict[int, str]:
    """`{0: "wall", ..., 149: "flag"}`: the 150 ADE20K classes of the reduced labels (annotation value k + 1)."""
    return dict(enumerate(ADE20K_CLASS_NAMES))


def reduce_labels(label: np.ndarray) -> np.ndarray:
    """ADE20K label reduction: 0 ("other") -> 255, k -> k - 1, and 255 stays 255 (ignore). Returns uint8 when every
    value fits, int64 otherwise."""
    label = label.astype(np.int64)
    reduced = label - 1
    reduced[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return reduced.astype(np.uint8) if reduced.max(initial=0) <= 255 else reduced


def _label_array(image: Image.Image, column: str, row: int) -> np.ndarray:
    if image.mode not in _LABEL_MODES:
        raise InvalidRowError(
            f"row {row}: column {column!r} has mode {image.mode!r}; a label map must be a single-channel integer image "
            f"(one of {_LABEL_MODES})."
        )
    values = np.asarray(image)
    if values.ndim != 2:
        raise InvalidRowError(f"row {row}: column {column!r} is not a 2-D label map (shape {values.shape}).")
    return values


def checked_labels(label: np.ndarray, num_labels: int, reduce: bool, column: str, row: int) -> np.ndarray:
    """A stored label map checked against the class range (raises :class:`InvalidRowError` naming `column` and `row`)
    and, with `reduce`, reduced by :func:`reduce_labels`."""
    # Largest valid stored value: num_labels with reduction (1..num_labels are classes), num_labels - 1 without.
    top = num_labels if reduce else num_labels - 1
    values = np.unique(label)
    bad = values[((values < 0) | (values > top)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise InvalidRowError(
            f"row {row}: column {column!r} holds labels {bad[:10].tolist()} outside [0, {top}] "
            f"(num_labels={num_labels}, reduce_labels={reduce}; 255 = ignore)."
        )
    return reduce_labels(label) if reduce else label


class SegmentationTransform(AdapterTransform):
    """The transform of :func:`segmentation_dataset` (see the module docstring for the item format)."""

    def __init__(
        self,
        source: datasets.Dataset,
        split: str,
        *,
        image_column: str,
        label_column: str,
        reduce_labels: bool,
        num_labels: int,
        crop_size: tuple[int, int],
        img_scale: tuple[int, int],
        ratio_range: tuple[float, float],
        cat_max_ratio: float,
        seed: int,
    ) -> None:
        super().__init__(source, split, seed)
        self.image_column, self.label_column = image_column, label_column
        self.reduce_labels, self.num_labels = bool(reduce_labels), int(num_labels)
        # Built for both splits: it validates crop_size / img_scale / ratio_range / cat_max_ratio.
        self.augmentation = SegmentationAugmentation(
            crop_size=crop_size, img_scale=img_scale, ratio_range=ratio_range, cat_max_ratio=cat_max_ratio
        )
        self.img_scale = self.augmentation.img_scale

    def read_row(self, record: dict[str, Any], row: int) -> tuple[np.ndarray, np.ndarray]:
        image = to_rgb_array(open_image(record[self.image_column], self.image_column, row), self.image_column, row)
        label = _label_array(open_image(record[self.label_column], self.label_column, row), self.label_column, row)
        if label.shape != image.shape[:2]:
            raise InvalidRowError(
                f"row {row}: image {image.shape[:2]} and label map {label.shape} have different sizes (H, W)."
            )
        return image, checked_labels(label, self.num_labels, self.reduce_labels, self.label_column, row)

    def make_item(self, sample: tuple[np.ndarray, np.ndarray], row: int, extra: dict[str, Any]) -> dict[str, Any]:
        image, label = sample
        if self.split == "train":
            pixel_values, labels = self.augmentation(image, label, self.rng(row))
            return {"pixel_values": pixel_values, "labels": labels}
        size = rescale_size(image.shape[0], image.shape[1], self.img_scale)
        return {
            "pixel_values": normalize_image(resize_bilinear(image, size)),
            "labels": torch.from_numpy(label.astype(np.int64)),
        }


def segmentation_dataset(
    dataset: datasets.Dataset,
    split: str,
    *,
    image_column: str = "image",
    label_column: str = "annotation",
    reduce_labels: bool = True,
    crop_size: tuple[int, int] = (512, 512),
    img_scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    seed: int = 0,
    skip_invalid: bool = False,
    num_labels: int = 150,
) -> datasets.Dataset:
    """Semantic-segmentation inputs from a Hub-layout dataset, computed lazily on access (`Dataset.with_transform`).

    Args:
        dataset: one split with an RGB image column and an integer label-map column (see the module docstring).
        split: `"train"` (mmseg augmentation, `crop_size` outputs) or `"eval"` (test resize, original-size labels).
        image_column, label_column: column names.
        reduce_labels: 0 -> 255 (ignore), k -> k - 1 (ADE20K's 0 = "other").
        crop_size, img_scale, ratio_range, cat_max_ratio: the augmentation (see
            :class:`~vpd_hf.data.augmentation.SegmentationAugmentation`); `img_scale` is also the eval resize.
        seed: base seed of the augmentation.
        skip_invalid: read every row once up front and drop unreadable / invalid rows (logged; see
            `get_adapter_transform(result).dropped_rows` and `result.info.description`) instead of raising.
        num_labels: number of classes (150 for ADE20K): stored labels must be in [0, num_labels] with
            `reduce_labels` ([0, num_labels - 1] without), or 255.

    Returns:
        A `datasets.Dataset` (an index table over `dataset`) whose items are dicts with `pixel_values` and `labels`.

    Raises:
        ValueError: a missing column, a column that is not an image, a first row (with `skip_invalid`: every row)
            that is unreadable or invalid (RGB/float label map, out-of-range label, sizes differ), or bad arguments.
            Later invalid rows raise `ValueError` when fetched unless `skip_invalid`.
    """
    check_columns(dataset, {image_column: "RGB images", label_column: "label maps"})
    check_image_feature(dataset, image_column)
    check_image_feature(dataset, label_column)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or not 1 <= num_labels <= 255:
        raise ValueError(f"`num_labels` must be an integer in [1, 255], got {num_labels!r}.")
    source = undecoded(dataset.select_columns([image_column, label_column]), [image_column, label_column])
    transform = SegmentationTransform(
        source,
        split,
        image_column=image_column,
        label_column=label_column,
        reduce_labels=reduce_labels,
        num_labels=num_labels,
        crop_size=crop_size,
        img_scale=img_scale,
        ratio_range=ratio_range,
        cat_max_ratio=cat_max_ratio,
        seed=seed,
    )
    return build_adapter_dataset(transform, name="segmentation", skip_invalid=skip_invalid)
