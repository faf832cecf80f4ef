"""Model cards generated from evaluation and training records, and uploads of VPD checkpoints to the Hub.

A card is a `huggingface_hub.ModelCard` rendered from the task's template (`vpd_hf/model_cards/{task}.md`) with a
`model-index` of the evaluation results (metric names as in the VPD paper's tables), `library_name`, `pipeline_tag`,
`base_model` (the Stable Diffusion checkpoint the model was built from, `config.base_model`, and its UNet family,
SD 1.x / 2.x / XL, from `config.unet_config`), the licence inherited
from those weights, datasets and tags. :func:`model_card_from_run` builds one from an output folder of
`scripts/train.py` / `scripts/evaluate.py`; :func:`push_to_hub` uploads a folder with its card.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from .backbones import FAMILY_NAMES, backbone_layout
from .configuration_vpd import SD15_UNET_CONFIG
from .modeling_vpd import TASK_MODEL_CLASSES

TASKS = tuple(TASK_MODEL_CLASSES)
# The Hub has no pipeline tag for surface normals; Marigold-style normal models are listed as image-to-image. A
# multi-task card takes the tag of its first task (depth when it has one: the depth pipeline loads the folder).
PIPELINE_TAGS = {"depth": "depth-estimation", "segmentation": "image-segmentation", "referring": "image-segmentation",
                 "normals": "image-to-image", "multitask": "depth-estimation"}  # fmt: skip
TASK_NAMES = {
    "depth": "Monocular depth estimation",
    "segmentation": "Semantic segmentation",
    "referring": "Referring image segmentation",
    "normals": "Surface normal estimation",
    "multitask": "Dense prediction (several tasks from one pass)",
}
TASK_TAGS = {"depth": ["depth-estimation"], "segmentation": ["semantic-segmentation"],
             "referring": ["referring-image-segmentation"], "normals": ["surface-normal-estimation"],
             "multitask": ["multi-task", "depth-estimation", "semantic-segmentation", "surface-normal-estimation"]}  # fmt: skip
MODEL_CLASSES = {task: model_class.__name__ for task, model_class in TASK_MODEL_CLASSES.items()}
# (metric key in vpd_hf's metrics, name in the VPD paper's tables, scale to the paper's unit, lower is better)
PAPER_METRICS: dict[str, list[tuple[str, str, float, bool]]] = {
    "depth": [("rmse", "RMSE", 1.0, True), ("abs_rel", "REL", 1.0, True), ("log10", "log10", 1.0, True),
              ("d1", "δ1", 1.0, False), ("d2", "δ2", 1.0, False), ("d3", "δ3", 1.0, False)],
    "segmentation": [("mean_iou", "mIoU", 100.0, False), ("mean_accuracy", "mAcc", 100.0, False),
                     ("overall_accuracy", "aAcc", 100.0, False)],
    "referring": [("overall_iou", "oIoU", 100.0, False), ("mean_iou", "mIoU", 100.0, False),
                  ("precision@0.5", "P@0.5", 100.0, False), ("precision@0.7", "P@0.7", 100.0, False),
                  ("precision@0.9", "P@0.9", 100.0, False)],
    # `vpd_hf.metrics` normals: angular errors in degrees, fractions of pixels within 11.25 / 22.5 / 30 degrees.
    "normals": [("mean", "mean°", 1.0, True), ("median", "median°", 1.0, True), ("rmse", "RMSE°", 1.0, True),
                ("a11.25", "11.25°", 100.0, False), ("a22.5", "22.5°", 100.0, False), ("a30", "30°", 100.0, False)],
}  # fmt: skip
# A multi-task model's evaluation names each metric `"{task}/{metric}"` (scripts/evaluate.py).
PAPER_METRICS["multitask"] = [
    (f"{task}/{key}", f"{task} {name}", scale, lower)
    for task in ("depth", "segmentation", "normals")
    for key, name, scale, lower in PAPER_METRICS[task]
]
# Card tag of the UNet family (SD 1.x models carry the generic "stable-diffusion" tag only, as before).
BACKBONE_TAGS = {"sd2": "stable-diffusion-2", "sdxl": "stable-diffusion-xl"}
SYNTHETIC_DATASET = ("vpd-hf/synthetic-scenes", "vpd_hf synthetic indoor scenes")
CITATION = """@inproceedings{zhao2023unleashing,
  title     = {Unleashing Text-to-Image Diffusion Models for Visual Perception},
  author    = {Zhao, Wenliang and Rao, Yongming and Liu, Zuyan and Liu, Benlin and Zhou, Jie and Lu, Jiwen},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""
# What an upload leaves out of an output folder: resumable checkpoints, logs, and the tiny test SD a run may write.
UPLOAD_IGNORE = ["checkpoints/*", "logs/*", "tiny-stable-diffusion/*", "*.tmp"]


def template_path(task: str) -> Path:
    """The card template of `task` shipped with the package (`vpd_hf/model_cards/{task}.md`)."""
    _check_task(task)
    return Path(str(files("vpd_hf") / "model_cards" / f"{task}.md"))


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")


def infer_license(base_model: str | None) -> str:
    """The licence a VPD model inherits from its Stable Diffusion weights: CreativeML OpenRAIL-M for SD 1.x,
    OpenRAIL++ for SD 2.x and SDXL (CreativeML Open RAIL++-M), Apache-2.0 for vpd_hf's random test weights, `other`
    when unknown (the card then asks the reader to check the base model's licence)."""
    name = (base_model or "").lower()
    if name in ("tiny-random", "") or name.endswith("tiny-stable-diffusion"):
        return "apache-2.0" if name else "other"
    if re.search(r"stable-diffusion-xl|sdxl|sd_xl", name):
        return "openrail++"
    if re.search(r"stable-diffusion-2|sd-?2|v2-1|stable-diffusion-v2", name):
        return "openrail++"
    if re.search(r"stable-diffusion-v1|v1-[1-5]|sd-?v?1[-._]|compvis/stable-diffusion", name):
        return "creativeml-openrail-m"
    return "other"


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repository id ("org/name") rather than a local folder."""
    return bool(name) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not Path(name).exists()


def _read_json(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if source is None or isinstance(source, Mapping):
        return None if source is None else dict(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{path} is not a file (expected a JSON written by scripts/train.py or scripts/evaluate.py).")
    return json.loads(path.read_text())


def results_table(task: str, metrics: Mapping[str, Any]) -> str:
    """Markdown table of the paper's metrics present in `metrics` (in the paper's units)."""
    header, values = [], []
    for key, name, scale, lower in PAPER_METRICS[task]:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            header.append(f"{name} {'↓' if lower else '↑'}")
            values.append(f"{value * scale:.{2 if scale != 1.0 else 4}f}")
    if not header:
        return "No evaluation results were recorded for this checkpoint."
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(values) + " |"])


def eval_results(task: str, metrics: Mapping[str, Any], dataset_id: str, dataset_name: str, split: str | None,
                 dataset_config: str | None = None) -> list:  # fmt: skip
    """`model-index` entries (`huggingface_hub.EvalResult`) for the paper's metrics in `metrics`."""
    from huggingface_hub import EvalResult

    results = []
    for key, name, scale, _ in PAPER_METRICS[task]:
        value = metrics.get(key)
        metric_task = key.split("/")[0] if task == "multitask" else task  # each metric under its own task
        if isinstance(value, (int, float)) and math.isfinite(value):
            results.append(
                EvalResult(
                    task_type=PIPELINE_TAGS[metric_task],
                    task_name=TASK_NAMES[metric_task],
                    dataset_type=dataset_id,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    dataset_config=dataset_config,
                    metric_type=key,
                    metric_name=name,
                    metric_value=round(float(value) * scale, 4),
                )
            )
    return results


