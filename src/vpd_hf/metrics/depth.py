"""NYUv2 depth metrics (the evaluator of VPD / BTS / GLPDepth), computed per image and averaged over images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from ..losses import scale_invariant_log_error
from .base import StatisticsMetric, evaluate, paired_maps

DEPTH_METRIC_NAMES = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
# Eigen et al.'s crop of the 480x640 NYUv2 frames (rows 45:471, columns 41:601), used by VPD's evaluation.
EIGEN_CROP = (45, 471, 41, 601)
NYU_SHAPE = (480, 640)


def _as_float_tensor(value: Any, name: str) -> torch.Tensor:
    tensor = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if not (tensor.is_floating_point() or tensor.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"`{name}` must hold numbers, got dtype {tensor.dtype}.")
    return tensor.to(torch.float64)


def evaluation_mask(
    target: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False
) -> torch.Tensor:
    """Pixels that count: `min_depth < target < max_depth` and, with `eigen_crop`, inside the Eigen crop."""
    mask = (target > min_depth) & (target < max_depth)
    if eigen_crop:
        if tuple(target.shape[-2:]) != NYU_SHAPE:
            raise ValueError(f"The Eigen crop is defined for {NYU_SHAPE} NYUv2 frames, got {tuple(target.shape[-2:])}.")
        crop = torch.zeros_like(mask)
        top, bottom, left, right = EIGEN_CROP
        crop[..., top:bottom, left:right] = True
        mask &= crop
    return mask


def image_depth_metrics(
    prediction: Any,
    target: Any,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    eigen_crop: bool = False,
) -> dict[str, float] | None:
    r"""
    Metrics of one `(H, W)` prediction against its ground truth (metres), over the pixels of :func:`evaluation_mask`.
    As the reference evaluator, infinite predictions become `max_depth` and NaNs `min_depth`; predictions are otherwise
    used as they are (VPD's head already outputs (0, max_depth)).

    Returns:
        `{d1, d2, d3, abs_rel, sq_rel, rmse, rmse_log, log10, silog}`, or None when no pixel is valid.
    """
    pred = _as_float_tensor(prediction, "predictions")
    gt = _as_float_tensor(target, "references")
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(
            f"Each prediction and reference must be (H, W) maps of the same shape, got {tuple(pred.shape)} and "
            f"{tuple(gt.shape)}."
        )
    pred = torch.where(torch.isposinf(pred), torch.full_like(pred, max_depth), pred)
    pred = torch.where(torch.isnan(pred), torch.full_like(pred, min_depth), pred)
    mask = evaluation_mask(gt, min_depth, max_depth, eigen_crop) & (pred > 0)
    if not bool(mask.any()):
        return None
    pred, gt = pred[mask], gt[mask]
    ratio = torch.maximum(gt / pred, pred / gt)
    diff = pred - gt
    diff_log = torch.log(pred) - torch.log(gt)
    metrics = {
        "d1": (ratio < 1.25).double().mean(),
        "d2": (ratio < 1.25**2).double().mean(),
        "d3": (ratio < 1.25**3).double().mean(),
        "abs_rel": (diff.abs() / gt).mean(),
        "sq_rel": (diff.pow(2) / gt).mean(),
        "rmse": diff.pow(2).mean().sqrt(),
        "rmse_log": diff_log.pow(2).mean().sqrt(),
        "log10": (torch.log10(pred) - torch.log10(gt)).abs().mean(),
        "silog": scale_invariant_log_error(diff_log, 0.5, floor=0.0),
    }
    return {name: float(value) for name, value in metrics.items()}


class DepthMetricAccumulator:
    r"""
    Streaming NYUv2 depth metrics: :meth:`update` with batches of predictions and references, :meth:`compute` the
    per-image average. Images without any valid pixel are skipped and counted in `num_skipped`.

    Example:
        >>> acc = DepthMetricAccumulator(eigen_crop=True)
        >>> for batch in loader:
        ...     acc.update(predicted_depth, batch["labels"])
        >>> acc.compute()["rmse"]
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False) -> None:
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"Need 0 <= min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}.")
        self.min_depth, self.max_depth, self.eigen_crop = float(min_depth), float(max_depth), bool(eigen_crop)
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(DEPTH_METRIC_NAMES, 0.0)
        self.num_images = 0
        self.num_skipped = 0

    def update(self, predictions: Any, references: Any) -> None:
        for pred, ref in paired_maps(predictions, references):
            self.add(image_depth_metrics(pred, ref, self.min_depth, self.max_depth, self.eigen_crop))

    def add(self, metrics: dict[str, float] | None) -> None:
        """Adds one image's metrics (as returned by :func:`image_depth_metrics`; None counts as skipped)."""
        if metrics is None:
            self.num_skipped += 1
            return
        for name in DEPTH_METRIC_NAMES:
            self.sums[name] += metrics[name]
        self.num_images += 1

    def compute(self) -> dict[str, float]:
        if self.num_images == 0:
            raise ValueError("No image with valid ground truth was added; cannot compute depth metrics.")
        results = {name: total / self.num_images for name, total in self.sums.items()}
        results.update(num_images=self.num_images, num_skipped=self.num_skipped)
        return results


