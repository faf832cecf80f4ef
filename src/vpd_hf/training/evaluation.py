"""Evaluation protocols of the three tasks, for periodic evaluation during training and `scripts/evaluate.py`.

* depth (NYUv2): shifted square windows + flip (:func:`vpd_hf.inference.shifted_window_depth`), metrics on
  `min_depth < gt < max_depth` and, for 480x640 frames, inside the Eigen crop; per-image averages;
* segmentation (ADE20K): the model's test procedure (slide 512/341, optional multi-scale + flip), predictions resized
  to the annotation's original size, mean IoU from summed confusion matrices;
* referring (RefCOCO): every expression, masks at the label resolution (the LAVT protocol), overall / mean IoU and
  precision@X;
* normals (NYUv2 normals protocol): the whole image and, with `flip`, its mirror (normals mirrored back with x
  negated), averaged and renormalised; mean / median / RMSE angle and % within 11.25 / 22.5 / 30 degrees pooled over
  the valid pixels (:mod:`vpd_hf.metrics.normals`);
* multitask (`VPDModelForDensePrediction`): ONE pass per image (plus its mirror with `flip`) gives every task's
  prediction -- depth averaged with the mirrored one, segmentation probabilities likewise (logits upsampled to the
  image, then to the annotation's size), normals as above -- and each task's metrics under `{task}/{metric}` keys.
  No shifted windows or sliding windows: they would cost a pass per window for every task; on images no larger than
  the training crop (the synthetic scenes) they are the whole image anyway, so a single-task model evaluated with
  `eval_segmentation_mode=whole` sees the same views.

With an `accelerate.Accelerator`, each process evaluates its shard and the per-sample statistics are gathered with
`gather_for_metrics`, which drops the samples duplicated to even out the last batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.dense import DENSE_TASKS, LABEL_KEYS
from ..inference import shifted_window_depth
from ..metrics.depth import DEPTH_METRIC_NAMES, NYU_SHAPE, DepthMetricAccumulator, image_depth_metrics
from ..metrics.normals import NORMAL_THRESHOLDS, NUM_HISTOGRAM_BINS, NormalMetricAccumulator, image_normal_statistics
from ..metrics.referring import intersection_and_union, metrics_from_counts
from ..metrics.segmentation import MeanIoUAccumulator, metrics_from_confusion


@dataclass
class EvaluationOptions:
    depth_windows: int = 2
    flip: bool = True
    eigen_crop: bool | None = None  # None: on for 480x640 frames
    min_depth: float = 1e-3
    max_depth: float | None = None  # None: the model's max_depth
    segmentation_mode: str = "slide"
    scales: list[float] = field(default_factory=lambda: [1.0])
    ignore_index: int = 255
    threshold: float = 0.5

    @classmethod
    def from_config(cls, config: Any) -> EvaluationOptions:
        """The test-time options given on the command line (`TrainConfig.eval_*`)."""
        return cls(depth_windows=config.eval_depth_windows, flip=config.eval_flip,
                   segmentation_mode=config.eval_segmentation_mode, scales=list(config.eval_scales))  # fmt: skip


def _valid_size(pixel_mask: torch.Tensor | None, index: int, shape: tuple[int, int]) -> tuple[int, int]:
    if pixel_mask is None:
        return shape
    mask = pixel_mask[index]
    return int(mask.any(dim=1).sum()), int(mask.any(dim=0).sum())


def _gather(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if accelerator is None else accelerator.gather_for_metrics(tensor)


@torch.no_grad()
def depth_predictions(model: Any, batch: dict[str, Any], options: EvaluationOptions) -> list[torch.Tensor]:
    """Per-image depth `(h, w)` (padding removed) under the official test procedure."""
    pixel_values, pixel_mask = batch["pixel_values"], batch.get("pixel_mask")
    scene_ids = batch.get("scene_ids")
    results = []
    for index in range(pixel_values.shape[0]):
        height, width = _valid_size(pixel_mask, index, pixel_values.shape[-2:])
        image = pixel_values[index : index + 1, :, :height, :width]
        scene = None if scene_ids is None else scene_ids[index : index + 1]

        def predict(views: torch.Tensor, scene: torch.Tensor | None = scene) -> torch.Tensor:
            ids = None if scene is None else scene.expand(views.shape[0])
            return model(pixel_values=views, scene_ids=ids).predicted_depth

        results.append(shifted_window_depth(predict, image, options.depth_windows, options.flip)[0])
    return results


@torch.no_grad()
def segmentation_predictions(model: Any, batch: dict[str, Any], options: EvaluationOptions) -> list[torch.Tensor]:
    """Per-image label maps at the size of each image's `labels` (the original annotation size)."""
    unwrapped = getattr(model, "module", model)
    logits = unwrapped.segmentation_logits(
        batch["pixel_values"],
        batch.get("pixel_mask"),
        mode=options.segmentation_mode,
        scales=options.scales,
        flip=options.flip,
    )
    labels = batch["labels"]
    predictions = []
    for index in range(logits.shape[0]):
        height, width = _valid_size(batch.get("pixel_mask"), index, logits.shape[-2:])
        target = batch["original_sizes"][index] if "original_sizes" in batch else labels[index].shape[-2:]
        scores = F.interpolate(
            logits[index : index + 1, :, :height, :width], size=tuple(int(v) for v in target), mode="bilinear"
        )
        predictions.append(scores[0].argmax(dim=0))
    return predictions


