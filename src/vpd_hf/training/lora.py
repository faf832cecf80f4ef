"""LoRA on VPD's UNet through PEFT (diffusers' `PeftAdapterMixin`).

The adapter is injected into the UNet module only, so no VAE or text-encoder layer is ever adapted (their attention
projections share the names `to_q`/`to_k`/...). The UNet's own weights are frozen; the task head, neck and TextAdapter
keep training fully.

On disk (:func:`save_unet_lora`): `adapter_config.json` + `adapter_model.safetensors`, the PEFT layout (keys relative to
the UNet). :func:`load_unet_lora` puts it back on a model; :func:`merge_unet_lora` folds it into the UNet weights so the
model saves and loads as a plain VPD checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _unet(model: torch.nn.Module) -> torch.nn.Module:
    backbone = getattr(model, "vpd", model)
    if not hasattr(backbone, "unet"):
        raise TypeError(f"Expected a VPD model (with `.vpd.unet`), got {type(model).__name__}.")
    return backbone.unet


def add_unet_lora(
    model: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
):
    """Freezes the UNet and adds a LoRA adapter to its `target_modules`; returns the `peft.LoraConfig`."""
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
    unet = _unet(model)
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        init_lora_weights="gaussian",
    )
    unet.add_adapter(config)
    adapted = [name for name, _ in unet.named_modules() if name.endswith("lora_A")]
    if not adapted:
        raise ValueError(f"No UNet module matched `target_modules` {list(target_modules)}.")
    return config


def has_unet_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(_unet(model), "peft_config", None))


def unet_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(_unet(model))


def save_unet_lora(model: torch.nn.Module, directory: str | Path) -> Path:
    """Writes the UNet adapter in the PEFT layout (`adapter_config.json`, `adapter_model.safetensors`)."""
    unet = _unet(model)
    if not has_unet_lora(model):
        raise ValueError("The model has no UNet LoRA adapter to save.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet.peft_config["default"].save_pretrained(directory)
    state = {key: value.detach().contiguous().cpu() for key, value in unet_lora_state_dict(model).items()}
    save_file(state, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return directory


def load_unet_lora(model: torch.nn.Module, directory: str | Path) -> None:
    """Adds the adapter saved by :func:`save_unet_lora` to `model`'s UNet (frozen base, trainable adapter)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    directory = Path(directory)
    config = LoraConfig.from_pretrained(str(directory))
    unet = _unet(model)
    unet.add_adapter(config)
    result = set_peft_model_state_dict(unet, load_file(directory / ADAPTER_WEIGHTS))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"The adapter in {directory} does not fit this UNet: unexpected keys {unexpected[:5]}.")


def merge_unet_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Folds the adapter into the UNet weights and removes the LoRA layers (the model is then a plain VPD model)."""
    unet = _unet(model)
    unet.fuse_lora()
    unet.unload_lora()
    return model


def cast_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Stores the frozen weights of the UNet and of a text encoder in `dtype` (e.g. bf16 under LoRA: the frozen UNet
    then takes half the memory, while everything that trains stays in float32). The VAE keeps its dtype (SD's VAE
    overflows in float16). Returns the number of parameters cast."""
    modules = [_unet(model)] + [m for m in (getattr(model, "text_encoder", None),) if m is not None]
    cast = 0
    for module in modules:
        for parameter in module.parameters():
            if not parameter.requires_grad and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)
                cast += parameter.numel()
    return cast


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_TARGETS",
    "add_unet_lora",
    "cast_frozen_weights",
    "has_unet_lora",
    "load_unet_lora",
    "merge_unet_lora",
    "save_unet_lora",
    "unet_lora_state_dict",
]
