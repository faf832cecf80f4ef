"""Mean IoU against hand-computed values and evaluate's documented example."""

import math

import numpy as np
import pytest
import torch

from vpd_hf.metrics import MEAN_IOU_KEYS, MeanIoU, MeanIoUAccumulator, compute_mean_iou

# evaluate's `mean_iou` docstring example and its printed result (an independent reference).
EVALUATE_PREDICTED = [
    np.array([[1, 2], [3, 4], [5, 255]]),
    np.array([[2, 7], [9, 2], [3, 6]]),
    np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]]),
]
EVALUATE_ACTUAL = [
    np.array([[0, 3], [5, 4], [6, 255]]),
    np.array([[1, 7], [9, 2], [3, 6]]),
    np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]]),
]


def test_matches_evaluates_documented_example():
    result = compute_mean_iou(EVALUATE_PREDICTED, EVALUATE_ACTUAL, num_labels=10, ignore_index=255)
    assert tuple(result) == MEAN_IOU_KEYS
    assert result["mean_iou"] == pytest.approx(0.47750000000000004)
    assert result["mean_accuracy"] == pytest.approx(0.5916666666666666)
    assert result["overall_accuracy"] == pytest.approx(0.5263157894736842)
    np.testing.assert_allclose(result["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])
    np.testing.assert_allclose(result["per_category_accuracy"], [0, 0, 0.75, 2 / 3, 1, 0, 0.5, 1, 1, 1])


def test_hand_computed_example_with_ignored_pixels_and_absent_classes():
    pred = torch.tensor([[0, 1, 1], [2, 2, 3]])
    gt = torch.tensor([[0, 1, 255], [2, 1, 0]])
    # Valid pixels (gt != 255): (g0,p0) (g1,p1) (g2,p2) (g1,p2) (g0,p3).
    # intersect [1,1,1,0,0], gt area [2,2,1,0,0], pred area [1,1,2,1,0] -> union [2,2,2,1,0].
    result = compute_mean_iou([pred], [gt], num_labels=5)
    np.testing.assert_allclose(result["per_category_iou"][:4], [0.5, 0.5, 0.5, 0.0])
    assert math.isnan(result["per_category_iou"][4])  # absent from prediction and ground truth
    assert math.isnan(result["per_category_accuracy"][3]) and math.isnan(result["per_category_accuracy"][4])
    assert result["mean_iou"] == pytest.approx(0.375)  # NaN classes left out of the mean
    assert result["mean_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert result["overall_accuracy"] == pytest.approx(3 / 5)
    filled = compute_mean_iou([pred], [gt], num_labels=5, nan_to_num=0)
    assert filled["per_category_iou"][4] == 0 and filled["mean_iou"] == pytest.approx(0.375)


def test_reduce_labels_and_label_map():
    # ADE-style ground truth: 0 = other (ignored), k = class k - 1.
    gt = np.array([[0, 1, 2], [2, 3, 255]])
    pred = np.array([[2, 0, 1], [0, 2, 1]])
    reduced = compute_mean_iou([pred], [gt], num_labels=3, reduce_labels=True)
    explicit = compute_mean_iou([pred], [np.array([[255, 0, 1], [1, 2, 255]])], num_labels=3)
    for key in MEAN_IOU_KEYS:
        np.testing.assert_allclose(reduced[key], explicit[key])
    mapped = compute_mean_iou([pred], [gt], num_labels=3, label_map={3: 0})
    expected = compute_mean_iou([pred], [np.array([[0, 1, 2], [2, 0, 255]])], num_labels=3)
    np.testing.assert_allclose(mapped["per_category_iou"], expected["per_category_iou"])


def test_streaming_equals_one_shot_and_exposes_the_confusion_matrix():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 6, (5, 7)) for _ in range(6)]
    refs = [np.where(rng.random((5, 7)) < 0.1, 255, rng.integers(0, 6, (5, 7))) for _ in range(6)]
    accumulator = MeanIoUAccumulator(num_labels=6)
    accumulator.update(torch.tensor(np.stack(preds[:3])), torch.tensor(np.stack(refs[:3])))  # (B, H, W) batch
    for p, r in zip(preds[3:], refs[3:], strict=True):
        accumulator.update(p, r)
    one_shot = compute_mean_iou(preds, refs, num_labels=6)
    streamed = accumulator.compute()
    for key in MEAN_IOU_KEYS:
        np.testing.assert_allclose(streamed[key], one_shot[key])
    confusion = accumulator.confusion
    all_pred, all_ref = np.concatenate([p.ravel() for p in preds]), np.concatenate([r.ravel() for r in refs])
    keep = all_ref != 255
    assert int(confusion.sum()) == int(keep.sum()) and accumulator.num_images == 6
    assert int(confusion[2, 4]) == int(((all_ref == 2) & (all_pred == 4) & keep).sum())


def test_out_of_range_values_follow_evaluate():
    # A prediction of 7 (out of range) counts for its label's area only; a ground truth of 9 (not ignored) counts
    # for its prediction's area only.
    result = compute_mean_iou([np.array([[7, 1]])], [np.array([[1, 9]])], num_labels=3)
    assert result["per_category_iou"][1] == 0.0  # gt 1 (area 1) + pred 1 (area 1), no overlap: union 2
    assert result["per_category_accuracy"][1] == 0.0


def test_bad_inputs():
    with pytest.raises(TypeError, match="integer class indices"):
        compute_mean_iou([np.zeros((2, 2), np.float32)], [np.zeros((2, 2), np.int64)], num_labels=2)
    with pytest.raises(ValueError, match="same shape"):
        compute_mean_iou([np.zeros((2, 2), int)], [np.zeros((2, 3), int)], num_labels=2)
    with pytest.raises(ValueError, match="`num_labels` must be a positive integer"):
        MeanIoUAccumulator(num_labels=0)


def test_evaluate_metric_offline(tmp_path):
    metric = MeanIoU(num_labels=10, ignore_index=255, cache_dir=str(tmp_path))
    metric.add_batch(predictions=EVALUATE_PREDICTED[:2], references=EVALUATE_ACTUAL[:2])
    metric.add(prediction=EVALUATE_PREDICTED[2], reference=EVALUATE_ACTUAL[2])
    result = metric.compute()
    assert result["mean_iou"] == pytest.approx(0.47750000000000004)
    assert result["overall_accuracy"] == pytest.approx(0.5263157894736842)
    ade = MeanIoU(num_labels=3, reduce_labels=True, nan_to_num=-1, cache_dir=str(tmp_path))
    out = ade.compute(predictions=[np.array([[2, 0, 1], [0, 2, 1]])], references=[np.array([[0, 1, 2], [2, 3, 255]])])
    assert (
        out["per_category_iou"].tolist()
        == compute_mean_iou(
            [np.array([[2, 0, 1], [0, 2, 1]])],
            [np.array([[0, 1, 2], [2, 3, 255]])],
            3,
            nan_to_num=-1,
            reduce_labels=True,
        )["per_category_iou"].tolist()
    )