def _training_table(training: Mapping[str, Any] | None) -> str:
    if not training:
        return "No training record was provided for this card."
    config = dict(training.get("config", training))
    rows = [
        ("task", config.get("task")),
        ("initialised from", config.get("model")),
        ("dataset", config.get("dataset")),
        ("recipe", config.get("recipe")),
        ("optimiser steps", training.get("global_step") or config.get("max_steps")),
        ("epochs", None if config.get("max_steps") else config.get("num_epochs")),
        ("batch per process x processes x accumulation",
         _batch(config, training.get("num_processes"))),
        ("crop / image size", config.get("crop_size")),
        ("learning rate (heads) / UNet multiplier", _pair(config.get("learning_rate"), config.get("unet_lr_mult"))),
        ("weight decay", config.get("weight_decay")),
        ("schedule", config.get("lr_schedule")),
        ("LoRA rank", config.get("lora_rank") or None),
        ("mixed precision", config.get("mixed_precision")),
        ("training time (s)", _round(training.get("train_seconds"))),
    ]  # fmt: skip
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value not in (None, "", [])]
    return "\n".join(lines)


def _batch(config: Mapping[str, Any], processes: Any) -> str | None:
    per_device = config.get("per_device_train_batch_size")
    if per_device is None:
        return None
    return f"{per_device} x {processes or '?'} x {config.get('gradient_accumulation_steps', 1)}"


