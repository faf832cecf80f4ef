"""Semantic-segmentation metrics (mean IoU and accuracies) from a confusion matrix accumulated in torch.

The results equal evaluate's `mean_iou` (itself mmsegmentation's `mean_iou`): the same output keys, ignore index,
`label_map` and `reduce_labels`, and the same treatment of out-of-range values (a ground-truth label outside
`[0, num_labels)` that is not the ignore index counts for nothing but its prediction's area; a prediction outside the
range counts for nothing but its label's area). Nothing is encoded as an image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch

from .base import StatisticsMetric, evaluate, paired_maps

MEAN_IOU_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")


def _as_label_tensor(value: Any, name: str) -> torch.Tensor:
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer class indices, got dtype {tensor.dtype}.")
    return tensor.long()


class MeanIoUAccumulator:
    r"""
    Streaming semantic-segmentation metrics. Each :meth:`update` adds to a `(num_labels + 1)^2` confusion matrix
    (rows: ground truth, columns: prediction; the last row/column collects values outside `[0, num_labels)`).

    Args:
        num_labels: number of classes.
        ignore_index: ground-truth value left out entirely (after `label_map` and `reduce_labels`).
        reduce_labels: ground truth 0 -> 255 and k -> k - 1 (ADE20K annotations), as evaluate's `mean_iou`.
        label_map: `{old: new}` remapping of ground-truth values, applied first.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        label_map: Mapping[int, int] | None = None,
    ) -> None:
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ValueError(f"`num_labels` must be a positive integer, got {num_labels!r}.")
        self.num_labels, self.ignore_index = num_labels, int(ignore_index)
        self.reduce_labels, self.label_map = bool(reduce_labels), dict(label_map or {})
        self.reset()

    def reset(self) -> None:
        size = self.num_labels + 1
        self.confusion = torch.zeros(size, size, dtype=torch.int64)
        self.num_images = 0

    def image_confusion(self, prediction: Any, reference: Any) -> torch.Tensor:
        """The `(num_labels + 1)^2` confusion matrix of one `(H, W)` prediction against its ground truth."""
        pred = _as_label_tensor(prediction, "predictions")
        label = _as_label_tensor(reference, "references")
        if pred.shape != label.shape or pred.ndim != 2:
            raise ValueError(
                f"Each prediction and reference must be (H, W) maps of the same shape, got {tuple(pred.shape)} and "
                f"{tuple(label.shape)}."
            )
        if self.label_map:
            original = label.clone()
            for old, new in self.label_map.items():
                label[original == old] = new
        if self.reduce_labels:
            label = torch.where(label == 0, 255, label - 1)
            label[label == 254] = 255
        keep = label != self.ignore_index
        label, pred = label[keep], pred[keep]
        other = self.num_labels
        label = torch.where((label >= 0) & (label < other), label, other)
        pred = torch.where((pred >= 0) & (pred < other), pred, other)
        size = other + 1
        return torch.bincount(label * size + pred, minlength=size * size).reshape(size, size)

    def update(self, predictions: Any, references: Any) -> None:
        for pred, ref in paired_maps(predictions, references):
            self.add_confusion(self.image_confusion(pred, ref))

    def add_confusion(self, confusion: torch.Tensor, num_images: int = 1) -> None:
        """Adds a confusion matrix (e.g. summed across processes)."""
        self.confusion += confusion.to(self.confusion)
        self.num_images += num_images

    def compute(self, nan_to_num: float | None = None) -> dict[str, Any]:
        """evaluate's `mean_iou` outputs; absent classes (zero union or zero ground truth) are NaN unless
        `nan_to_num` replaces them."""
        return metrics_from_confusion(self.confusion, nan_to_num)


def metrics_from_confusion(confusion: torch.Tensor, nan_to_num: float | None = None) -> dict[str, Any]:
    num_labels = confusion.shape[0] - 1
    matrix = confusion.double()
    intersect = torch.diagonal(matrix)[:num_labels]
    area_label = matrix[:num_labels].sum(dim=1)
    area_pred = matrix[:, :num_labels].sum(dim=0)
    union = area_pred + area_label - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = (intersect / union).numpy()
        accuracy = (intersect / area_label).numpy()
        overall = float(intersect.sum() / area_label.sum()) if area_label.sum() > 0 else float("nan")
    results = {
        "mean_iou": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
        "mean_accuracy": float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else float("nan"),
        "overall_accuracy": overall,
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }
    if nan_to_num is not None:
        results = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in results.items()}
        results = {key: float(value) if np.ndim(value) == 0 else value for key, value in results.items()}
    return results


def compute_mean_iou(
    predictions: Any,
    references: Any,
    num_labels: int,
    ignore_index: int = 255,
    nan_to_num: float | None = None,
    label_map: Mapping[int, int] | None = None,
    reduce_labels: bool = False,
) -> dict[str, Any]:
    """One-shot mean IoU with evaluate's `mean_iou` signature and outputs."""
    accumulator = MeanIoUAccumulator(num_labels, ignore_index, reduce_labels, label_map)
    accumulator.update(predictions, references)
    return accumulator.compute(nan_to_num)


_DESCRIPTION = """Mean Intersection-over-Union, mean class accuracy and overall pixel accuracy of semantic
segmentation, accumulated from confusion matrices (same outputs as evaluate's `mean_iou`, offline)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: (H, W) integer label maps, one per image.
    references: (H, W) ground-truth label maps.
Returns:
    mean_iou, mean_accuracy, overall_accuracy, per_category_iou, per_category_accuracy.
"""


class MeanIoU(StatisticsMetric):
    r"""
    Mean IoU as an offline `evaluate.Metric` (instantiate it directly; nothing is downloaded). The settings that
    evaluate's `mean_iou` takes in `compute` are given at construction:

        >>> metric = MeanIoU(num_labels=150, ignore_index=255, reduce_labels=True)
        >>> metric.add_batch(predictions=preds, references=annotations)
        >>> metric.compute()

    Each image is reduced at once to its confusion matrix: evaluate's cache holds `(num_labels + 1)^2` counts per
    image, never the maps.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        label_map: Mapping[int, int] | None = None,
        nan_to_num: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._accumulator = MeanIoUAccumulator(num_labels, ignore_index, reduce_labels, label_map)
        self._nan_to_num = nan_to_num
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"confusion": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _statistics(self, pairs: list[tuple[Any, Any]]) -> dict[str, list]:
        return {"confusion": [self._accumulator.image_confusion(p, r).flatten().tolist() for p, r in pairs]}

    def _compute(self, confusion: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
        size = self._accumulator.num_labels + 1
        total = torch.tensor(np.asarray(confusion, dtype=np.int64).reshape(-1, size, size).sum(axis=0))
        return metrics_from_confusion(total, self._nan_to_num)


__all__ = ["MEAN_IOU_KEYS", "MeanIoU", "MeanIoUAccumulator", "compute_mean_iou", "metrics_from_confusion"]
