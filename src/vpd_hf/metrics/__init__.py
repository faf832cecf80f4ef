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

__all__ = [
    "DEPTH_METRIC_NAMES",
    "EIGEN_CROP",
    "DepthMetric",
    "DepthMetricAccumulator",
    "compute_depth_metrics",
    "evaluation_mask",
    "image_depth_metrics",
]