def compute_depth_metrics(
    predictions: Any,
    references: Any,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    eigen_crop: bool = False,
) -> dict[str, float]:
    """One-shot version of :class:`DepthMetricAccumulator` (per-image metrics averaged over the images)."""
    accumulator = DepthMetricAccumulator(min_depth, max_depth, eigen_crop)
    accumulator.update(predictions, references)
    return accumulator.compute()


_DESCRIPTION = """NYUv2 depth metrics as in VPD/BTS/GLPDepth: threshold accuracies d1-d3 (max(p/g, g/p) < 1.25^k),
AbsRel, SqRel, RMSE, RMSE-log, log10 and SiLog, computed per image over the pixels with min_depth < gt < max_depth
(optionally inside the Eigen crop) and averaged over images."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: depth maps (H, W) in metres (arrays, tensors or nested lists), one per image.
    references: ground-truth depth maps of the same shapes; values outside (min_depth, max_depth) are ignored.
Returns:
    dict with d1, d2, d3, abs_rel, sq_rel, rmse, rmse_log, log10, silog, num_images, num_skipped.
"""


class DepthMetric(StatisticsMetric):
    r"""
    The depth metrics as an offline `evaluate.Metric` (instantiate it directly; nothing is downloaded):

        >>> metric = DepthMetric(eigen_crop=True)
        >>> metric.add_batch(predictions=preds, references=depths)
        >>> metric.compute()

    Each added pair is reduced to its per-image metrics at once: evaluate's cache holds nine numbers per image.
    """

    def __init__(
        self, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False, **kwargs: Any
    ) -> None:
        self._settings = DepthMetricAccumulator(min_depth, max_depth, eigen_crop)
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        features = {name: datasets.Value("float64") for name in DEPTH_METRIC_NAMES}
        features["valid"] = datasets.Value("bool")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _statistics(self, pairs: list[tuple[Any, Any]]) -> dict[str, list]:
        rows: dict[str, list] = {name: [] for name in (*DEPTH_METRIC_NAMES, "valid")}
        settings = self._settings
        for pred, ref in pairs:
            metrics = image_depth_metrics(pred, ref, settings.min_depth, settings.max_depth, settings.eigen_crop)
            for name in DEPTH_METRIC_NAMES:
                rows[name].append(0.0 if metrics is None else metrics[name])
            rows["valid"].append(metrics is not None)
        return rows

    def _compute(self, valid: Sequence[bool] = (), **columns: Sequence[float]) -> dict[str, float]:
        accumulator = DepthMetricAccumulator(
            self._settings.min_depth, self._settings.max_depth, self._settings.eigen_crop
        )
        for index, is_valid in enumerate(valid):
            accumulator.add({name: columns[name][index] for name in DEPTH_METRIC_NAMES} if is_valid else None)
        return accumulator.compute()


__all__ = [
    "DEPTH_METRIC_NAMES",
    "EIGEN_CROP",
    "DepthMetric",
    "DepthMetricAccumulator",
    "compute_depth_metrics",
    "evaluation_mask",
    "image_depth_metrics",
]
