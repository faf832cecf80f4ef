"""Dense multi-task and surface-normal data: a Hub-layout `datasets.Dataset` with any of a depth, a semantic-label and
a surface-normal column -> VPD model inputs, lazily.

Input layout: one row per image, an RGB `image` column and, per task, a `datasets.Image` column in the layout of its
single-task adapter: `depth_map` (as :func:`~vpd_hf.data.depth.depth_dataset`: mode "F" metres or 16-bit millimetres),
`annotation` (as :func:`~vpd_hf.data.segmentation.segmentation_dataset`: ADE-style 0 = "other", reduced to 255),
`normal_map` (NYUv2 normals layout, :mod:`vpd_hf.data.normals`: 8-bit RGB, Marigold's camera frame, (0, 0, 0) =
invalid). The synthetic `scenes` config has all three; `scripts/prepare_nyu.py --normals-dir` adds `normal_map` to
NYUv2. **Mixed labels**: a cell that is None (the image has no label of that task) gives an all-invalid label (depth
0, class 255, normal (0, 0, 0)), so datasets where only some images carry some labels batch together; such pixels
add nothing to their task's loss.

Items (`dense_dataset(...)[i]`): `pixel_values` float32 `(3, h, w)` in [-1, 1] and, for each task asked for,
`depth_labels` float32 `(h, w)` (metres, 0 = invalid: outside `(min_depth, max_depth)`), `segmentation_labels` int64
`(h, w)` (255 = ignore), `normal_labels` float32 `(3, h, w)` (unit vectors, 0 = invalid). :func:`normals_dataset` is
the normals-only case with the label under `labels`, like the single-task adapters.

Train: :class:`DenseAugmentation` -- one geometric draw for every label (a horizontal flip, which also negates the
normals' x component, and a `crop_size` random crop, padded when the image is smaller), then mmseg's photometric
distortion of the picture. CutDepth (the depth recipe's) is left out: it pastes depth into the RGB input, which would
corrupt the other tasks' inputs. Eval: the full image, unchanged. Randomness depends on `(seed, epoch, row)` only
(:func:`vpd_hf.data.set_epoch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .augmentation import (
    IGNORE_INDEX,
    AdapterTransform,
    InvalidRowError,
    _pair,
    build_adapter_dataset,
    check_columns,
    check_image_feature,
    normalize_image,
    open_image,
    photometric_distortion,
    to_rgb_array,
    undecoded,
)
from .depth import _depth_array
from .normals import NORMAL_CONVENTIONS, decode_normals
from .segmentation import _label_array, checked_labels

if TYPE_CHECKING:
    import datasets

__all__ = ["DENSE_TASKS", "DenseAugmentation", "DenseTransform", "dense_dataset", "normals_dataset"]

DENSE_TASKS = ("depth", "segmentation", "normals")
LABEL_KEYS = {"depth": "depth_labels", "segmentation": "segmentation_labels", "normals": "normal_labels"}
# Fill value of padding and of missing labels, per task: invalid depth, ignored class, invalid (zero) normal.
_INVALID = {"depth": 0.0, "segmentation": IGNORE_INDEX, "normals": 0.0}


class DenseAugmentation:
    """Training augmentation shared by all dense labels of an image (see the module docstring).

    Args:
        crop_size: `(h, w)` of the random crop (and of the padded output).
        flip_prob: probability of the horizontal flip (0.5).
        photometric: apply :func:`~vpd_hf.data.augmentation.photometric_distortion` to the picture (True).

    Call with a uint8 RGB `(H, W, 3)` image, a dict of labels (`"depth"` float32 `(H, W)`, `"segmentation"` integer
    `(H, W)`, `"normals"` float32 `(H, W, 3)`) and the sample's generator; returns `pixel_values` float32
    `(3, *crop_size)` (0 on padding) and the labels cropped, flipped and padded with their invalid value. Draws, in
    order: flip, crop offsets, photometric.
    """

    def __init__(self, crop_size: tuple[int, int], flip_prob: float = 0.5, photometric: bool = True) -> None:
        self.crop_size = _pair("crop_size", crop_size)
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"`flip_prob` must be in [0, 1], got {flip_prob!r}.")
        self.flip_prob, self.photometric = float(flip_prob), bool(photometric)

    def __call__(
        self, image: np.ndarray, labels: dict[str, np.ndarray], rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        for task, label in labels.items():
            if label.shape[:2] != image.shape[:2]:
                raise ValueError(f"image {image.shape[:2]} and {task} label {label.shape[:2]} sizes differ.")
        if rng.random() < self.flip_prob:
            image = image[:, ::-1]
            labels = {task: label[:, ::-1] for task, label in labels.items()}
            if "normals" in labels:  # a mirrored surface faces the mirrored way: x changes sign
                labels["normals"] = labels["normals"] * np.array([-1.0, 1.0, 1.0], dtype=np.float32)
        height, width = self.crop_size
        y = int(rng.integers(0, max(image.shape[0] - height, 0) + 1))
        x = int(rng.integers(0, max(image.shape[1] - width, 0) + 1))
        image = image[y : y + height, x : x + width]
        labels = {task: label[y : y + height, x : x + width] for task, label in labels.items()}
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        pixel_values = normalize_image(np.ascontiguousarray(image))
        pad_h, pad_w = height - image.shape[0], width - image.shape[1]
        if pad_h or pad_w:
            pixel_values = torch.nn.functional.pad(pixel_values, (0, pad_w, 0, pad_h), value=0.0)
            labels = {
                task: np.pad(
                    label, ((0, pad_h), (0, pad_w)) + ((0, 0),) * (label.ndim - 2), constant_values=_INVALID[task]
                )
                for task, label in labels.items()
            }
        return pixel_values, labels


class DenseTransform(AdapterTransform):
    """The transform of :func:`dense_dataset` / :func:`normals_dataset` (see the module docstring)."""

    def __init__(
        self,
        source: datasets.Dataset,
        split: str,
        *,
        image_column: str,
        columns: dict[str, str],
        keys: dict[str, str],
        min_depth: float,
        max_depth: float,
        num_labels: int,
        reduce_labels: bool,
        normal_convention: str,
        crop_size: tuple[int, int],
        seed: int,
    ) -> None:
        super().__init__(source, split, seed)
        self.image_column, self.columns, self.keys = image_column, dict(columns), dict(keys)
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.num_labels, self.reduce_labels, self.normal_convention = (
            int(num_labels),
            bool(reduce_labels),
            normal_convention,
        )
        self.augmentation = DenseAugmentation(crop_size)

    def read_label(self, task: str, value: Any, shape: tuple[int, int], row: int) -> np.ndarray:
        column = self.columns[task]
        if value is None:  # this image has no label of this task (mixed-label datasets)
            return np.full(
                shape + ((3,) if task == "normals" else ()),
                _INVALID[task],
                dtype=np.float32 if task != "segmentation" else np.uint8,
            )
        image = open_image(value, column, row)
        if task == "depth":
            label = _depth_array(image, column, row, None)
        elif task == "segmentation":
            label = checked_labels(_label_array(image, column, row), self.num_labels, self.reduce_labels, column, row)
        else:
            if image.mode != "RGB":
                raise InvalidRowError(
                    f"row {row}: column {column!r} has mode {image.mode!r}; a normal map is 8-bit RGB."
                )
            label = decode_normals(np.asarray(image), self.normal_convention)
        if label.shape[:2] != shape:
            raise InvalidRowError(f"row {row}: image {shape} and {task} label {label.shape[:2]} have different sizes.")
        return label

    def read_row(self, record: dict[str, Any], row: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        image = to_rgb_array(open_image(record[self.image_column], self.image_column, row), self.image_column, row)
        labels = {
            task: self.read_label(task, record[column], image.shape[:2], row) for task, column in self.columns.items()
        }
        return image, labels

    def make_item(
        self, sample: tuple[np.ndarray, dict[str, np.ndarray]], row: int, extra: dict[str, Any]
    ) -> dict[str, Any]:
        image, labels = sample
        if self.split == "train":
            pixel_values, labels = self.augmentation(image, labels, self.rng(row))
        else:
            pixel_values = normalize_image(image)
        item = {"pixel_values": pixel_values}
        for task, label in labels.items():
            label = np.ascontiguousarray(label)
            if task == "depth":
                depth = torch.from_numpy(label.astype(np.float32))
                value = torch.where((depth > self.min_depth) & (depth < self.max_depth), depth, torch.zeros(()))
            elif task == "segmentation":
                value = torch.from_numpy(label.astype(np.int64))
            else:
                value = torch.from_numpy(label.astype(np.float32)).permute(2, 0, 1).contiguous()
            item[self.keys[task]] = value
        return item


def dense_dataset(
    dataset: datasets.Dataset,
    split: str,
    *,
    tasks: Sequence[str] = DENSE_TASKS,
    image_column: str = "image",
    depth_column: str = "depth_map",
    label_column: str = "annotation",
    normal_column: str = "normal_map",
    crop_size: tuple[int, int] = (480, 480),
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    num_labels: int = 150,
    reduce_labels: bool = True,
    normal_convention: str = "marigold",
    seed: int = 0,
    skip_invalid: bool = False,
) -> datasets.Dataset:
    """Multi-task dense inputs (any of depth, segmentation, normals) from one dataset, lazily (`with_transform`).

    Args:
        dataset: one split with an RGB image column and the label column of every task in `tasks`.
        split: `"train"` (:class:`DenseAugmentation`, `crop_size` outputs) or `"eval"` (full images).
        tasks: a non-empty subset of :data:`DENSE_TASKS`.
        image_column, depth_column, label_column, normal_column: column names.
        crop_size: `(h, w)` of the training crops.
        min_depth, max_depth: valid depth range in metres (exclusive); other values become 0 (invalid).
        num_labels, reduce_labels: the segmentation labels (as :func:`~vpd_hf.data.segmentation.segmentation_dataset`).
        normal_convention: frame the normal maps are stored in (:data:`~vpd_hf.data.normals.NORMAL_CONVENTIONS`);
            labels are returned in Marigold's frame.
        seed: base seed of the augmentation.
        skip_invalid: read every row once up front and drop unreadable / invalid rows instead of raising.

    Returns:
        A `datasets.Dataset` (an index table over `dataset`) whose items are dicts with `pixel_values` and one
        `{task}_labels` tensor per task (see the module docstring).

    Raises:
        ValueError: unknown or repeated tasks, a missing column, a column that is not an image, a bad first row (with
            `skip_invalid`: every row), or bad arguments.
    """
    tasks = _check_tasks(tasks)
    columns = {"depth": depth_column, "segmentation": label_column, "normals": normal_column}
    return _build(dataset, split, {t: columns[t] for t in tasks}, {t: LABEL_KEYS[t] for t in tasks}, image_column,
                  crop_size, min_depth, max_depth, num_labels, reduce_labels, normal_convention, seed, skip_invalid)  # fmt: skip


def normals_dataset(
    dataset: datasets.Dataset,
    split: str,
    *,
    image_column: str = "image",
    normal_column: str = "normal_map",
    crop_size: tuple[int, int] = (480, 480),
    normal_convention: str = "marigold",
    seed: int = 0,
    skip_invalid: bool = False,
) -> datasets.Dataset:
    """Surface-normal inputs: :func:`dense_dataset` with `tasks=("normals",)`, the label under `labels` (float32
    `(3, h, w)` unit normals in Marigold's camera frame, 0 = invalid), as the single-task adapters name it."""
    return _build(dataset, split, {"normals": normal_column}, {"normals": "labels"}, image_column, crop_size, 1e-3,
                  10.0, 150, True, normal_convention, seed, skip_invalid)  # fmt: skip


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str) or not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(DENSE_TASKS):
        raise ValueError(f"`tasks` must be a non-empty subset of {DENSE_TASKS} without repeats, got {tasks!r}.")
    return tuple(t for t in DENSE_TASKS if t in tasks)


