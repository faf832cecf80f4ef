"""Training options: one dataclass, every field a named command-line argument, recipes as YAML files.

Precedence: dataclass default < `--recipe` YAML < explicit command-line arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

RECIPES = ("ade20k_segmentation", "nyu_depth", "nyu_normals", "refcoco_referring", "synthetic_multitask")
DENSE_TASKS = ("depth", "segmentation", "normals")


@dataclass
class TrainConfig:
    # -- what ---------------------------------------------------------------------------------------------------------
    task: str = field(
        default="depth",
        metadata={"help": "depth | segmentation | referring | normals | multitask (set by `--tasks` with 2+ tasks)"},
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Multi-task training: the heads of one VPDModelForDensePrediction (a subset of depth, "
            "segmentation, normals), e.g. `--tasks depth segmentation normals`. One task is the same as `--task` "
            "(with `--task multitask`: a multi-task model with that one head)."
        },
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Multi-task: the weight of each task's loss, in the order of `--tasks` (default: all 1)."},
    )
    model: str = field(
        default="tiny-random",
        metadata={
            "help": "A Stable Diffusion checkpoint (diffusers layout; Hub id or folder: builds the task model with "
            "`from_stable_diffusion`), a VPD checkpoint (`from_pretrained`), or `tiny-random` (a tiny random SD "
            "written offline into the output folder, for tests and demos)."
        },
    )
    dataset: str = field(
        default="synthetic",
        metadata={"help": "`synthetic` (rendered offline), a local parquet folder, or a Hub dataset id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (e.g. `scenes`)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="validation", metadata={"help": "Evaluation split."})
    output_dir: str = field(default="outputs/train", metadata={"help": "Checkpoints, logs and the final model."})
    recipe: str | None = field(
        default=None, metadata={"help": f"A YAML file or one of {list(RECIPES)}: defaults for the other options."}
    )
    model_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "JSON dict of VPDConfig fields for models built from Stable Diffusion (e.g. head sizes)."},
    )
    # -- data ---------------------------------------------------------------------------------------------------------
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "Label column (default: `depth_map` / `annotation` / `normal_map` / the layout's mask); "
            "multi-task: the segmentation column (depth and normals are read from `depth_map` and `normal_map`)."
        },
    )
    scene_column: str | None = field(default=None, metadata={"help": "Depth: scene-name column for scene prompts."})
    crop_size: int | None = field(
        default=None,
        metadata={"help": "Training crop (default 480 depth, 512 segmentation) / referring image side (default 512)."},
    )
    token_length: int = field(default=40, metadata={"help": "Referring: tokens per expression (40; 77 RefCOCOg)."})
    image_root: str | None = field(default=None, metadata={"help": "Referring: COCO train2014 folder, if needed."})
    synthetic_num_train: int = field(default=256, metadata={"help": "Synthetic data: training images."})
    synthetic_num_eval: int = field(default=32, metadata={"help": "Synthetic data: evaluation images."})
    synthetic_size: int = field(default=128, metadata={"help": "Synthetic data: image side."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers per process."})
    # -- optimisation -------------------------------------------------------------------------------------------------
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Batch size per process."})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Evaluation batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimiser steps (overrides `num_epochs`)."})
    num_epochs: int = field(default=1, metadata={"help": "Epochs, when `max_steps` is not given."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Base learning rate (heads; the UNet's is scaled)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    unet_lr_mult: float | None = field(
        default=None, metadata={"help": "UNet learning-rate multiplier (default per task: 0.1 seg, 0.01 depth, 1 ref)."}
    )
    lr_schedule: str = field(default="rise_fall", metadata={"help": "poly_warmup | poly | rise_fall | constant."})
    warmup_steps: int = field(default=0, metadata={"help": "poly_warmup: linear warm-up steps."})
    warmup_ratio: float = field(default=1e-6, metadata={"help": "poly_warmup: starting lr factor."})
    lr_power: float = field(default=0.9, metadata={"help": "Power of the poly / rise_fall curves."})
    min_lr_ratio: float = field(default=0.06, metadata={"help": "Lowest lr factor (depth: 3e-5 / 5e-4)."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Gradient clipping (none in the recipes)."})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no | fp16 | bf16 (default: the accelerate config's)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute UNet activations in backward."})
    seed: int = field(default=0, metadata={"help": "Seed of model init, data order and augmentation."})
    # -- LoRA ---------------------------------------------------------------------------------------------------------
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the UNet's attention projections (0 = off)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)."})
    lora_targets: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={"help": "UNet module names to adapt."},
    )
    merge_lora: bool = field(default=False, metadata={"help": "Merge LoRA into the UNet before the final save."})
    lora_frozen_dtype: str | None = field(
        default=None,
        metadata={"help": "LoRA: keep the frozen UNet (and text encoder) in bf16 | fp16, half the memory; the final "
                  "model is saved in float32 again, its base weights rounded to that dtype."},
    )  # fmt: skip
    # -- checkpoints, evaluation, logging -----------------------------------------------------------------------------
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save a resumable checkpoint every N."})
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "`latest` (the newest complete checkpoint) or a checkpoint folder."}
    )
    resume_without_rng_state: bool = field(
        default=False,
        metadata={"help": "Resume even if the checkpoint lacks a process's random-number state (not reproducible)."},
    )
    stop_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stop this run after N optimiser steps with a checkpoint (e.g. a job time limit); the schedule "
            "still spans the whole training. Continue with --resume_from_checkpoint latest."
        },
    )
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (and at the end)."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    report_to: str = field(default="none", metadata={"help": "tensorboard | trackio | wandb | none."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id for `push_to_hub`."})
    # -- evaluation protocol ------------------------------------------------------------------------------------------
    eval_depth_windows: int = field(default=2, metadata={"help": "Depth: shifted square windows (official 2)."})
    eval_flip: bool = field(default=True, metadata={"help": "Depth/segmentation: also predict flipped images."})
    eval_scales: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "Segmentation test scales."})
    eval_segmentation_mode: str = field(default="slide", metadata={"help": "Segmentation: slide | whole."})

    def __post_init__(self) -> None:
        from .optimization import SCHEDULES, TASKS

        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {list(TASKS)}, got {self.task!r}.")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {list(SCHEDULES)}, got {self.lr_schedule!r}.")
        if self.report_to not in ("none", "tensorboard", "trackio", "wandb", "all"):
            raise ValueError(f"`report_to` must be tensorboard, trackio, wandb or none, got {self.report_to!r}.")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"`mixed_precision` must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"`max_steps` must be >= 1, got {self.max_steps}.")
        if self.lora_rank < 0:
            raise ValueError(f"`lora_rank` must be >= 0, got {self.lora_rank}.")
        if self.lora_frozen_dtype not in (None, "bf16", "fp16"):
            raise ValueError(f"`lora_frozen_dtype` must be bf16, fp16 or None, got {self.lora_frozen_dtype!r}.")
        if self.lora_frozen_dtype and not self.lora_rank:
            raise ValueError("`lora_frozen_dtype` needs `lora_rank` > 0 (without LoRA the UNet trains).")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (the repository to create or update, e.g. org/name).")
        if self.eval_segmentation_mode not in ("slide", "whole"):
            raise ValueError(f"`eval_segmentation_mode` must be slide or whole, got {self.eval_segmentation_mode!r}.")
        self.adam_betas = tuple(self.adam_betas)
        self._resolve_tasks()

    def _resolve_tasks(self) -> None:
        """`tasks` and `task` agree: two or more dense tasks make a multi-task run, one is that task's run."""
        if self.tasks is not None:
            tasks = list(self.tasks)
            if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(DENSE_TASKS):
                raise ValueError(
                    f"`tasks` must be a non-empty subset of {list(DENSE_TASKS)} without repeats, got {tasks}."
                )
            if self.task not in ("depth", "multitask") and self.task not in tasks:
                raise ValueError(
                    f"`task` {self.task!r} is not among `tasks` {tasks}; give one of them or leave it out."
                )
            self.tasks = [t for t in DENSE_TASKS if t in tasks]  # the model's order
            order = [tasks.index(t) for t in self.tasks]
            if self.loss_weights is not None:
                if len(self.loss_weights) != len(tasks) or any(not w >= 0 for w in self.loss_weights):
                    raise ValueError(
                        f"`loss_weights` must give one non-negative weight per task of `tasks` {tasks}, got "
                        f"{self.loss_weights}."
                    )
                self.loss_weights = [float(self.loss_weights[i]) for i in order]
            # `--task multitask --tasks depth` keeps the multi-task model with one head (e.g. a controlled comparison).
            self.task = "multitask" if len(tasks) > 1 or self.task == "multitask" else tasks[0]
        elif self.task == "multitask":
            self.tasks = list(DENSE_TASKS)
        if self.loss_weights is not None and self.task != "multitask":
            raise ValueError("`loss_weights` weigh the tasks of a multi-task run: give them with `--tasks`.")

    @property
    def task_loss_weights(self) -> dict[str, float] | None:
        """`{task: weight}` of a multi-task run (None: every weight 1)."""
        if self.task != "multitask" or self.loss_weights is None:
            return None
        return dict(zip(self.tasks, self.loss_weights, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def recipe_path(recipe: str) -> Path:
    """A recipe name shipped with the package, or a YAML path."""
    if recipe in RECIPES:
        return Path(str(files("vpd_hf.training") / "recipes" / f"{recipe}.yaml"))
    path = Path(recipe)
    if not path.is_file():
        raise ValueError(f"`recipe` must be one of {list(RECIPES)} or an existing YAML file, got {recipe!r}.")
    return path


def load_recipe(recipe: str) -> dict[str, Any]:
    import yaml

    values = yaml.safe_load(recipe_path(recipe).read_text()) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Recipe {recipe!r} has unknown options {unknown}.")
    return values


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


# The options that matter for `scripts/evaluate.py` (the rest only concern training).
EVALUATION_OPTIONS = (
    "task", "tasks", "model", "dataset", "dataset_config", "eval_split", "image_column", "label_column", "scene_column",
    "token_length", "image_root", "synthetic_num_train", "synthetic_num_eval", "synthetic_size", "max_eval_samples",
    "num_workers", "per_device_eval_batch_size", "mixed_precision", "seed", "eval_depth_windows", "eval_flip",
    "eval_scales", "eval_segmentation_mode", "output_dir",
)  # fmt: skip

TRAIN_DESCRIPTION = (
    "Fine-tune VPD with accelerate (depth, semantic segmentation, referring segmentation, surface normals, or several "
    "dense tasks from one backbone pass with --tasks)."
)
TRAIN_EXAMPLE = (
    "Example: accelerate launch scripts/train.py --recipe nyu_depth --model stable-diffusion-v1-5/stable-diffusion-v1-5 "
    "--dataset sayakpaul/nyu_depth_v2 --output_dir vpd-depth"
)


def build_parser(
    options: Sequence[str] | None = None,
    description: str = TRAIN_DESCRIPTION,
    epilog: str = TRAIN_EXAMPLE,
    prog: str | None = None,
) -> argparse.ArgumentParser:
    """An argument per :class:`TrainConfig` field (or per field in `options`)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=epilog
    )
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        if options is not None and item.name not in options:
            continue
        kwargs: dict[str, Any] = {"help": item.metadata.get("help", ""), "default": argparse.SUPPRESS}
        hint = hints[item.name]
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else hint
        if base is bool:
            kwargs["type"], kwargs["metavar"] = _parse_bool, "BOOL"
        elif typing.get_origin(base) is dict or base is dict:
            kwargs["type"] = json.loads
        elif typing.get_origin(base) in (list, tuple):
            inner = typing.get_args(base)[0]
            kwargs["type"], kwargs["nargs"] = inner, "+"
        elif base in (int, float, str):
            kwargs["type"] = base
        parser.add_argument(f"--{item.name}", **kwargs)
    return parser


def config_from_arguments(arguments: dict[str, Any]) -> TrainConfig:
    """Parsed arguments (only those given) on top of their `recipe`, on top of the defaults."""
    values: dict[str, Any] = {}
    if arguments.get("recipe"):
        values.update(load_recipe(arguments["recipe"]))
    values.update(arguments)
    return TrainConfig(**values)


def parse_config(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    """Command line (and recipe) -> :class:`TrainConfig`."""
    return config_from_arguments(vars(build_parser(prog=prog).parse_args(argv)))


__all__ = [
    "EVALUATION_OPTIONS",
    "RECIPES",
    "TrainConfig",
    "build_parser",
    "config_from_arguments",
    "load_recipe",
    "parse_config",
    "recipe_path",
]
