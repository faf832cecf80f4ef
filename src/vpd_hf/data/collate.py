"""Batching of the adapters' items (`DataLoader(..., collate_fn=collate_fn)`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .augmentation import IGNORE_INDEX

__all__ = ["collate_fn"]

# Tensors padded when their sizes differ: the image and every per-pixel label (single-task `labels`, the multi-task
# `{task}_labels` of `vpd_hf.data.dense`).
_PADDED_KEYS = ("pixel_values", "labels", "depth_labels", "segmentation_labels", "normal_labels")


def _padded_size(tensors: Sequence[torch.Tensor], multiple: int) -> tuple[int, int]:
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


def _pad_stack(tensors: Sequence[torch.Tensor], size: tuple[int, int], value: float) -> torch.Tensor:
    """Pads each tensor at the bottom/right to `size` (its last two dims) with `value` and stacks them."""
    return torch.stack(
        [torch.nn.functional.pad(t, (0, size[1] - t.shape[-1], 0, size[0] - t.shape[-2]), value=value) for t in tensors]
    )


def collate_fn(examples: Sequence[dict[str, Any]], pad_to_multiple_of: int = 64) -> dict[str, Any]:
    """Batches adapter items (dicts with the same keys) into one dict.

    * Tensors of equal shapes are stacked (`pixel_values` `(B, 3, H, W)`, `labels` `(B, H, W)`, `input_ids`
      `(B, T)`, `scene_ids` `(B,)`).
    * When the images differ in size (evaluation), `pixel_values` are zero-padded at the bottom/right to a common size
      that is a multiple of `pad_to_multiple_of` (64 keeps every Stable Diffusion UNet level integer-sized) and
      `pixel_mask` int64 `(B, H, W)` is added (1 = image, 0 = padding). `labels` of different sizes are padded the same
      way (to the multiple of `pad_to_multiple_of` above their largest size, so labels of the image's size line up
      with `pixel_values`) with 255 for integer labels (segmentation, referring: ignored) and 0 for float labels
      (depth, normals: invalid); the multi-task `depth_labels`, `segmentation_labels` and `normal_labels` likewise.
      Other tensors must have equal shapes.
    * Non-tensor values (e.g. the eval `sentence`) are kept as lists.

    Raises:
        ValueError: no examples, examples with different keys, or different shapes of a tensor that cannot be padded.
    """
    if not examples:
        raise ValueError("`examples` is empty.")
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"`pad_to_multiple_of` must be a positive integer, got {pad_to_multiple_of!r}.")
    keys = list(examples[0])
    for index, example in enumerate(examples):
        if set(example) != set(keys):
            raise ValueError(f"Example {index} has keys {sorted(example)}, example 0 has {sorted(keys)}.")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [example[key] for example in examples]
        if not all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = values
            continue
        if all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
            continue
        if key not in _PADDED_KEYS or any(v.dim() < 2 or v.shape[:-2] != values[0].shape[:-2] for v in values):
            raise ValueError(f"Cannot batch {key!r}: shapes {[tuple(v.shape) for v in values]} differ.")
        size = _padded_size(values, pad_to_multiple_of)
        if key == "pixel_values":
            batch[key] = _pad_stack(values, size, 0.0)
            masks = [torch.ones(v.shape[-2:], dtype=torch.long) for v in values]
            batch["pixel_mask"] = _pad_stack(masks, size, 0)
        else:
            batch[key] = _pad_stack(values, size, 0.0 if values[0].is_floating_point() else IGNORE_INDEX)
    return batch
