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
from .normals import (
    NORMAL_METRIC_NAMES,
    NormalMetric,
    NormalMetricAccumulator,
    angular_errors,
    compute_normal_metrics,
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
    "NORMAL_METRIC_NAMES",
    "PRECISION_THRESHOLDS",
    "DepthMetric",
    "DepthMetricAccumulator",
    "MeanIoU",
    "MeanIoUAccumulator",
    "NormalMetric",
    "NormalMetricAccumulator",
    "ReferringMetricAccumulator",
    "ReferringSegmentationMetric",
    "angular_errors",
    "compute_depth_metrics",
    "compute_mean_iou",
    "compute_normal_metrics",
    "compute_referring_metrics",
    "evaluation_mask",
    "image_depth_metrics",
    "metrics_from_confusion",
]
