"""Surface-normal metrics of the NYUv2 normals protocol (Eigen & Fergus 2015, Bae et al. 2021, DSINE, Marigold).

The angular error of a pixel is `degrees(arccos(<n_pred / |n_pred|, n_gt>))`; a pixel counts when its ground truth is
not the all-zero vector (the invalid marker of NYUv2 normal maps and of `vpd_hf.data.normals`). As in the protocol, the
statistics pool the valid pixels of the whole evaluation set (they are not per-image averages):

* `mean`, `median`, `rmse`: of the angular error in degrees;
* `a11.25`, `a22.5`, `a30`: the fraction of valid pixels whose error is below 11.25, 22.5 and 30 degrees.

Streaming: the mean, RMSE and threshold fractions are exact (sums and counts); the median comes from a histogram of
the errors with :data:`MEDIAN_BIN_DEGREES` wide bins, interpolated linearly inside its bin, so it is within that width
of the exact median of all pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from .base import StatisticsMetric, evaluate

NORMAL_METRIC_NAMES = ("mean", "median", "rmse", "a11.25", "a22.5", "a30")
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
MEDIAN_BIN_DEGREES = 0.01
NUM_HISTOGRAM_BINS = round(180.0 / MEDIAN_BIN_DEGREES)


def _as_normal_maps(values: Any, name: str) -> list[torch.Tensor]:
    """A `(3, H, W)` map, an `(N, 3, H, W)` batch or a sequence of `(3, H, W)` maps -> list of float64 tensors."""
    if values is None:
        raise ValueError(f"`{name}` is required.")
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = [values] if values.ndim == 3 else list(values) if values.ndim == 4 else None
        if values is None:
            raise ValueError(f"`{name}` must be a (3, H, W) map, an (N, 3, H, W) batch or a list of (3, H, W) maps.")
    maps = []
    for value in values:
        tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if not tensor.is_floating_point():
            raise TypeError(f"`{name}` must hold float normal vectors, got dtype {tensor.dtype}.")
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"Each of `{name}` must be a (3, H, W) normal map, got shape {tuple(tensor.shape)}.")
        maps.append(tensor.to(torch.float64))
    return maps


def angular_errors(prediction: Any, reference: Any) -> torch.Tensor:
    """Angular errors in degrees `(V,)` float64 at the `V` valid pixels (non-zero ground truth) of one `(3, H, W)`
    prediction against its `(3, H, W)` ground truth. Predictions are normalised first (a zero prediction is 90
    degrees from everything); ground truth is used as it is (unit vectors)."""
    (pred,), (gt,) = _as_normal_maps([prediction], "predictions"), _as_normal_maps([reference], "references")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(gt.shape)} differ in shape.")
    valid = (gt != 0).any(dim=0)
    pred = torch.nan_to_num(pred[:, valid], nan=0.0)
    pred = pred / pred.norm(dim=0).clamp_min(1e-12)
    cosine = (pred * gt[:, valid]).sum(dim=0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosine))


def image_normal_statistics(prediction: Any, reference: Any) -> dict[str, Any]:
    """Sufficient statistics of one image: `count`, `sum`, `sum_sq` of the errors, `within` (counts below each of
    :data:`NORMAL_THRESHOLDS`) and the sparse error histogram `bins` / `bin_counts` (bins of MEDIAN_BIN_DEGREES)."""
    errors = angular_errors(prediction, reference)
    bins = torch.clamp((errors / MEDIAN_BIN_DEGREES).long(), 0, NUM_HISTOGRAM_BINS - 1)
    occupied, counts = torch.unique(bins, return_counts=True)
    return {
        "count": int(errors.numel()),
        "sum": float(errors.sum()),
        "sum_sq": float(errors.square().sum()),
        "within": [int((errors < threshold).sum()) for threshold in NORMAL_THRESHOLDS],
        "bins": occupied.tolist(),
        "bin_counts": counts.tolist(),
    }


class NormalMetricAccumulator:
    r"""
    Streaming NYUv2 normal metrics over all valid pixels of everything added: :meth:`update` with batches of
    `(N, 3, H, W)` predictions and ground truth (or lists of `(3, H, W)` maps), :meth:`compute` the results
    (`mean`, `median`, `rmse` in degrees, `a11.25`, `a22.5`, `a30` fractions, `num_pixels`, `num_images`).
    Memory is constant: sums, threshold counts and an error histogram.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count, self.sum, self.sum_sq = 0, 0.0, 0.0
        self.within = [0] * len(NORMAL_THRESHOLDS)
        self.histogram = np.zeros(NUM_HISTOGRAM_BINS, dtype=np.int64)
        self.num_images = 0

    def update(self, predictions: Any, references: Any) -> None:
        preds, refs = _as_normal_maps(predictions, "predictions"), _as_normal_maps(references, "references")
        if len(preds) != len(refs):
            raise ValueError(f"Got {len(preds)} predictions for {len(refs)} references.")
        for pred, ref in zip(preds, refs, strict=True):
            self.add(image_normal_statistics(pred, ref))

    def add(self, statistics: dict[str, Any]) -> None:
        """Adds one image's :func:`image_normal_statistics`."""
        self.count += statistics["count"]
        self.sum += statistics["sum"]
        self.sum_sq += statistics["sum_sq"]
        self.within = [a + b for a, b in zip(self.within, statistics["within"], strict=True)]
        np.add.at(self.histogram, np.asarray(statistics["bins"], dtype=np.int64), statistics["bin_counts"])
        self.num_images += 1

    def median(self) -> float:
        """Median error from the histogram: the bin holding the middle pixel, interpolated linearly inside it."""
        half = self.count / 2.0
        cumulative = np.cumsum(self.histogram)
        index = int(np.searchsorted(cumulative, half))
        before = cumulative[index - 1] if index else 0
        return (index + (half - before) / self.histogram[index]) * MEDIAN_BIN_DEGREES

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("No valid ground-truth normal was added; cannot compute normal metrics.")
        results = {
            "mean": self.sum / self.count,
            "median": self.median(),
            "rmse": float(np.sqrt(self.sum_sq / self.count)),
        }
        for threshold, within in zip(NORMAL_THRESHOLDS, self.within, strict=True):
            results[f"a{threshold:g}"] = within / self.count
        results.update(num_pixels=self.count, num_images=self.num_images)
        return results