@torch.no_grad()
def referring_predictions(model: Any, batch: dict[str, Any], options: EvaluationOptions) -> list[torch.Tensor]:
    """Per-expression binary masks at the label resolution."""
    inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "pixel_mask", "image_indices") if key in batch}
    outputs = model(**inputs)
    probabilities = outputs.foreground_probability(size=batch["labels"].shape[-2:])
    return list(probabilities > options.threshold)


@torch.no_grad()
def dense_predictions(
    model: Any, batch: dict[str, Any], options: EvaluationOptions, tasks: tuple[str, ...]
) -> dict[str, list[torch.Tensor]]:
    """Per-image predictions of a normals or multi-task model from one pass per image (and its mirror with
    `options.flip`): `{"depth": [(h, w)], "segmentation": [(H_label, W_label) class maps], "normals": [(3, h, w)]}`
    for `tasks`, padding removed (see the module docstring)."""
    pixel_values, pixel_mask = batch["pixel_values"], batch.get("pixel_mask")
    scene_ids = batch.get("scene_ids")
    results: dict[str, list[torch.Tensor]] = {task: [] for task in tasks}
    for index in range(pixel_values.shape[0]):
        height, width = _valid_size(pixel_mask, index, pixel_values.shape[-2:])
        image = pixel_values[index : index + 1, :, :height, :width]
        views = torch.cat([image, image.flip(-1)]) if options.flip else image
        inputs: dict[str, Any] = {"pixel_values": views}
        if scene_ids is not None:
            inputs["scene_ids"] = scene_ids[index : index + 1].expand(views.shape[0])
        outputs = model(**inputs)
        if "depth" in tasks:
            depth = outputs.predicted_depth.float()
            results["depth"].append(depth.mean(0) if not options.flip else (depth[0] + depth[1].flip(-1)) / 2)
        if "segmentation" in tasks:
            scores = F.interpolate(outputs.logits.float(), size=(height, width), mode="bilinear").softmax(dim=1)
            scores = scores[0] if not options.flip else (scores[0] + scores[1].flip(-1)) / 2
            target = batch["original_sizes"][index] if "original_sizes" in batch else (height, width)
            scores = F.interpolate(scores[None], size=tuple(int(v) for v in target), mode="bilinear")[0]
            results["segmentation"].append(scores.argmax(dim=0))
        if "normals" in tasks:
            normals = outputs.predicted_normals.float()
            if options.flip:  # the mirror's normals, mirrored back: x changes sign
                mirrored = normals[1].flip(-1) * normals.new_tensor([-1.0, 1.0, 1.0])[:, None, None]
                normals = (normals[0] + mirrored)[None]
            results["normals"].append(F.normalize(normals[0], dim=0))
    return results


