"""Offline evaluation metrics (no download): plain functions, streaming accumulators and `evaluate.Metric`s."""

from .depth import (
    DEPTH_METRIC_NAMES,
    EIGEN_CROP,
    DepthMetric,
    DepthMetricAccumulator,
    compute_depth_metrics,
    evaluation_mask,
    image_depth_metrics,
)
from .referring import (
    PRECISION_THRESHOLDS,
    ReferringMetricAccumulator,
    ReferringSegmentationMetric,
    compute_referring_metrics,
)
from .segmentation import MEAN_IOU_KEYS, MeanIoU, MeanIoUAccumulator, compute_mean_iou, metrics_from_confusion

__all__ = [
    "DEPTH_METRIC_NAMES",
    "EIGEN_CROP",
    "MEAN_IOU_KEYS",
    "PRECISION_THRESHOLDS",
    "DepthMetric",
    "DepthMetricAccumulator",
    "MeanIoU",
    "MeanIoUAccumulator",
    "ReferringMetricAccumulator",
    "ReferringSegmentationMetric",
    "compute_depth_metrics",
    "compute_mean_iou",
    "compute_referring_metrics",
    "evaluation_mask",
    "image_depth_metrics",
    "metrics_from_confusion",
]
