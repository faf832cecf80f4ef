#!/usr/bin/env python
"""The offline main job: fine-tune a small VPD on synthetic scenes on CPU in a few minutes, evaluate it against a trivial
baseline, save it, reload it with `from_pretrained`, and write example predictions and the training curve as PNGs.

    python scripts/quickstart.py                      # depth (default)
    python scripts/quickstart.py --task segmentation  # or: referring
    python scripts/quickstart.py --task multitask     # depth + segmentation + normals from one backbone pass

Everything runs through the same code as `scripts/train.py` / `scripts/evaluate.py` and real datasets: the synthetic
scenes are written as parquet in the Hub layouts and read back by the dataset adapters. The "Stable Diffusion" is a
tiny random one (the Hub is not reachable here), so unlike real VPD fine-tuning its UNet learns from scratch: the
quickstart trains it at the full learning rate (`--unet_lr_mult 1`), not at the recipes' x0.01 / x0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vpd_hf import TASK_MODEL_CLASSES, VPDImageProcessor, VPDProcessor
from vpd_hf.data import decode_normals, dense_dataset, depth_dataset, referring_dataset, segmentation_dataset
from vpd_hf.data.loading import load_splits
from vpd_hf.data.synthetic import SYNTHETIC_ID2LABEL, save_synthetic_dataset
from vpd_hf.metrics import compute_depth_metrics, compute_mean_iou, compute_normal_metrics, compute_referring_metrics
from vpd_hf.training import TrainConfig
from vpd_hf.training.evaluation import (
    EvaluationOptions,
    dense_predictions,
    depth_predictions,
    referring_predictions,
    segmentation_predictions,
)
from vpd_hf.training.trainer import TRAINING_LOG, train
from vpd_hf.visualization import colorize_depth, overlay_mask, overlay_segmentation, plot_curve, visualize_normals

logger = logging.getLogger("quickstart")

# Small enough for a few CPU minutes, large enough to learn the synthetic geometry. A random tiny "Stable Diffusion"
# knows nothing about language, and a referent covers ~4 % of the pixels: from scratch, the official loss weights
# (0.9, 1.1) with detached attention maps and a frozen text encoder settle on the empty mask within this budget, so the
# referring quickstart weights the referent higher and lets the grounding train (attention maps and text encoder).
SETTINGS = {
    "depth": {"max_steps": 400, "learning_rate": 1e-3, "lr_schedule": "rise_fall", "min_lr_ratio": 0.06},
    "segmentation": {"max_steps": 600, "learning_rate": 1e-3, "lr_schedule": "poly_warmup", "warmup_steps": 30,
                     "lr_power": 1.0, "min_lr_ratio": 0.0},
    "referring": {"max_steps": 450, "learning_rate": 1e-3, "lr_schedule": "poly_warmup", "warmup_steps": 20,
                  "lr_power": 1.0, "min_lr_ratio": 0.0,
                  "model_overrides": {"referring_loss_weights": [0.5, 2.0], "detach_attention_maps": False,
                                      "train_text_encoder": True}},
    # One model, three heads, one backbone pass per image: the depth recipe's schedule, the three losses weighted 1.
    "multitask": {"max_steps": 300, "learning_rate": 1e-3, "lr_schedule": "rise_fall", "min_lr_ratio": 0.06,
                  "tasks": ["depth", "segmentation", "normals"]},
}  # fmt: skip
DENSE = ("depth", "segmentation", "normals")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(SETTINGS), default="depth", help="which VPD task to train")
    parser.add_argument("--output", type=Path, default=Path("outputs/quickstart"), help="folder for everything written")
    parser.add_argument("--size", type=int, default=96, help="side of the synthetic images")
    parser.add_argument("--num-train", type=int, default=320, help="synthetic training images")
    parser.add_argument("--num-eval", type=int, default=48, help="synthetic evaluation images")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the task's setting)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default: the task's)")
    parser.add_argument("--examples", type=int, default=4, help="example predictions to draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, model and training")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=DENSE,
        default=None,
        help="multitask: the heads (default: all three); one head trains the same pipeline as a single-task model",
    )
    return parser.parse_args()


def baseline(task: str, train_raw, eval_items: list[dict], tasks: tuple[str, ...] = DENSE) -> dict[str, float]:
    """A trivial predictor's metrics on the same evaluation items: the mean training depth everywhere / the most
    frequent training class everywhere / the mean training normal everywhere / an empty mask. For `multitask`, each
    task's under `{task}/{metric}`."""
    if task == "multitask":
        results = {}
        keys = {"depth": "depth_labels", "segmentation": "segmentation_labels", "normals": "normal_labels"}
        for name in tasks:
            items = [{"labels": item[keys[name]]} for item in eval_items]
            results |= {f"{name}/{k}": v for k, v in baseline(name, train_raw, items).items()}
        return results
    if task == "depth":
        depths = [np.asarray(row["depth_map"], dtype=np.float64) for row in train_raw]
        mean_depth = float(np.mean([d[d > 0].mean() for d in depths]))
        predictions = [torch.full_like(item["labels"], mean_depth) for item in eval_items]
        return compute_depth_metrics(predictions, [item["labels"] for item in eval_items])
    if task == "segmentation":
        counts = np.bincount(np.concatenate([np.asarray(row["annotation"]).ravel() for row in train_raw]))
        counts[0] = 0  # "other" is ignored after label reduction
        majority = int(counts.argmax()) - 1
        predictions = [torch.full_like(item["labels"], majority) for item in eval_items]
        return compute_mean_iou(predictions, [item["labels"] for item in eval_items], num_labels=len(counts) - 1)
    if task == "normals":
        normals = np.concatenate([decode_normals(np.asarray(row["normal_map"])).reshape(-1, 3) for row in train_raw])
        mean = torch.from_numpy(normals[np.any(normals != 0, axis=1)].mean(axis=0)).float()
        predictions = [mean[:, None, None].expand_as(item["labels"]) for item in eval_items]
        return compute_normal_metrics(predictions, [item["labels"] for item in eval_items])
    predictions = [torch.zeros_like(item["labels"], dtype=torch.bool) for item in eval_items]
    return compute_referring_metrics(predictions, [item["labels"] == 1 for item in eval_items])


