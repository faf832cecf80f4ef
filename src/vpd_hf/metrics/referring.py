"""Referring-segmentation metrics of the LAVT protocol (used by VPD): overall IoU (cumulative intersection over
cumulative union), mean IoU (average per-expression IoU) and precision at IoU thresholds 0.5 ... 0.9.

Each expression counts once; an expression whose prediction and ground truth are both empty has IoU 0 (as LAVT's
evaluation). Values are fractions in [0, 1] (papers print them x 100).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from .base import StatisticsMetric, evaluate, paired_maps

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _as_mask(value: Any, name: str) -> torch.Tensor:
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"`{name}` must be binary masks (bool or 0/1 integers), got dtype {tensor.dtype}.")
    return tensor.bool() if tensor.dtype == torch.bool else tensor != 0


def intersection_and_union(prediction: Any, reference: Any, ignore: Any = None) -> tuple[int, int]:
    """Pixel counts of `prediction & reference` and `prediction | reference` for one expression (pixels where
    `ignore` is true, e.g. padding, are left out)."""
    pred, ref = _as_mask(prediction, "predictions"), _as_mask(reference, "references")
    if pred.shape != ref.shape or pred.ndim != 2:
        raise ValueError(
            f"Each prediction and reference must be (H, W) masks of one shape, got {tuple(pred.shape)} and {tuple(ref.shape)}."
        )
    if ignore is not None:
        keep = ~_as_mask(ignore, "ignore")
        pred, ref = pred & keep, ref & keep
    return int((pred & ref).sum()), int((pred | ref).sum())


class ReferringMetricAccumulator:
    """Streaming LAVT metrics: :meth:`update` with masks, :meth:`compute` the results."""

    def __init__(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS) -> None:
        if not thresholds or not all(0 < t <= 1 for t in thresholds):
            raise ValueError(f"`thresholds` must be IoU values in (0, 1], got {thresholds!r}.")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        self.intersections: list[int] = []
        self.unions: list[int] = []

    def update(self, predictions: Any, references: Any) -> None:
        for pred, ref in paired_maps(predictions, references):
            self.add(*intersection_and_union(pred, ref))

    def add(self, intersection: int, union: int) -> None:
        if not 0 <= intersection <= union:
            raise ValueError(f"Need 0 <= intersection <= union, got {intersection} and {union}.")
        self.intersections.append(int(intersection))
        self.unions.append(int(union))

    def compute(self) -> dict[str, float]:
        return metrics_from_counts(self.intersections, self.unions, self.thresholds)


def metrics_from_counts(
    intersections: Sequence[int], unions: Sequence[int], thresholds: Sequence[float] = PRECISION_THRESHOLDS
) -> dict[str, float]:
    if not len(intersections):
        raise ValueError("No expression was added; cannot compute referring metrics.")
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    results = {
        "overall_iou": float(inter.sum() / union.sum()) if union.sum() > 0 else 0.0,
        "mean_iou": float(ious.mean()),
    }
    for threshold in thresholds:
        results[f"precision@{threshold:g}"] = float((ious >= threshold).mean())
    results["num_expressions"] = len(ious)
    return results


def compute_referring_metrics(
    predictions: Any, references: Any, thresholds: Sequence[float] = PRECISION_THRESHOLDS
) -> dict[str, float]:
    """One-shot LAVT metrics of binary masks (one prediction and one reference per expression)."""
    accumulator = ReferringMetricAccumulator(thresholds)
    accumulator.update(predictions, references)
    return accumulator.compute()


_DESCRIPTION = """Referring segmentation metrics (LAVT protocol): overall IoU (sum of intersections over sum of
unions), mean IoU (per-expression average) and precision@{0.5, 0.6, 0.7, 0.8, 0.9}."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: binary (H, W) masks, one per expression.
    references: binary (H, W) ground-truth masks.
Returns:
    overall_iou, mean_iou, precision@0.5 ... precision@0.9, num_expressions.
"""


class ReferringSegmentationMetric(StatisticsMetric):
    r"""
    The LAVT metrics as an offline `evaluate.Metric` (instantiate it directly). Each pair is reduced at once to its
    intersection and union, so evaluate's cache holds two integers per expression.
    """

    def __init__(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS, **kwargs: Any) -> None:
        self._thresholds = ReferringMetricAccumulator(thresholds).thresholds
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"intersection": datasets.Value("int64"), "union": datasets.Value("int64")}),
        )

    def _statistics(self, pairs: list[tuple[Any, Any]]) -> dict[str, list]:
        counts = [intersection_and_union(p, r) for p, r in pairs]
        return {"intersection": [c[0] for c in counts], "union": [c[1] for c in counts]}

    def _compute(self, intersection: Sequence[int] = (), union: Sequence[int] = ()) -> dict[str, float]:
        return metrics_from_counts(intersection, union, self._thresholds)


__all__ = [
    "PRECISION_THRESHOLDS",
    "ReferringMetricAccumulator",
    "ReferringSegmentationMetric",
    "compute_referring_metrics",
    "intersection_and_union",
    "metrics_from_counts",
]
