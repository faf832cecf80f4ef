"""Batch-invariant inference: each image runs at its own padded size, whatever else is in its batch.

Padding an image beyond its own multiple of 64 changes its prediction: the GroupNorm statistics of the VAE encoder and
the UNet, and the UNet's receptive field, see the padding. A batch of images of different sizes (padded to the largest
one by `VPDImageProcessor` or a pipeline's collate) is therefore split into groups of images that share their own
padded size; each group runs cropped to that size (images of one size still run as one batch: the fast path on a
GPU), and the outputs are zero-padded back to the batch's size and put back in batch order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SizeGroup:
    """Images of a batch that share their own padded size: their batch `indices` `(n,)` and that `size` (H, W)."""

    indices: torch.Tensor
    size: tuple[int, int]


def valid_extent(pixel_mask: torch.Tensor) -> torch.Tensor:
    """`(B, 2)` height and width of the region that holds each image's pixels in a `(B, H, W)` mask (1 = image):
    up to its last row and column with an image pixel (images are padded at the bottom and right)."""
    rows, cols = pixel_mask.bool().any(dim=2), pixel_mask.bool().any(dim=1)
    row_ids = torch.arange(1, rows.shape[1] + 1, device=pixel_mask.device)
    col_ids = torch.arange(1, cols.shape[1] + 1, device=pixel_mask.device)
    return torch.stack([(rows * row_ids).amax(dim=1), (cols * col_ids).amax(dim=1)], dim=1)


def size_groups(pixel_mask: torch.Tensor | None, multiple: int) -> list[SizeGroup] | None:
    r"""
    Groups the images of a batch by their own padded size: the extent of their pixels in `pixel_mask` `(B, H, W)`
    rounded up to `multiple`, at most the batch's `(H, W)`.

    Returns None when there is nothing to split (no mask, or every image's own padded size is the batch's size), so
    that the caller runs the batch as it is. Raises a `ValueError` for an image without any pixel in the mask.
    """
    if pixel_mask is None:
        return None
    height, width = pixel_mask.shape[-2:]
    extents = valid_extent(pixel_mask).tolist()
    sizes = []
    for index, (h, w) in enumerate(extents):
        if h == 0 or w == 0:
            raise ValueError(f"`pixel_mask[{index}]` marks no image pixel (all zeros): an empty image cannot be run.")
        sizes.append((min(math.ceil(h / multiple) * multiple, height), min(math.ceil(w / multiple) * multiple, width)))
    if all(size == (height, width) for size in sizes):
        return None
    groups = []
    for size in dict.fromkeys(sizes):  # first-seen order: deterministic
        indices = [i for i, s in enumerate(sizes) if s == size]
        groups.append(SizeGroup(torch.tensor(indices, device=pixel_mask.device), size))
    return groups


def crop(tensor: torch.Tensor | None, group: SizeGroup) -> torch.Tensor | None:
    """The rows of `group` of a batch-first `(B, ..., H, W)` tensor, cropped to the group's size (None stays None)."""
    if tensor is None:
        return None
    return tensor[group.indices.to(tensor.device)][..., : group.size[0], : group.size[1]]


def merge(
    parts: Sequence[torch.Tensor | None],
    rows: Sequence[torch.Tensor],
    batch_size: int,
    size: tuple[int, int] | None = None,
) -> torch.Tensor | None:
    r"""
    Puts the outputs of the groups back together: `parts[g]` `(n_g, ..., h_g, w_g)` holds the batch rows `rows[g]`;
    each part is zero-padded at the bottom/right to `size` (default: the largest part's) and the result
    `(batch_size, ..., H, W)` is in batch order. Differentiable; None when the parts are None.
    """
    if all(part is None for part in parts):
        return None
    if size is None:
        size = (max(p.shape[-2] for p in parts), max(p.shape[-1] for p in parts))
    padded = [F.pad(p, (0, size[1] - p.shape[-1], 0, size[0] - p.shape[-2])) for p in parts]
    order = torch.cat([r.to(padded[0].device) for r in rows])
    if order.numel() != batch_size:
        raise RuntimeError(f"The groups hold {order.numel()} rows for a batch of {batch_size}.")
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch_size, device=order.device)
    return torch.cat(padded)[inverse]


def merge_tuples(
    parts: Sequence[tuple[torch.Tensor, ...] | None], rows: Sequence[torch.Tensor], batch_size: int
) -> tuple[torch.Tensor, ...] | None:
    """:func:`merge` of each element of per-group tuples of maps (e.g. the backbone's feature or attention maps)."""
    if all(part is None for part in parts):
        return None
    return tuple(merge(maps, rows, batch_size) for maps in zip(*parts, strict=True))


def pad_batch(
    pixel_values: Sequence[torch.Tensor], pixel_masks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Stacks images of different sizes: each `(C, h, w)` image and its `(h, w)` mask are zero-padded at the bottom and
    right to the largest size, giving `pixel_values` `(B, C, H, W)` and `pixel_mask` `(B, H, W)` (0 on the new padding).
    """
    height = max(image.shape[-2] for image in pixel_values)
    width = max(image.shape[-1] for image in pixel_values)

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))

    return torch.stack([pad(image) for image in pixel_values]), torch.stack([pad(mask) for mask in pixel_masks])


__all__ = ["SizeGroup", "crop", "merge", "merge_tuples", "pad_batch", "size_groups", "valid_extent"]