HEADLINE = {"depth": ("rmse", "RMSE (m)", "lower"), "segmentation": ("mean_iou", "mIoU", "higher"),
            "referring": ("overall_iou", "oIoU", "higher"), "normals": ("mean", "mean angle (deg)", "lower")}  # fmt: skip


def draw_examples(task: str, model, eval_items: list[dict], count: int, path: Path, tasks: tuple = DENSE) -> None:
    """Input | prediction | ground truth, one row per example."""
    options = EvaluationOptions(depth_windows=2, flip=True, segmentation_mode="whole")
    chosen: list[dict] = []
    for item in eval_items:  # referring: one expression per picture, so that the rows show different scenes
        if not any(torch.equal(item["pixel_values"], other["pixel_values"]) for other in chosen):
            chosen.append(item)
        if len(chosen) == count:
            break
    rows = []
    for item in chosen:
        batch = {k: (v[None] if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()}
        image = ((item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        if task == "multitask":
            panels = [Image.fromarray(image), *multitask_panels(model, batch, item, image, options, tasks)]
        elif task == "depth":
            prediction = depth_predictions(model, batch, options)[0]
            scale = {"vmin": float(item["labels"][item["labels"] > 0].min()), "vmax": float(item["labels"].max())}
            panels = [
                Image.fromarray(image),
                colorize_depth(prediction, **scale),
                colorize_depth(item["labels"], **scale),
            ]
        elif task == "segmentation":
            prediction = segmentation_predictions(model, batch, options)[0]
            names = {k - 1: v for k, v in SYNTHETIC_ID2LABEL.items() if k}
            panels = [
                Image.fromarray(image),
                overlay_segmentation(image, prediction.numpy(), names, legend=False),
                overlay_segmentation(image, item["labels"].numpy(), names, legend=False),
            ]
        else:
            prediction = referring_predictions(model, batch, options)[0]
            panels = [
                overlay_mask(image, np.zeros(image.shape[:2], bool), caption=item["sentence"][:28]),
                overlay_mask(image, prediction.numpy(), caption="prediction"),
                overlay_mask(image, item["labels"].numpy() == 1, color=(64, 200, 64), caption="ground truth"),
            ]
        rows.append(panels)
    width = sum(p.width for p in rows[0]) + 8 * (len(rows[0]) - 1)
    height = max(p.height for p in rows[0])
    canvas = Image.new("RGB", (width, height * len(rows) + 8 * (len(rows) - 1) + 18), (255, 255, 255))
    title = (
        "input | " + " | ".join(f"{name}: prediction, truth" for name in tasks)
        if task == "multitask"
        else ("input | prediction | ground truth")
    )
    ImageDraw.Draw(canvas).text((4, 2), title, fill=(0, 0, 0))
    for r, panels in enumerate(rows):
        x = 0
        for panel in panels:
            canvas.paste(panel, (x, 18 + r * (height + 8)))
            x += panel.width + 8
    canvas.save(path)


def multitask_panels(
    model, batch: dict, item: dict, image: np.ndarray, options: EvaluationOptions, tasks: tuple
) -> list:
    """Each task's prediction for one image from ONE pass (plus its mirror), each next to its ground truth."""
    predictions = dense_predictions(model, batch, options, tasks)
    panels = []
    if "depth" in tasks:
        depth = item["depth_labels"]
        scale = {"vmin": float(depth[depth > 0].min()), "vmax": float(depth.max())}
        panels += [colorize_depth(predictions["depth"][0], **scale), colorize_depth(depth, **scale)]
    if "segmentation" in tasks:
        names = {k - 1: v for k, v in SYNTHETIC_ID2LABEL.items() if k}
        panels += [
            overlay_segmentation(image, predictions["segmentation"][0].numpy(), names, legend=False),
            overlay_segmentation(image, item["segmentation_labels"].numpy(), names, legend=False),
        ]
    if "normals" in tasks:
        panels += [visualize_normals(predictions["normals"][0]), visualize_normals(item["normal_labels"])]
    return panels


def _jsonable(value):
    return value.tolist() if hasattr(value, "tolist") else float(value)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    output = args.output / args.task
    output.mkdir(parents=True, exist_ok=True)

    data_dir = save_synthetic_dataset(
        output / "data", num_train=args.num_train, num_validation=args.num_eval, height=args.size, width=args.size,
        seed=args.seed, progress=False,
    )  # fmt: skip
    logger.info("1. wrote %d + %d synthetic scenes (%dx%d) to %s", args.num_train, args.num_eval, args.size,
                args.size, data_dir)  # fmt: skip

    settings = dict(SETTINGS[args.task])
    if args.tasks is not None:
        if args.task != "multitask":
            raise SystemExit("--tasks goes with --task multitask")
        settings["tasks"] = list(args.tasks)
    if args.steps is not None:
        settings["max_steps"] = args.steps
    if args.learning_rate is not None:
        settings["learning_rate"] = args.learning_rate
    config = TrainConfig(
        task="multitask" if args.task == "multitask" else args.task,
        model="tiny-random",
        dataset=str(data_dir),
        output_dir=str(output / "model"),
        crop_size=args.size,
        token_length=16,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        weight_decay=0.01,
        unet_lr_mult=1.0,
        logging_steps=max(1, min(10, settings["max_steps"] // 10)),
        eval_segmentation_mode="whole",
        seed=args.seed,
        **settings,
    )
    logger.info("2. training a tiny VPD for %s (%d steps, batch %d) ...", args.task, config.max_steps, args.batch_size)
    result = train(config)

    logger.info("3. reloading the saved model with from_pretrained and evaluating ...")
    model = TASK_MODEL_CLASSES[args.task].from_pretrained(config.output_dir).eval()
    tasks = tuple(config.tasks) if args.task == "multitask" else (args.task,)
    splits = load_splits(data_dir, "referring" if args.task == "referring" else "scenes")
    if args.task == "multitask":
        eval_set = dense_dataset(splits["validation"], "eval", tasks=tasks, num_labels=model.config.num_labels)
    elif args.task == "depth":
        eval_set = depth_dataset(splits["validation"], "eval", scene_names=model.config.prompt_names)
    elif args.task == "segmentation":
        eval_set = segmentation_dataset(
            splits["validation"], "eval", img_scale=(4 * args.size, args.size), num_labels=model.config.num_labels
        )
    else:
        processor = VPDProcessor.from_pretrained(config.output_dir)
        eval_set = referring_dataset(splits["validation"], "eval", processor.tokenizer, token_length=16,
                                     image_size=args.size)  # fmt: skip
    eval_items = [eval_set[i] for i in range(len(eval_set))]
    metrics = result["metrics"]
    trivial = baseline(args.task, splits["train"], eval_items, tasks)

    draw_examples(args.task, model, eval_items, args.examples, output / "examples.png", tasks)
    history = [json.loads(line) for line in (Path(config.output_dir) / TRAINING_LOG).read_text().splitlines()]
    plot_curve([(h["step"], h["loss"]) for h in history], title=f"training loss ({args.task})").save(
        output / "training_curve.png"
    )
    # the logged training losses too: continuous, where the metrics of a barely trained model flip on ties
    losses = [[h["step"], h["loss"]] for h in history if "loss" in h]
    report = {
        "task": args.task,
        "metrics": metrics,
        "baseline": trivial,
        "steps": result["global_step"],
        "losses": losses,
    }
    if args.task == "multitask":
        report["tasks"] = list(tasks)
    (output / "results.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    if args.task != "referring":
        VPDImageProcessor.from_pretrained(config.output_dir)  # the processor reloads too

    for task in tasks:
        key, name, better = HEADLINE[task]
        prefix = f"{task}/" if args.task == "multitask" else ""
        ours, theirs = metrics[prefix + key], trivial[prefix + key]
        logger.info("")
        logger.info("%-28s %16s", "", name)
        logger.info("%-28s %16.4f", "VPD (tiny, trained)", ours)
        logger.info("%-28s %16.4f", {"depth": "mean-depth baseline", "segmentation": "majority-class baseline",
                                     "normals": "mean-normal baseline", "referring": "empty-mask baseline"}[task],
                    theirs)  # fmt: skip
        beats = ours < theirs if better == "lower" else ours > theirs
        logger.info("(%s is better: the model %s the baseline)", better, "beats" if beats else "does NOT beat")
    logger.info("")
    for file in ("examples.png", "training_curve.png", "results.json"):
        logger.info("wrote %s", output / file)
    logger.info("model: %s (loads with %s.from_pretrained)", config.output_dir, TASK_MODEL_CLASSES[args.task].__name__)
    logger.info("done in %.0f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
