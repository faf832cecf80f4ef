"""Evaluation protocols of the three tasks, for periodic evaluation during training and `scripts/evaluate.py`.

* depth (NYUv2): shifted square windows + flip (:func:`vpd_hf.inference.shifted_window_depth`), metrics on
  `min_depth < gt < max_depth` and, for 480x640 frames, inside the Eigen crop; per-image averages;
* segmentation (ADE20K): the model's test procedure (slide 512/341, optional multi-scale + flip), predictions resized
  to the annotation's original size, mean IoU from summed confusion matrices;
* referring (RefCOCO): every expression, masks at the label resolution (the LAVT protocol), overall / mean IoU and
  precision@X.

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

from ..inference import shifted_window_depth
from ..metrics.depth import DEPTH_METRIC_NAMES, NYU_SHAPE, DepthMetricAccumulator, image_depth_metrics
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
    (the same on every process).
    """
    options = options or EvaluationOptions()
    unwrapped = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    disable = not show_progress or (accelerator is not None and not accelerator.is_local_main_process)
    rows: list[torch.Tensor] = []
    for step, batch in enumerate(tqdm(dataloader, desc=f"Evaluating {task}", disable=disable)):
        if max_batches is not None and step >= max_batches:
            break
        labels = batch["labels"]
        batch_rows: list[list[float]] = []
        if task == "depth":
            max_depth = options.max_depth if options.max_depth is not None else float(unwrapped.config.max_depth)
            for index, prediction in enumerate(depth_predictions(model, batch, options)):
                target = labels[index, : prediction.shape[0], : prediction.shape[1]]
                crop = options.eigen_crop if options.eigen_crop is not None else tuple(target.shape) == NYU_SHAPE
                values = image_depth_metrics(prediction, target, options.min_depth, max_depth, crop)
                row = [0.0] * len(DEPTH_METRIC_NAMES) if values is None else [values[n] for n in DEPTH_METRIC_NAMES]
                batch_rows.append([*row, float(values is not None)])
            dtype = torch.float64
        elif task == "segmentation":
            accumulator = MeanIoUAccumulator(unwrapped.config.num_labels, ignore_index=options.ignore_index)
            for index, prediction in enumerate(segmentation_predictions(model, batch, options)):
                target = labels[index, : prediction.shape[0], : prediction.shape[1]]
                batch_rows.append(accumulator.image_confusion(prediction.cpu(), target.cpu()).flatten().tolist())
            dtype = torch.int64
        elif task == "referring":
            for index, prediction in enumerate(referring_predictions(model, batch, options)):
                target = labels[index]
                batch_rows.append(
                    list(intersection_and_union(prediction.cpu(), (target == 1).cpu(), ignore=(target == 255).cpu()))
                )
            dtype = torch.int64
        else:
            raise ValueError(f"`task` must be depth, segmentation or referring, got {task!r}.")
        # One gather per batch: gather_for_metrics drops the duplicated tail samples of the last batch.
        rows.append(_gather(accelerator, torch.tensor(batch_rows, dtype=dtype, device=labels.device)))
    model.train(was_training)
    if not rows:
        raise ValueError("The evaluation dataloader produced no batch.")
    stats = torch.cat(rows).cpu()
    if task == "depth":
        accumulator = DepthMetricAccumulator(options.min_depth)
        for row in stats.double().tolist():
            accumulator.add(dict(zip(DEPTH_METRIC_NAMES, row[:-1], strict=True)) if row[-1] else None)
        return accumulator.compute()
    if task == "segmentation":
        size = unwrapped.config.num_labels + 1
        results = metrics_from_confusion(stats.sum(dim=0).reshape(size, size))
        results["per_category_iou"] = results["per_category_iou"].tolist()
        results["per_category_accuracy"] = results["per_category_accuracy"].tolist()
        results["num_images"] = int(stats.shape[0])
        return results
    return metrics_from_counts(stats[:, 0].tolist(), stats[:, 1].tolist())


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


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """The evaluation command line (`scripts/evaluate.py`, `vpd-hf evaluate`): prints the metrics as JSON."""
    import json

    from .config import EVALUATION_OPTIONS, build_parser, config_from_arguments

    parser = build_parser(
        EVALUATION_OPTIONS,
        description="Evaluate a VPD checkpoint with its task's protocol (depth: shifted windows + flip, Eigen crop; "
        "segmentation: sliding windows, optional multi-scale + flip; referring: every expression); distributed "
        "under `accelerate launch`.",
        epilog="Example: accelerate launch scripts/evaluate.py --task depth --model vpd-depth-nyu "
        "--dataset data/nyu --eval_split validation --output_file vpd-depth-nyu/eval_results.json",
        prog=prog,
    )
    parser.add_argument("--output_file", default=None, help="Write the metrics here as JSON.")
    arguments = vars(parser.parse_args(argv))
    output_file = arguments.pop("output_file")
    metrics = evaluate_checkpoint(config_from_arguments(arguments), output_file)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    return metrics


__all__ = [
    "EvaluationOptions",
    "depth_predictions",
    "evaluate",
    "evaluate_checkpoint",
    "main",
    "referring_predictions",
    "segmentation_predictions",
]
