"""Training/evaluation datasets and models from a :class:`TrainConfig` (the wiring; the work is in `vpd_hf.data`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .config import TrainConfig

logger = logging.getLogger(__name__)

TINY_SOURCE = "tiny-random"


def load_raw_splits(config: TrainConfig) -> tuple[Any, Any, dict[int, str] | None]:
    """The raw train / eval `datasets.Dataset`s (Hub layout) and, if the data names its classes, `id2label` in the
    annotation's numbering (0 = "other" for ADE-style labels)."""
    config_name = config.dataset_config or ("referring" if config.task == "referring" else "scenes")
    if config.dataset == "synthetic":
        from ..data.synthetic import SYNTHETIC_ID2LABEL, make_synthetic_dataset

        size = config.synthetic_size
        splits = make_synthetic_dataset(
            config.synthetic_num_train, config.synthetic_num_eval, size, size, seed=config.seed
        )[config_name]
        return splits["train"], splits["validation"], dict(SYNTHETIC_ID2LABEL)
    from ..data.loading import load_splits

    path = Path(config.dataset)
    id2label = None
    if path.is_dir() and (path / "id2label.json").is_file():
        id2label = {int(k): v for k, v in json.loads((path / "id2label.json").read_text()).items()}
    splits = load_splits(config.dataset, config_name if path.is_dir() else config.dataset_config)
    for split in (config.train_split, config.eval_split):
        if split not in splits:
            raise ValueError(f"Dataset {config.dataset!r} has no split {split!r}; it has {sorted(splits)}.")
    return splits[config.train_split], splits[config.eval_split], id2label


def class_names(id2label: dict[int, str] | None) -> list[str] | None:
    """Model class names from an ADE-style `id2label` (0 = "other", dropped by the label reduction)."""
    if not id2label:
        return None
    return [id2label[k] for k in sorted(id2label) if k != 0]


def processor_preset(config: TrainConfig) -> str:
    """The image processor's preset (`VPDImageProcessor.TASK_PRESETS`) for `config.task`: normals are framed as the
    NYUv2 depth frames; a multi-task model with segmentation takes the segmentation preset (ADE-style annotations are
    reduced, 512 short side), otherwise the depth one."""
    if config.task == "normals":
        return "depth"
    if config.task == "multitask":
        return "segmentation" if "segmentation" in config.tasks else "depth"
    return config.task


def _is_vpd_checkpoint(source: str) -> bool:
    path = Path(source)
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "vpd"
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source).model_type == "vpd"
    except (OSError, ValueError):
        return False


def tiny_model_overrides(task: str) -> dict[str, Any]:
    from ..testing_utils import TINY_DEPTH_HEAD, TINY_SEGMENTATION_HEAD

    # The normals head has the depth head's architecture; a multi-task model has both kinds of heads.
    heads = {"depth": TINY_DEPTH_HEAD, "normals": TINY_DEPTH_HEAD, "segmentation": TINY_SEGMENTATION_HEAD,
             "multitask": TINY_DEPTH_HEAD | TINY_SEGMENTATION_HEAD, "referring": {}}  # fmt: skip
    return heads[task] | ({"referring_decoder_channels": 32} if task == "referring" else {})


def build_model_and_processor(config: TrainConfig, id2label: dict[int, str] | None, accelerator: Any = None):
    """The task model and its processor: from a VPD checkpoint, a Stable Diffusion checkpoint, or `tiny-random`."""
    from ..image_processing_vpd import VPDImageProcessor
    from ..modeling_vpd import TASK_MODEL_CLASSES
    from ..processing_vpd import VPDProcessor

    model_class = TASK_MODEL_CLASSES[config.task]
    source, overrides = config.model, dict(config.model_overrides)
    if source == TINY_SOURCE:
        from ..testing_utils import save_tiny_stable_diffusion

        source = str(Path(config.output_dir) / "tiny-stable-diffusion")
        if accelerator is None or accelerator.is_main_process:
            save_tiny_stable_diffusion(source, seed=config.seed)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        overrides = tiny_model_overrides(config.task) | overrides

    if _is_vpd_checkpoint(source):
        model = model_class.from_pretrained(source)
        if config.task == "referring":
            processor = VPDProcessor.from_pretrained(source)
        else:
            try:
                processor = VPDImageProcessor.from_pretrained(source)
            except OSError:
                processor = VPDImageProcessor.for_task(processor_preset(config))
        return model, processor

    show_progress = accelerator is None or accelerator.is_local_main_process
    if config.task in ("depth", "normals"):
        kwargs: dict[str, Any] = {"show_progress": show_progress}
    elif config.task == "segmentation":
        kwargs = {"show_progress": show_progress, "class_names": class_names(id2label)}
    elif config.task == "multitask":
        kwargs = {"show_progress": show_progress, "tasks": tuple(config.tasks)}
        if "segmentation" in config.tasks:
            kwargs["class_names"] = class_names(id2label)
        if config.task_loss_weights is not None:
            kwargs["task_loss_weights"] = config.task_loss_weights
    else:
        kwargs = {"token_length": config.token_length}
    model = model_class.from_stable_diffusion(source, **kwargs, **overrides)
    if config.task == "referring":
        processor = VPDProcessor.from_stable_diffusion(source, token_length=config.token_length)
    else:
        processor = VPDImageProcessor.for_task(processor_preset(config))
    return model, processor


