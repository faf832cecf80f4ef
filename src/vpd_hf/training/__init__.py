"""Fine-tuning and evaluation of VPD with accelerate: recipes, optimiser groups and schedules, LoRA, the loop.

The names below are imported on first use (PEP 562): `vpd-hf train` without arguments prints its usage from
`training.config` alone, without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "RECIPES": "config",
    "TrainConfig": "config",
    "build_parser": "config",
    "load_recipe": "config",
    "parse_config": "config",
    "EvaluationOptions": "evaluation",
    "evaluate": "evaluation",
    "add_unet_lora": "lora",
    "load_unet_lora": "lora",
    "merge_unet_lora": "lora",
    "save_unet_lora": "lora",
    "build_optimizer": "optimization",
    "build_scheduler": "optimization",
    "lr_factor_fn": "optimization",
    "parameter_groups": "optimization",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .config import RECIPES, TrainConfig, build_parser, load_recipe, parse_config
    from .evaluation import EvaluationOptions, evaluate
    from .lora import add_unet_lora, load_unet_lora, merge_unet_lora, save_unet_lora
    from .optimization import build_optimizer, build_scheduler, lr_factor_fn, parameter_groups

__all__ = [
    "RECIPES",
    "EvaluationOptions",
    "TrainConfig",
    "add_unet_lora",
    "build_optimizer",
    "build_parser",
    "build_scheduler",
    "evaluate",
    "load_recipe",
    "load_unet_lora",
    "lr_factor_fn",
    "merge_unet_lora",
    "parameter_groups",
    "parse_config",
    "save_unet_lora",
]
