"""Training losses of VPD's task heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scale_invariant_log_error(log_diff: torch.Tensor, lambd: float = 0.5, floor: float = 1e-12) -> torch.Tensor:
    """`sqrt(max(mean(d^2) - lambd * mean(d)^2, floor))` of log-depth differences `d` (all elements used)."""
    mean = log_diff.mean()
    # Written as var(d) + (1 - lambd) * mean(d)^2, which is the same quantity without float32 cancellation. Exact
    # predictions give 0 and an infinite sqrt gradient; the default floor (result >= 1e-6) keeps training finite.
    variance = (log_diff - mean).pow(2).mean() + (1.0 - lambd) * mean.pow(2)
    return torch.sqrt(variance.clamp_min(floor))


def silog_loss(
    predicted_depth: torch.Tensor,
    target_depth: torch.Tensor,
    lambd: float = 0.5,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    Scale-invariant log loss of the VPD/GLPDepth code: `sqrt(mean(d^2) - lambd * mean(d)^2)` with
    `d = log(target) - log(predicted)` over all valid pixels of the batch (pooled, not per image). A pixel is valid when
    its target is finite and > 0 (0 marks missing depth) and, if given, `valid_mask` is true there.

    Args:
        predicted_depth: `(B, H, W)` positive depths.
        target_depth: `(B, H, W)` ground truth; 0, NaN and inf mark invalid pixels.
        lambd: variance weight in [0, 1].
        valid_mask: optional `(B, H, W)` boolean (or 0/1) mask of pixels to use, e.g. to exclude padding.

    Returns:
        A scalar in float32. With no valid pixel the loss is 0 (still connected to `predicted_depth`).
    """
    if predicted_depth.shape != target_depth.shape:
        raise ValueError(
            f"`labels` must have the shape of the predicted depth {tuple(predicted_depth.shape)}, "
            f"got {tuple(target_depth.shape)}."
        )
    target = target_depth.float()
    valid = torch.isfinite(target) & (target > 0)
    if valid_mask is not None:
        if valid_mask.shape != target.shape:
            raise ValueError(
                f"`pixel_mask` must have the shape of the labels {tuple(target.shape)}, got {tuple(valid_mask.shape)}."
            )
        valid &= valid_mask.bool()
    predicted = predicted_depth.float()
    if not bool(valid.any()):
        return predicted.sum() * 0.0
    return scale_invariant_log_error(torch.log(target[valid]) - torch.log(predicted[valid]), lambd)


def semantic_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    avg_non_ignore: bool = False,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    Pixel-wise cross-entropy of `logits` `(B, C, H, W)` against integer `labels` `(B, H, W)`.

    `avg_non_ignore=False` reproduces mmsegmentation 0.x (VPD's segmentation code): ignored pixels contribute zero
    but count in the mean. `True` averages over the non-ignored pixels only, as `torch.nn.CrossEntropyLoss` (and
    transformers' models) do; with `class_weight` that average is weighted, exactly as PyTorch's.
    """
    if logits.ndim != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"`labels` must have shape {(logits.shape[0], *logits.shape[2:])} to match the logits, got {tuple(labels.shape)}."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be an integer tensor of class indices, got {labels.dtype}.")
    labels = labels.long()
    weight = None if class_weight is None else class_weight.to(device=logits.device, dtype=torch.float32)
    if avg_non_ignore:
        return F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=ignore_index, reduction="none")
    return per_pixel.mean()


def valid_normals(target_normals: torch.Tensor) -> torch.Tensor:
    """`(B, H, W)` boolean: pixels of a `(B, 3, H, W)` normals map that hold a normal (finite, not the all-zero vector
    that marks missing labels)."""
    finite = torch.isfinite(target_normals).all(dim=1)
    return finite & (torch.nan_to_num(target_normals).abs().sum(dim=1) > 0)


def normals_cosine_loss(
    predicted_normals: torch.Tensor,
    target_normals: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    `mean(1 - cos(n_pred, n_gt))` over the valid pixels of the batch (pooled, like :func:`silog_loss`).

    Why 1 - cos rather than Bae et al.'s angular NLL: the NLL needs a second output (a concentration `kappa` per pixel)
    and pays off with their uncertainty-guided pixel sampling, which VPD's convolutional head does not do; 1 - cos is
    smooth and bounded (no clamping, unlike `acos`, whose gradient is infinite at 0 degrees), keeps the head's output
    exactly the unit normal that the single-task and multi-task models share, and is on the same order of magnitude as
    the other heads' losses (0 to 2), so the multi-task weights stay near 1. Targets are renormalised, so slightly
    non-unit labels (e.g. after bilinear resizing) are fine.

    Args:
        predicted_normals: `(B, 3, H, W)` unit normals.
        target_normals: `(B, 3, H, W)`; an all-zero vector (or a non-finite one) marks a pixel without a label.
        valid_mask: optional `(B, H, W)` boolean (or 0/1) mask of pixels to use, e.g. to exclude padding.

    Returns:
        A scalar in float32. With no valid pixel the loss is 0 (still connected to `predicted_normals`).
    """
    if (
        predicted_normals.ndim != 4
        or predicted_normals.shape[1] != 3
        or target_normals.shape != predicted_normals.shape
    ):
        raise ValueError(
            f"`labels` (normals) must have the shape of the predicted normals {tuple(predicted_normals.shape)} "
            f"(batch, 3, height, width), got {tuple(target_normals.shape)}."
        )
    if not target_normals.is_floating_point():
        raise TypeError(f"`labels` (normals) must be a float tensor of unit vectors, got {target_normals.dtype}.")
    valid = valid_normals(target_normals)
    if valid_mask is not None:
        if valid_mask.shape != valid.shape:
            raise ValueError(
                f"`pixel_mask` must have the shape {tuple(valid.shape)} of the labels' pixels, got {tuple(valid_mask.shape)}."
            )
        valid &= valid_mask.bool()
    predicted = predicted_normals.float()
    if not bool(valid.any()):
        return predicted.sum() * 0.0
    target = F.normalize(torch.nan_to_num(target_normals.float()), dim=1)
    cosine = (predicted * target).sum(dim=1)
    return (1.0 - cosine[valid]).mean()


__all__ = ["normals_cosine_loss", "scale_invariant_log_error", "semantic_cross_entropy", "silog_loss", "valid_normals"]
