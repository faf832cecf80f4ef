"""Optimiser parameter groups and learning-rate schedules of the three official VPD recipes.

The official code names its parameters with the CompVis `ldm` tree, and its grouping rules match on those names. The
rules are reproduced on diffusers names by what the parameters *are*:

* segmentation (mmcv `DefaultOptimizerConstructor`, custom keys `unet` lr x0.1 and `norm` decay x0): mmcv applies
  the first matching key in (length, alphabetical) order, so `norm` wins over `unet` — UNet parameters whose *ldm* name
  contains "norm" (the transformer blocks' LayerNorms and the SpatialTransformer GroupNorm) train at lr x1 without
  weight decay; the ResNet GroupNorms (ldm `in_layers.0` / `out_layers.0`, diffusers `norm1` / `norm2`) do not match
  and train at lr x0.1 with decay, like the rest of the UNet; everything else (heads, adapter) at lr x1 with decay;
* depth (`LDMOptimizerConstructor`): UNet x0.01, rest x1; no weight decay on 1-D parameters and biases;
* normals and multi-task (no official recipe): the depth rules (UNet x0.01, no decay on 1-D parameters and biases),
  as two of the three dense tasks are geometry and the multi-task UNet serves all heads;
* referring (LAVT-style groups): no decay on (ldm) "norm" parameters, decay elsewhere; the groups carry an
  `lr_scale` of 0.01 for the UNet that the released code never applies, so the UNet trains at the full rate
  (`unet_lr_mult=1.0` by default; pass 0.01 for the documented intent).

The VAE is frozen (never optimised). Only parameters with `requires_grad` are grouped (LoRA: the adapters, heads and
TextAdapter).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

TASKS = ("depth", "segmentation", "referring", "normals", "multitask")
SCHEDULES = ("poly_warmup", "poly", "rise_fall", "constant")

# The default UNet learning-rate multiplier of each recipe.
UNET_LR_MULT = {"segmentation": 0.1, "depth": 0.01, "referring": 1.0, "normals": 0.01, "multitask": 0.01}

# ldm names "norm" only inside its SpatialTransformer (the GroupNorm `norm` and the blocks' `norm1/2/3`); in diffusers
# these live under `attentions.<i>.` as `norm` and `transformer_blocks.<j>.norm<k>`.
_LDM_NORM = re.compile(r"\.attentions\.\d+\.(norm|transformer_blocks\.\d+\.norm\d)\.")


def is_unet_parameter(name: str) -> bool:
    return ".unet." in f".{name}"


def has_ldm_norm_name(name: str) -> bool:
    """Whether the official (ldm-named) counterpart of this parameter contains "norm" (see the module docstring)."""
    if is_unet_parameter(name):
        return bool(_LDM_NORM.search(name))
    # Outside the UNet our names are the official ones in spirit: CLIP's LayerNorms, heads' "bn" are not norms.
    return "norm" in name


@dataclass
class GroupRule:
    name: str
    lr_mult: float
    weight_decay: float


def _rule(task: str, name: str, param: nn.Parameter, weight_decay: float, unet_lr_mult: float) -> GroupRule:
    unet = is_unet_parameter(name)
    if task == "segmentation":
        if unet and has_ldm_norm_name(name):
            return GroupRule("unet_norm", 1.0, 0.0)
        if unet:
            return GroupRule("unet", unet_lr_mult, weight_decay)
        if has_ldm_norm_name(name):
            return GroupRule("norm", 1.0, 0.0)
        return GroupRule("other", 1.0, weight_decay)
    if task in ("depth", "normals", "multitask"):
        decay = 0.0 if param.ndim == 1 or name.endswith(".bias") else weight_decay
        prefix = "unet" if unet else "other"
        return GroupRule(f"{prefix}_{'decay' if decay else 'no_decay'}", unet_lr_mult if unet else 1.0, decay)
    if task == "referring":
        decay = 0.0 if has_ldm_norm_name(name) else weight_decay
        prefix = "unet" if unet else "other"
        return GroupRule(f"{prefix}_{'decay' if decay else 'no_decay'}", unet_lr_mult if unet else 1.0, decay)
    raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")


def parameter_groups(
    model: nn.Module,
    task: str,
    lr: float,
    weight_decay: float,
    unet_lr_mult: float | None = None,
) -> list[dict]:
    r"""
    AdamW parameter groups of `task`'s official recipe (see the module docstring), over the trainable parameters.

    Returns:
        A list of `{"params", "lr", "weight_decay", "group_name", "param_names"}` dicts (empty groups omitted);
        `lr` is the base `lr` times the group's multiplier.
    """
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
    if not lr > 0 or weight_decay < 0:
        raise ValueError(f"Need `lr` > 0 and `weight_decay` >= 0, got lr={lr}, weight_decay={weight_decay}.")
    unet_lr_mult = UNET_LR_MULT[task] if unet_lr_mult is None else unet_lr_mult
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".vae." in f".{name}":
            raise ValueError(f"The VAE must stay frozen, but `{name}` requires a gradient.")
        rule = _rule(task, name, param, weight_decay, unet_lr_mult)
        group = groups.setdefault(
            rule.name,
            {"params": [], "param_names": [], "lr": lr * rule.lr_mult, "weight_decay": rule.weight_decay,
             "group_name": rule.name},
        )  # fmt: skip
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("The model has no trainable parameter.")
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    task: str,
    lr: float,
    weight_decay: float,
    unet_lr_mult: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (`fused` kernels where supported, e.g. CUDA)."""
    groups = parameter_groups(model, task, lr, weight_decay, unet_lr_mult)
    kwargs = {} if fused is None else {"fused": fused}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, **kwargs)