def _pair(learning_rate: Any, multiplier: Any) -> str | None:
    if learning_rate is None:
        return None
    return f"{learning_rate} / x{multiplier}" if multiplier is not None else str(learning_rate)


def _round(value: Any) -> Any:
    return round(value) if isinstance(value, float) else value


TASK_NOUNS = {"depth": "depth estimator", "segmentation": "semantic segmenter", "referring": "referring segmenter",
              "normals": "surface-normal estimator", "multitask": "dense predictor"}  # fmt: skip
TASK_PHRASES = {"depth": "metric depth", "segmentation": "semantic segmentation", "normals": "surface normals"}


def _synthetic_note(task: str, synthetic: bool) -> str:
    if not synthetic:
        return ""
    return (
        "> **Synthetic-data model.** This checkpoint was trained and evaluated on vpd_hf's procedurally rendered indoor\n"
        '> scenes (and, for smoke tests, on a tiny random "Stable Diffusion"). It demonstrates the training and\n'
        f"> publishing path; it is **not** a {TASK_NOUNS[task]} for real photographs.\n\n"
    )


def _license_text(license: str, base_model: str, backbone: str | None = None) -> str:
    if license == "creativeml-openrail-m":
        return (f"`{license}`: the weights derive from Stable Diffusion 1.x (`{base_model}`) and inherit its CreativeML "
                "OpenRAIL-M licence, including its use restrictions.")  # fmt: skip
    if license == "openrail++":
        family = FAMILY_NAMES["sdxl" if backbone == "sdxl" else "sd2"]
        return f"`{license}`: the weights derive from {family} (`{base_model}`) and inherit its licence."
    if license == "other":
        return f"`other`: check the licence of the base model `{base_model}`, which these weights derive from."
    return f"`{license}`."


def _protocol_text(task: str, protocol: Mapping[str, Any] | None) -> str:
    protocol = dict(protocol or {})
    if task == "depth":
        windows, flip = protocol.get("depth_windows", 2), protocol.get("flip", True)
        return (f"{windows} shifted square windows{' + horizontal flip' if flip else ''}, 1e-3 < depth < 10 m"
                f"{', Eigen crop on 480x640 frames' if protocol.get('eigen_crop') is not False else ''}.")  # fmt: skip
    if task == "segmentation":
        mode = protocol.get("segmentation_mode", "slide")
        scales = protocol.get("scales", [1.0])
        text = "sliding 512x512 windows every 341 pixels" if mode == "slide" else "one pass over the whole image"
        if len(scales) > 1 or protocol.get("flip"):
            text += f", scales {scales}{' + flip' if protocol.get('flip') else ''} (probabilities averaged)"
        return text + ", 150 ADE20K classes (label 0 ignored)." if not protocol.get("synthetic") else text + "."
    if task == "normals":
        return ("angular error in degrees (mean, median, RMSE) and % of pixels within 11.25°, 22.5° and 30°, over the "
                "pixels with a ground-truth normal (the NYUv2 normals protocol).")  # fmt: skip
    if task == "multitask":
        return " ".join(
            f"{TASK_PHRASES[t].capitalize()}: {_protocol_text(t, {**protocol, 'segmentation_mode': 'whole'})}"
            for t in ("depth", "segmentation", "normals")
        )
    return "every expression of the split; overall IoU (cumulative), mean IoU, precision at IoU thresholds."