def _build(
    dataset: datasets.Dataset,
    split: str,
    columns: dict[str, str],
    keys: dict[str, str],
    image_column: str,
    crop_size: tuple[int, int],
    min_depth: float,
    max_depth: float,
    num_labels: int,
    reduce_labels: bool,
    normal_convention: str,
    seed: int,
    skip_invalid: bool,
) -> datasets.Dataset:
    meaning = {"depth": "depth maps", "segmentation": "label maps", "normals": "normal maps (8-bit RGB)"}
    check_columns(dataset, {image_column: "RGB images"} | {column: meaning[task] for task, column in columns.items()})
    for column in (image_column, *columns.values()):
        check_image_feature(dataset, column)
    if not 0 <= min_depth < max_depth:
        raise ValueError(f"Need 0 <= `min_depth` < `max_depth`, got {min_depth!r} and {max_depth!r}.")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or not 1 <= num_labels <= 255:
        raise ValueError(f"`num_labels` must be an integer in [1, 255], got {num_labels!r}.")
    if normal_convention not in NORMAL_CONVENTIONS:
        raise ValueError(f"`normal_convention` must be one of {tuple(NORMAL_CONVENTIONS)}, got {normal_convention!r}.")
    names = [image_column, *columns.values()]
    source = undecoded(dataset.select_columns(names), names)
    transform = DenseTransform(
        source,
        split,
        image_column=image_column,
        columns=columns,
        keys=keys,
        min_depth=min_depth,
        max_depth=max_depth,
        num_labels=num_labels,
        reduce_labels=reduce_labels,
        normal_convention=normal_convention,
        crop_size=crop_size,
        seed=seed,
    )
    return build_adapter_dataset(transform, name="+".join(columns), skip_invalid=skip_invalid)