def build_datasets(config: TrainConfig, train_raw: Any, eval_raw: Any, model: Any, processor: Any) -> tuple[Any, Any]:
    """The adapters of `vpd_hf.data` over the raw splits (training augmentation / evaluation protocol); `train_raw`
    None (evaluation only) gives no training dataset."""
    from .. import data

    if train_raw is None:
        train_raw, build_train = eval_raw, False  # its columns stand for the training split's
    else:
        build_train = True
    if config.max_train_samples is not None:
        train_raw = train_raw.select(range(min(config.max_train_samples, len(train_raw))))
    if config.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(config.max_eval_samples, len(eval_raw))))
    common = {"image_column": config.image_column, "seed": config.seed}
    if config.task == "depth":
        scene_column = config.scene_column or ("scene" if "scene" in train_raw.column_names else None)
        options = {
            **common,
            "depth_column": config.label_column or "depth_map",
            "scene_column": scene_column,
            "scene_names": model.config.prompt_names,
            "max_depth": float(model.config.max_depth),
        }
        crop = config.crop_size or 480
        train = data.depth_dataset(train_raw, "train", crop_size=(crop, crop), **options) if build_train else None
        evaluation = data.depth_dataset(eval_raw, "eval", **options)
    elif config.task == "segmentation":
        options = {**common, "label_column": config.label_column or "annotation", "num_labels": model.config.num_labels}
        crop = config.crop_size or 512
        # The recipe's resize range is relative to its 512 crop: keep the ratio for other crop sizes.
        train = (
            data.segmentation_dataset(train_raw, "train", crop_size=(crop, crop), img_scale=(4 * crop, crop), **options)
            if build_train
            else None
        )
        evaluation = data.segmentation_dataset(eval_raw, "eval", img_scale=(4 * crop, crop), **options)
    elif config.task in ("normals", "multitask"):
        crop = config.crop_size or 480
        options = {
            **common,
            "normal_column": "normal_map" if config.task == "multitask" else config.label_column or "normal_map",
        }
        if config.task == "multitask":
            # The model's own heads: a checkpoint evaluated with the default `--task multitask` may have fewer.
            tasks = list(getattr(model, "tasks", config.tasks))
            options |= {"tasks": tasks, "label_column": config.label_column or "annotation",
                        "max_depth": float(model.config.max_depth)}  # fmt: skip
            if "segmentation" in tasks:
                options["num_labels"] = model.config.num_labels
            build = data.dense_dataset
        else:
            build = data.normals_dataset
        train = build(train_raw, "train", crop_size=(crop, crop), **options) if build_train else None
        evaluation = build(eval_raw, "eval", **options)
    else:
        tokenizer = processor.tokenizer
        options = {
            **common,
            "token_length": config.token_length,
            "image_root": config.image_root,
            "image_size": config.crop_size or 512,
        }
        train = data.referring_dataset(train_raw, "train", tokenizer, **options) if build_train else None
        evaluation = data.referring_dataset(eval_raw, "eval", tokenizer, **options)
    return train, evaluation


__all__ = [
    "TINY_SOURCE",
    "build_datasets",
    "build_model_and_processor",
    "class_names",
    "load_raw_splits",
    "processor_preset",
]
