"""Depth metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from vpd_hf.metrics import DepthMetric, DepthMetricAccumulator, compute_depth_metrics, image_depth_metrics

PRED = [[1.0, 2.0], [4.0, 0.5]]
GT = [[1.0, 2.5], [2.0, 0.0]]  # the 0 is "no depth": 3 valid pixels


def hand_metrics():
    pairs = [(1.0, 1.0), (2.0, 2.5), (4.0, 2.0)]
    n = len(pairs)
    ratios = [max(p / g, g / p) for p, g in pairs]
    logs = [math.log(p) - math.log(g) for p, g in pairs]
    mean_log = sum(logs) / n
    return {
        "d1": sum(r < 1.25 for r in ratios) / n,
        "d2": sum(r < 1.25**2 for r in ratios) / n,
        "d3": sum(r < 1.25**3 for r in ratios) / n,
        "abs_rel": sum(abs(p - g) / g for p, g in pairs) / n,
        "sq_rel": sum((p - g) ** 2 / g for p, g in pairs) / n,
        "rmse": math.sqrt(sum((p - g) ** 2 for p, g in pairs) / n),
        "rmse_log": math.sqrt(sum(v * v for v in logs) / n),
        "log10": sum(abs(math.log10(p) - math.log10(g)) for p, g in pairs) / n,
        "silog": math.sqrt(sum(v * v for v in logs) / n - 0.5 * mean_log**2),
    }


def test_single_image_against_hand_computation():
    got = image_depth_metrics(PRED, GT)
    want = hand_metrics()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-12), name
    # A few literal values, worked out on paper: ratios 1, 1.25, 2 (1.25 is not < 1.25).
    assert got["d1"] == pytest.approx(1 / 3) and got["d2"] == pytest.approx(2 / 3) and got["d3"] == pytest.approx(2 / 3)
    assert got["abs_rel"] == pytest.approx(0.4) and got["sq_rel"] == pytest.approx(0.7)
    assert got["rmse"] == pytest.approx(math.sqrt(4.25 / 3))


def test_range_limits_and_bad_predictions():
    # Ground truth outside (min_depth, max_depth) is ignored; inf/nan predictions become max/min depth.
    got = image_depth_metrics([[1.0, 5.0, float("inf"), float("nan")]], [[1.0, 12.0, 10.0 - 1e-9, 0.5]])
    # Valid pairs: (1, 1), (inf -> 10, 10 - 1e-9), (nan -> 1e-3, 0.5); the 12 m pixel is beyond max_depth.
    assert got["d1"] == pytest.approx(2 / 3)
    assert got["abs_rel"] == pytest.approx((0 + 1e-9 / (10 - 1e-9) + (0.5 - 1e-3) / 0.5) / 3, rel=1e-9)
    assert image_depth_metrics([[1.0]], [[0.0]]) is None


def test_images_are_averaged_not_pixels():
    perfect = torch.full((2, 2), 3.0)
    acc = DepthMetricAccumulator()
    acc.update([torch.tensor(PRED)], [torch.tensor(GT)])
    acc.update(perfect[None], perfect[None])  # a (B, H, W) batch
    acc.update(np.ones((1, 2, 2)), np.zeros((1, 2, 2)))  # no valid pixel: skipped
    result = acc.compute()
    want = hand_metrics()
    assert result["num_images"] == 2 and result["num_skipped"] == 1
    assert result["abs_rel"] == pytest.approx(want["abs_rel"] / 2)
    assert result["d1"] == pytest.approx((want["d1"] + 1.0) / 2)
    assert result["rmse"] == pytest.approx(want["rmse"] / 2)
    assert result["silog"] == pytest.approx(want["silog"] / 2)  # a perfect image scores exactly 0


def test_eigen_crop():
    gt = torch.full((480, 640), 2.0)
    pred = torch.full((480, 640), 4.0)
    pred[45:471, 41:601] = 2.0  # correct inside the crop, wrong outside
    assert compute_depth_metrics([pred], [gt], eigen_crop=True)["abs_rel"] == 0.0
    assert compute_depth_metrics([pred], [gt])["abs_rel"] > 0.1
    with pytest.raises(ValueError, match="Eigen crop is defined for"):
        compute_depth_metrics([torch.ones(10, 10)], [torch.ones(10, 10)], eigen_crop=True)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        image_depth_metrics(torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        compute_depth_metrics([torch.ones(2, 2)] * 2, [torch.ones(2, 2)])
    with pytest.raises(ValueError, match="No image with valid ground truth"):
        compute_depth_metrics([torch.ones(2, 2)], [torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="min_depth < max_depth"):
        DepthMetricAccumulator(min_depth=5, max_depth=1)


def test_evaluate_metric_offline_equals_the_function(tmp_path):
    rng = np.random.default_rng(0)
    preds = [rng.uniform(0.5, 9, (6, 7)) for _ in range(5)]
    refs = [rng.uniform(0.5, 9, (6, 7)) for _ in range(5)]
    refs[2][:] = 0  # skipped image
    metric = DepthMetric(cache_dir=str(tmp_path))
    metric.add_batch(predictions=preds[:2], references=refs[:2])
    metric.add(prediction=preds[2], reference=refs[2])
    result = metric.compute(predictions=preds[3:], references=refs[3:])
    want = compute_depth_metrics(preds, refs)
    assert result.keys() == want.keys()
    for name in want:
        assert result[name] == pytest.approx(want[name], rel=1e-12), name
    assert result["num_images"] == 4 and result["num_skipped"] == 1


def test_evaluate_metric_settings(tmp_path):
    gt = np.full((480, 640), 2.0)
    pred = np.full((480, 640), 4.0)
    pred[45:471, 41:601] = 2.0
    metric = DepthMetric(eigen_crop=True, cache_dir=str(tmp_path))
    assert metric.compute(predictions=[pred], references=[gt])["abs_rel"] == 0.0
    with pytest.raises(ValueError, match="Unexpected inputs"):
        metric.add_batch(predictions=[pred], references=[gt], masks=[gt])