def compute_normal_metrics(predictions: Any, references: Any) -> dict[str, float]:
    """One-shot version of :class:`NormalMetricAccumulator` (pooled over all valid pixels)."""
    accumulator = NormalMetricAccumulator()
    accumulator.update(predictions, references)
    return accumulator.compute()


_DESCRIPTION = """NYUv2 surface-normal metrics: mean, median and RMSE of the angular error in degrees and the fractions
of pixels within 11.25, 22.5 and 30 degrees, pooled over the valid (non-zero ground truth) pixels of all images."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: normal maps (3, H, W) (arrays, tensors or nested lists), one per image; normalised before use.
    references: ground-truth unit normals (3, H, W) in the same camera frame; all-zero vectors are ignored.
Returns:
    dict with mean, median, rmse, a11.25, a22.5, a30, num_pixels, num_images.
"""


class NormalMetric(StatisticsMetric):
    r"""
    The normal metrics as an offline `evaluate.Metric` (instantiate it directly; nothing is downloaded):

        >>> metric = NormalMetric()
        >>> metric.add_batch(predictions=outputs.predicted_normals, references=batch["normal_labels"])
        >>> metric.compute()

    Each added pair is reduced at once to its :func:`image_normal_statistics` (sums, threshold counts and a sparse
    error histogram), so evaluate's cache never holds the maps.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "count": datasets.Value("int64"),
                    "sum": datasets.Value("float64"),
                    "sum_sq": datasets.Value("float64"),
                    "within": datasets.Sequence(datasets.Value("int64")),
                    "bins": datasets.Sequence(datasets.Value("int64")),
                    "bin_counts": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Adds a batch of `(3, H, W)` predictions and their ground truth (reduced to statistics at once)."""
        if kwargs:
            raise ValueError(f"Unexpected inputs {sorted(kwargs)}; pass `predictions` and `references`.")
        preds, refs = _as_normal_maps(predictions, "predictions"), _as_normal_maps(references, "references")
        if len(preds) != len(refs):
            raise ValueError(f"Got {len(preds)} predictions for {len(refs)} references.")
        rows = [image_normal_statistics(p, r) for p, r in zip(preds, refs, strict=True)]
        evaluate.Metric.add_batch(self, **{name: [row[name] for row in rows] for name in self._info().features})

    def _compute(self, **columns: Sequence[Any]) -> dict[str, float]:
        accumulator = NormalMetricAccumulator()
        for index in range(len(columns["count"])):
            accumulator.add({name: values[index] for name, values in columns.items()})
        return accumulator.compute()


__all__ = [
    "MEDIAN_BIN_DEGREES",
    "NORMAL_METRIC_NAMES",
    "NORMAL_THRESHOLDS",
    "NUM_HISTOGRAM_BINS",
    "NormalMetric",
    "NormalMetricAccumulator",
    "angular_errors",
    "compute_normal_metrics",
    "image_normal_statistics",
]
