"""Fine-tuning and evaluation of VPD with accelerate: recipes, optimiser groups and schedules, LoRA, the loop."""

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