def create_model_card(
    task: str,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    backbone: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    protocol: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    synthetic: bool | None = None,
    license: str | None = None,
    max_depth: float | None = None,
    num_labels: int | None = None,
    token_length: int | None = None,
    tasks: Sequence[str] | None = None,
):
    r"""
    A `huggingface_hub.ModelCard` for a VPD model of `task`.

    Args:
        repo_id: the Hub repository (used in the title and the usage snippets; default `"your-name/vpd-{task}"`).
        base_model: the Stable Diffusion checkpoint the model was built from (`config.base_model`).
        backbone: its UNet family, `"sd1"`, `"sd2"` or `"sdxl"` (`config.backbone_family`; default: not stated).
        metrics: the evaluation metrics (as returned by `vpd_hf.metrics` / `scripts/evaluate.py`).
        dataset / dataset_name / dataset_config / split: what was evaluated (a Hub id or a folder; `"synthetic"`).
        protocol: the evaluation options (`EvaluationOptions` fields).
        training: `all_results.json` of `scripts/train.py` (or a `TrainConfig` dict).
        synthetic: whether the model was trained/evaluated on vpd_hf's synthetic scenes (default: inferred from
            `dataset` and the training record); the card then says so plainly.
        license: override the licence inferred from `base_model`.
        tasks: the heads of a multi-task model (`config.tasks`; default depth, segmentation and normals).
    """
    from huggingface_hub import ModelCard, ModelCardData

    _check_task(task)
    if backbone is not None and backbone not in FAMILY_NAMES:
        raise ValueError(f"`backbone` must be one of {list(FAMILY_NAMES)} or None, got {backbone!r}.")
    training_config = dict((training or {}).get("config", training or {}))
    if synthetic is None:
        sources = (dataset, training_config.get("dataset"), training_config.get("model"), base_model)
        synthetic = any(s and ("synthetic" in str(s) or str(s) == "tiny-random") for s in sources)
    dataset = dataset or training_config.get("dataset")
    if synthetic and (dataset is None or dataset == "synthetic" or Path(str(dataset)).exists()):
        dataset_id, default_name = SYNTHETIC_DATASET
    else:
        dataset_id, default_name = dataset or "unknown", dataset or "unknown"
    dataset_name = dataset_name or default_name
    license = license or infer_license(base_model)
    repo_id = repo_id or f"your-name/vpd-{task}"
    metrics = dict(metrics or {})
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[task],
        license=license,
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=[dataset_id] if dataset_id != "unknown" else None,
        tags=["vpd", "vpd_hf", "diffusion-features", "stable-diffusion", *TASK_TAGS[task]]
        + ([BACKBONE_TAGS[backbone]] if backbone in BACKBONE_TAGS else [])
        + (["synthetic-data"] if synthetic else []),
        eval_results=eval_results(task, metrics, dataset_id, dataset_name, split, dataset_config) or None,
    )
    template = template_path(task).read_text()
    heads = [t for t in ("depth", "segmentation", "normals") if t in (tasks or ("depth", "segmentation", "normals"))]
    return ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id,
        model_class=MODEL_CLASSES[task],
        base_model=base_model or "an unrecorded Stable Diffusion checkpoint",
        backbone_note=f" ({FAMILY_NAMES[backbone]} UNet)" if backbone else "",
        synthetic_note=_synthetic_note(task, synthetic),
        license_text=_license_text(license, base_model or "unrecorded", backbone),
        dataset_name=dataset_name,
        split=split or "the evaluation split",
        results_table=results_table(task, metrics),
        protocol=_protocol_text(task, {**(protocol or {}), "synthetic": synthetic}),
        training_table=_training_table(training),
        citation=CITATION,
        max_depth=max_depth if max_depth is not None else 10.0,
        num_labels=num_labels,
        token_length=token_length,
        tasks_text=", ".join(TASK_PHRASES[t] for t in heads),
        conditioning_text=(
            "The UNet is conditioned on one text token per class (the segmentation recipe), shared by every head; the "
            "class tokens' cross-attention maps at 1/16 and 1/32 join the features of all heads."
            if "segmentation" in heads
            else "The UNet is conditioned on one scene token per image (the depth recipe), shared by every head."
        ),
    )