def _depth_rows(
    predictions: list[torch.Tensor], labels: torch.Tensor, options: EvaluationOptions, max_depth: float
) -> list[list[float]]:
    rows = []
    for index, prediction in enumerate(predictions):
        target = labels[index, : prediction.shape[0], : prediction.shape[1]]
        crop = options.eigen_crop if options.eigen_crop is not None else tuple(target.shape) == NYU_SHAPE
        values = image_depth_metrics(prediction, target, options.min_depth, max_depth, crop)
        row = [0.0] * len(DEPTH_METRIC_NAMES) if values is None else [values[n] for n in DEPTH_METRIC_NAMES]
        rows.append([*row, float(values is not None)])
    return rows


def _segmentation_rows(
    predictions: list[torch.Tensor], labels: torch.Tensor, num_labels: int, options: EvaluationOptions
) -> list[list[int]]:
    accumulator = MeanIoUAccumulator(num_labels, ignore_index=options.ignore_index)
    rows = []
    for index, prediction in enumerate(predictions):
        target = labels[index, : prediction.shape[0], : prediction.shape[1]]
        rows.append(accumulator.image_confusion(prediction.cpu(), target.cpu()).flatten().tolist())
    return rows


def _normal_rows(predictions: list[torch.Tensor], labels: torch.Tensor) -> list[list[float]]:
    """Per image: count, error sum, squared sum, counts within the thresholds, then the dense error histogram."""
    rows = []
    for index, prediction in enumerate(predictions):
        target = labels[index, :, : prediction.shape[-2], : prediction.shape[-1]]
        stats = image_normal_statistics(prediction.cpu(), target.cpu())
        histogram = torch.zeros(NUM_HISTOGRAM_BINS, dtype=torch.float64)
        histogram[torch.tensor(stats["bins"], dtype=torch.long)] = torch.tensor(
            stats["bin_counts"], dtype=torch.float64
        )
        rows.append([stats["count"], stats["sum"], stats["sum_sq"], *stats["within"], *histogram.tolist()])
    return rows


def _finish(task: str, stats: torch.Tensor, options: EvaluationOptions, num_labels: int | None) -> dict[str, Any]:
    """The metrics of `task` from the gathered per-image rows."""
    if task == "depth":
        accumulator = DepthMetricAccumulator(options.min_depth)
        for row in stats.double().tolist():
            accumulator.add(dict(zip(DEPTH_METRIC_NAMES, row[:-1], strict=True)) if row[-1] else None)
        return accumulator.compute()
    if task == "segmentation":
        size = num_labels + 1
        results = metrics_from_confusion(stats.sum(dim=0).reshape(size, size))
        results["per_category_iou"] = results["per_category_iou"].tolist()
        results["per_category_accuracy"] = results["per_category_accuracy"].tolist()
        results["num_images"] = int(stats.shape[0])
        return results
    if task == "normals":
        accumulator = NormalMetricAccumulator()
        split = 3 + len(NORMAL_THRESHOLDS)
        for row in stats.double():
            histogram = row[split:].long()
            bins = torch.nonzero(histogram).flatten()
            accumulator.add({"count": int(row[0]), "sum": float(row[1]), "sum_sq": float(row[2]),
                             "within": [int(v) for v in row[3:split]], "bins": bins.tolist(),
                             "bin_counts": histogram[bins].tolist()})  # fmt: skip
        return accumulator.compute()
    return metrics_from_counts(stats[:, 0].tolist(), stats[:, 1].tolist())