def lr_factor_fn(
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> Callable[[int], float]:
    r"""
    Learning-rate factor (relative to each group's base lr) at optimiser step `i` (0 = the first update):

    * `"poly_warmup"` (segmentation, mmcv `poly` + `linear` warm-up): `(1 - i / total) ** power` scaled towards
      `min_lr_ratio`, times `1 - (1 - i / warmup) * (1 - warmup_ratio)` during the first `warmup_steps`;
    * `"poly"` (referring): `(1 - i / total) ** power` (`power` 0.9 in the recipe);
    * `"rise_fall"` (depth): from `min_lr_ratio` up to 1 over the first half of training with a power-`power` curve,
      then back down to `min_lr_ratio` at the end of the second half (GLPDepth / VPD, `power` 0.9, computed per
      iteration with the official 1-based step counter);
    * `"constant"`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}.")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"Need `total_steps` >= 1 and `warmup_steps` >= 0, got {total_steps} and {warmup_steps}.")

    def poly(step: int) -> float:
        progress = min(step, total_steps) / total_steps
        return (1.0 - min_lr_ratio) * (1.0 - progress) ** power + min_lr_ratio

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if schedule == "poly":
            return poly(step)
        if schedule == "poly_warmup":
            value = poly(step)
            if step < warmup_steps:
                value *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
            return value
        # rise_fall: the official code counts steps from 1 and splits at half the epochs' worth of iterations.
        half = max(1, total_steps // 2)
        position = (step + 1) / half
        if position < 1.0:
            return (1.0 - min_lr_ratio) * position**power + min_lr_ratio
        return max(min_lr_ratio, (min_lr_ratio - 1.0) * (position - 1.0) ** power + 1.0)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, **kwargs) -> LambdaLR:
    """A `LambdaLR` over :func:`lr_factor_fn` (step it once per optimiser update)."""
    return LambdaLR(optimizer, lr_factor_fn(schedule, total_steps, **kwargs))


def describe_groups(groups: Iterable[dict]) -> list[dict]:
    """Group summaries for logs: name, lr, weight decay and parameter count."""
    return [
        {
            "group": g.get("group_name", "?"),
            "lr": g.get("initial_lr", g["lr"]),
            "weight_decay": g["weight_decay"],
            "parameters": sum(p.numel() for p in g["params"]),
        }
        for g in groups
    ]


__all__ = [
    "SCHEDULES",
    "TASKS",
    "UNET_LR_MULT",
    "build_optimizer",
    "build_scheduler",
    "describe_groups",
    "has_ldm_norm_name",
    "is_unet_parameter",
    "lr_factor_fn",
    "parameter_groups",
]
