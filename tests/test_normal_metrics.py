"""Surface-normal metrics (NYUv2 protocol) against independent computations: hand-made rotations of known angle,
NumPy on pooled pixels, streaming = one shot, the offline evaluate.Metric, and bad inputs."""

import math

import numpy as np
import pytest
import torch

from vpd_hf.metrics import NormalMetric, NormalMetricAccumulator, angular_errors, compute_normal_metrics
from vpd_hf.metrics.normals import MEDIAN_BIN_DEGREES


def random_normals(rng, shape):
    n = rng.normal(size=(3, *shape))
    return n / np.linalg.norm(n, axis=0, keepdims=True)


def rotate_about_x(normals, degrees):
    """Rotates `(3, H, W)` vectors about the x axis by a fixed angle (a vector along x is left as it is)."""
    a = math.radians(degrees)
    matrix = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return np.einsum("ij,jhw->ihw", matrix, normals)


def reference_metrics(preds, refs):
    """The protocol written out with NumPy: pool the valid pixels of every image, then the statistics."""
    errors = []
    for pred, ref in zip(preds, refs, strict=True):
        valid = np.any(ref != 0, axis=0)
        p = pred[:, valid] / np.linalg.norm(pred[:, valid], axis=0)
        errors.append(np.degrees(np.arccos(np.clip(np.sum(p * ref[:, valid], axis=0), -1, 1))))
    errors = np.concatenate(errors)
    return {
        "mean": errors.mean(),
        "median": np.median(errors),
        "rmse": np.sqrt(np.mean(errors**2)),
        "a11.25": np.mean(errors < 11.25),
        "a22.5": np.mean(errors < 22.5),
        "a30": np.mean(errors < 30),
        "num_pixels": errors.size,
    }


def test_known_rotation_angles_give_exact_errors():
    # Normals in the y-z plane rotated about x by exactly 5, 15, 25 and 40 degrees in four image columns.
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, (6, 4))
    gt = np.stack([np.zeros_like(angle), np.cos(angle), np.sin(angle)])
    pred = np.concatenate([rotate_about_x(gt[:, :, k : k + 1], a) for k, a in enumerate((5, 15, 25, 40))], axis=2)
    pred *= 3.0  # predictions are normalised first
    gt[:, 0, 0] = 0.0  # one invalid pixel (the column with 5 degrees loses it)
    errors = angular_errors(pred, gt)
    assert errors.shape == (23,) and errors.dtype == torch.float64
    result = compute_normal_metrics(torch.from_numpy(pred[None]), torch.from_numpy(gt[None]))
    assert result["mean"] == pytest.approx((5 * 5 + 6 * (15 + 25 + 40)) / 23, abs=1e-9)
    assert result["rmse"] == pytest.approx(math.sqrt((5 * 25 + 6 * (225 + 625 + 1600)) / 23), abs=1e-9)
    assert result["a11.25"] == pytest.approx(5 / 23) and result["a22.5"] == pytest.approx(11 / 23)
    assert result["a30"] == pytest.approx(17 / 23)
    assert result["median"] == pytest.approx(25.0, abs=MEDIAN_BIN_DEGREES)
    assert result["num_pixels"] == 23 and result["num_images"] == 1


def test_streaming_equals_numpy_on_pooled_pixels_and_the_evaluate_metric(tmp_path):
    rng = np.random.default_rng(1)
    refs = [random_normals(rng, (h, w)) for h, w in ((8, 9), (5, 7), (6, 6))]
    preds = [r + rng.normal(scale=0.4, size=r.shape) for r in refs]
    refs[1][:, :2, :] = 0.0  # invalid rows
    refs[2][:] = 0.0  # an image without any valid pixel adds nothing
    want = reference_metrics(preds, refs)
    accumulator = NormalMetricAccumulator()
    accumulator.update([torch.from_numpy(p) for p in preds[:2]], [torch.from_numpy(r) for r in refs[:2]])
    accumulator.update(preds[2][None], refs[2][None])
    metric = NormalMetric(cache_dir=str(tmp_path))
    metric.add_batch(predictions=preds[:2], references=refs[:2])
    from_metric = metric.compute(predictions=preds[2:], references=refs[2:])
    for result in (accumulator.compute(), compute_normal_metrics(preds, refs), from_metric):
        assert result["num_pixels"] == want["num_pixels"] == 8 * 9 + 3 * 7 and result["num_images"] == 3
        for name in ("mean", "rmse", "a11.25", "a22.5", "a30"):
            assert result[name] == pytest.approx(want[name], rel=1e-12), name
        assert result["median"] == pytest.approx(want["median"], abs=MEDIAN_BIN_DEGREES)


def test_perfect_and_opposite_predictions():
    rng = np.random.default_rng(2)
    gt = random_normals(rng, (4, 5))
    perfect = compute_normal_metrics(gt[None], gt[None])
    assert perfect["mean"] == pytest.approx(0, abs=1e-6) and perfect["a11.25"] == 1.0
    opposite = compute_normal_metrics(-gt[None], gt[None])
    assert opposite["mean"] == pytest.approx(180.0) and opposite["a30"] == 0.0
    assert opposite["median"] == pytest.approx(180.0, abs=MEDIAN_BIN_DEGREES)


def test_bad_inputs_are_rejected():
    gt = np.zeros((3, 4, 4))
    with pytest.raises(ValueError, match="No valid ground-truth normal"):
        compute_normal_metrics(gt[None], gt[None])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        compute_normal_metrics(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        compute_normal_metrics(np.ones((2, 3, 4, 4)), np.ones((1, 3, 4, 4)))
    with pytest.raises(TypeError, match="predictions"):
        compute_normal_metrics(np.ones((1, 3, 4, 4), dtype=np.int64), np.ones((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="differ in shape"):
        angular_errors(np.ones((3, 4, 4)), np.ones((3, 4, 5)))