def model_card_from_run(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    eval_file: str | Path | Mapping[str, Any] | None = None,
    training_file: str | Path | Mapping[str, Any] | None = None,
    **overrides: Any,
):
    """
    The card of a saved VPD model folder, from its `config.json`, the training record `all_results.json` (if there)
    and an evaluation JSON of `scripts/evaluate.py` (`eval_file`; default `eval_results.json` in the folder, else the
    final metrics of the training record). `overrides` go to :func:`create_model_card`.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json: not a saved VPD model.")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "vpd":
        raise ValueError(f"{folder} holds a {config.get('model_type')!r} model, not a VPD one.")
    task = _task_of(config)
    if training_file is None and (folder / "all_results.json").is_file():
        training_file = folder / "all_results.json"
    if eval_file is None and (folder / "eval_results.json").is_file():
        eval_file = folder / "eval_results.json"
    training = _read_json(training_file)
    evaluation = _read_json(eval_file)
    kwargs: dict[str, Any] = {
        "base_model": config.get("base_model"),
        "backbone": _backbone_of(config),
        "training": training,
    }
    if evaluation is not None:
        kwargs.update(metrics=evaluation.get("metrics", evaluation), dataset=evaluation.get("dataset"),
                      split=evaluation.get("split"), protocol=evaluation.get("protocol"))  # fmt: skip
    elif training is not None:
        train_config = training.get("config", {})
        kwargs.update(metrics=training.get("metrics"), dataset=train_config.get("dataset"),
                      split=train_config.get("eval_split"), protocol=training.get("protocol"))  # fmt: skip
    kwargs.update(max_depth=config.get("max_depth"), num_labels=len(config.get("id2label") or {}) or None,
                  token_length=config.get("token_length"))  # fmt: skip
    if task == "multitask":
        kwargs["tasks"] = config.get("tasks")
    kwargs.update(overrides)
    return create_model_card(task, repo_id=repo_id, **kwargs)


def _backbone_of(config: Mapping[str, Any]) -> str | None:
    """The UNet family of a saved config (`"sd1"` when it has no `unet_config`: VPDConfig's SD-1.5 default)."""
    try:
        return backbone_layout(dict(config.get("unet_config") or SD15_UNET_CONFIG)).family
    except (TypeError, ValueError):
        return None


def _task_of(config: Mapping[str, Any]) -> str:
    architectures = config.get("architectures") or []
    for task, name in MODEL_CLASSES.items():
        if name in architectures:
            return task
    if "VPDModelForSemanticSegmentation" in architectures:
        return "segmentation"
    raise ValueError(f"Cannot tell the task of a VPD model with architectures {architectures}.")


def save_model_card(card: Any, folder: str | Path) -> Path:
    """Writes `card` as the folder's `README.md` (what the Hub shows) and returns its path."""
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    card: Any = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload VPD model with vpd_hf",
    api: Any = None,
) -> Any:
    """
    Uploads a saved VPD folder (model + processor) with its model card in one commit: writes `card` (default:
    :func:`model_card_from_run` of the folder) as `README.md`, creates the repository if needed (`create_repo`) and
    uploads the folder (`upload_folder`), without checkpoints, logs or the tiny test SD of smoke runs. `api` defaults
    to `huggingface_hub.HfApi(token=token)`. Returns the commit info.
    """
    folder = Path(folder)
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"`repo_id` must look like 'name' or 'org/name', got {repo_id!r}.")
    if card is None:
        card = model_card_from_run(folder, repo_id=repo_id)
    save_model_card(card, folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE,
    )


__all__ = [
    "CITATION",
    "PAPER_METRICS",
    "create_model_card",
    "eval_results",
    "infer_license",
    "model_card_from_run",
    "push_to_hub",
    "results_table",
    "save_model_card",
    "template_path",
]