def evaluate(
    model: Any,
    dataloader: Any,
    task: str,
    options: EvaluationOptions | None = None,
    accelerator: Any = None,
    show_progress: bool = True,
    max_batches: int | None = None,
) -> dict[str, Any]:
    r"""
    Runs `task`'s protocol over `dataloader` (batches from the `vpd_hf.data` adapters) and returns its metrics
    (the same on every process); for `task="multitask"` the metrics of each of the model's tasks, keyed
    `"{task}/{metric}"` (e.g. `depth/rmse`, `segmentation/mean_iou`, `normals/mean`).
    """
    options = options or EvaluationOptions()
    unwrapped = getattr(model, "module", model)
    if task not in ("depth", "segmentation", "referring", "normals", "multitask"):
        raise ValueError(f"`task` must be depth, segmentation, referring, normals or multitask, got {task!r}.")
    tasks = tuple(getattr(unwrapped, "tasks", DENSE_TASKS)) if task == "multitask" else (task,)
    num_labels = getattr(unwrapped.config, "num_labels", None)
    was_training = model.training
    model.eval()
    disable = not show_progress or (accelerator is not None and not accelerator.is_local_main_process)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in tasks}
    for step, batch in enumerate(tqdm(dataloader, desc=f"Evaluating {task}", disable=disable)):
        if max_batches is not None and step >= max_batches:
            break
        # Single-task batches carry `labels`; multi-task ones `{task}_labels` (vpd_hf.data.dense).
        labels = {name: batch["labels" if task != "multitask" else LABEL_KEYS[name]] for name in tasks}
        if task in ("normals", "multitask"):
            predictions = dense_predictions(model, batch, options, tasks)
        elif task == "depth":
            predictions = {"depth": depth_predictions(model, batch, options)}
        elif task == "segmentation":
            predictions = {"segmentation": segmentation_predictions(model, batch, options)}
        else:
            predictions = {"referring": referring_predictions(model, batch, options)}
        for name in tasks:
            if name == "depth":
                max_depth = options.max_depth if options.max_depth is not None else float(unwrapped.config.max_depth)
                batch_rows, dtype = _depth_rows(predictions[name], labels[name], options, max_depth), torch.float64
            elif name == "segmentation":
                batch_rows, dtype = (
                    _segmentation_rows(predictions[name], labels[name], num_labels, options),
                    torch.int64,
                )
            elif name == "normals":
                batch_rows, dtype = _normal_rows(predictions[name], labels[name]), torch.float64
            else:
                target = labels[name]
                batch_rows = [
                    list(intersection_and_union(p.cpu(), (t == 1).cpu(), ignore=(t == 255).cpu()))
                    for p, t in zip(predictions[name], target, strict=True)
                ]
                dtype = torch.int64
            # One gather per batch: gather_for_metrics drops the duplicated tail samples of the last batch.
            device = labels[name].device
            rows[name].append(_gather(accelerator, torch.tensor(batch_rows, dtype=dtype, device=device)))
    model.train(was_training)
    if not rows[tasks[0]]:
        raise ValueError("The evaluation dataloader produced no batch.")
    if task != "multitask":
        return _finish(task, torch.cat(rows[task]).cpu(), options, num_labels)
    results: dict[str, Any] = {}
    for name in tasks:
        for key, value in _finish(name, torch.cat(rows[name]).cpu(), options, num_labels).items():
            results[f"{name}/{key}"] = value
    return results


def evaluate_checkpoint(config: Any, output_file: str | None = None) -> dict[str, Any]:
    r"""
    Loads the VPD checkpoint `config.model`, runs `config.task`'s protocol on `config.eval_split` of `config.dataset`
    (distributed with accelerate when launched on several processes) and returns the metrics, also written as JSON to
    `output_file` (main process).
    """
    import json
    from pathlib import Path

    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from ..data import collate_fn
    from .data import build_datasets, build_model_and_processor, load_raw_splits

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    _, eval_raw, id2label = load_raw_splits(config)
    model, processor = build_model_and_processor(config, id2label, accelerator)
    _, dataset = build_datasets(config, None, eval_raw, model, processor)
    batch_size = 1 if config.task == "segmentation" else config.per_device_eval_batch_size
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=config.num_workers)
    model, loader = accelerator.prepare(model, loader)
    options = EvaluationOptions.from_config(config)
    metrics = evaluate(model, loader, config.task, options, accelerator)
    if output_file and accelerator.is_main_process:
        path = Path(output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {"task": config.task, "model": config.model, "dataset": config.dataset,
                  "dataset_config": config.dataset_config, "split": config.eval_split,
                  "protocol": dataclasses.asdict(options), "metrics": metrics}  # fmt: skip
        path.write_text(json.dumps(report, indent=2))
    return metrics


__all__ = [
    "EvaluationOptions",
    "dense_predictions",
    "depth_predictions",
    "evaluate",
    "evaluate_checkpoint",
    "referring_predictions",
    "segmentation_predictions",
]
