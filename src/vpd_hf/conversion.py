"""Conversion of the VPD authors' released checkpoints (`wl-zhao/VPD`) into vpd_hf model folders.

The released files are training checkpoints of the original code (CompVis `ldm` UNet/VAE plus mmcv/LAVT heads):

- ADE20K segmentation (`fpn_vpd_sd1-5_512x512_slim.ckpt`): an mmcv checkpoint, weights under `state_dict`;
- NYUv2 depth (`vpd_depth_480x480.pth`): `{"model": ...}`, everything but the depth head under an extra `encoder.`;
- RefCOCO/+/g referring segmentation (`vpd_ris_*.pth`): `{"model": ...}`, head under `classifier.`, no CLIP weights.

Their key layout is described in `docs/vpd-checkpoint-keys.md`. This module reads such a file (safetensors directly;
pickles only when the caller trusts them), detects the task from its keys, infers the head widths from its shapes,
renames every tensor to our parameter names (the UNet and VAE through diffusers' ldm converters), reports what was
dropped and what is missing, fills the missing parts from a diffusers-layout Stable Diffusion folder, and writes a
`save_pretrained` folder (safetensors) with the matching processor and a `conversion_report.json`.

Public API: :func:`load_official_state_dict`, :func:`detect_task`, :func:`infer_config_overrides`,
:func:`convert_state_dict`, :func:`convert_checkpoint` and :class:`ConversionReport`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configuration_vpd import SD15_HUB_ID, SD15_UNET_CONFIG, SD15_VAE_CONFIG, VPDConfig
from .prompts import (
    ADE20K_CLASS_NAMES,
    ADE20K_PROMPT_TEMPLATE,
    CLIP_IMAGENET_TEMPLATES,
    NYU_PROMPT_MAX_LENGTH,
    NYU_SCENE_NAMES,
)

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("depth", "segmentation", "referring")
PICKLE_SUFFIXES: tuple[str, ...] = (".pth", ".ckpt", ".bin", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
# The diffusers release whose (semi-internal) ldm converters this module was written and tested against.
TESTED_DIFFUSERS_VERSION = "0.42.1"

# The depth model keeps every Stable Diffusion part (and its neck) inside `VPDDepthEncoder`, stored as `encoder`.
_TASK_PREFIX = {"depth": "encoder.", "segmentation": "", "referring": ""}
# `UNetWrapper` (`unet`) -> ldm `DiffusionWrapper` (`unet`) -> ldm `UNetModel` (`diffusion_model`).
_LDM_UNET_PREFIX = "unet.unet.diffusion_model."
_LDM_VAE_PREFIX = "encoder_vq."
# The prefixes diffusers' converters look for (anything else is silently ignored by them).
_DIFFUSERS_LDM_UNET_PREFIX = "model.diffusion_model."
_DIFFUSERS_LDM_VAE_PREFIX = "first_stage_model."
# Head widths of the released models, used only to warn about variants of a full-size file (widths are always read
# from the shapes, so that test-scale models of this package convert too).
_OFFICIAL_WIDTHS = {
    "segmentation": {"fpn_channels": 256, "semantic_head_channels": 256},
    "depth": {
        "depth_neck_channels": 1536,
        "depth_head_channels": 192,
        "depth_deconv_filters": [32, 32, 32],
        "depth_deconv_kernels": [2, 2, 2],
    },
}
_SD15_WIDTHS = list(SD15_UNET_CONFIG["block_out_channels"])


def _rename_rules(task: str) -> list[tuple[re.Pattern[str], str]]:
    """`(pattern, replacement)` pairs that rename the non-diffusion keys of `task` (first match wins)."""
    p = re.escape(_TASK_PREFIX[task])
    rules = [
        # TextAdapter: `fc` = Linear -> GELU -> Linear; gamma and the prompt table are siblings of the adapter.
        (rf"^{p}text_adapter\.fc\.0\.(weight|bias)$", r"vpd.text_adapter.linear_1.\1"),
        (rf"^{p}text_adapter\.fc\.2\.(weight|bias)$", r"vpd.text_adapter.linear_2.\1"),
        (rf"^{p}gamma$", "vpd.text_adapter.gamma"),
    ]
    if task == "segmentation":
        rules += [
            (r"^class_embeddings$", "vpd.prompt_embeddings"),
            # mmcv ConvModule without norm: `<module>.conv.{weight,bias}` is our plain conv.
            (r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$", r"neck.\1.\2.\3"),
            # The scale heads' ConvModules (conv without bias + BN) keep mmcv's `conv` / `bn` names in our head.
            (r"^decode_head\.scale_heads\.(\d+)\.(\d+)\.(conv|bn)\.(\w+)$", r"head.scale_heads.\1.\2.\3.\4"),
            (r"^decode_head\.conv_seg\.(weight|bias)$", r"head.conv_seg.\1"),
        ]
    elif task == "depth":
        rules += [
            (r"^encoder\.class_embeddings$", "vpd.prompt_embeddings"),
            (r"^encoder\.(layer1|layer2|out_layer)\.(\d+)\.(weight|bias)$", r"head.neck.\1.\2.\3"),
            (r"^decoder\.(deconv_layers|conv_layers)\.(\d+)\.(\w+)$", r"head.decoder.\1.\2.\3"),
            (r"^last_layer_depth\.(\d+)\.(weight|bias)$", r"head.last_layer_depth.\1.\2"),
        ]
    else:
        rules += [(r"^classifier\.((?:conv|bn)\d_\d)\.(\w+)$", r"decoder.\1.\2")]
    return [(re.compile(pattern), replacement) for pattern, replacement in rules]


def _drop_rules(task: str) -> list[re.Pattern[str]]:
    """Keys of the released files that are deliberately not converted (doc section 9)."""
    p = re.escape(_TASK_PREFIX[task])
    rules = [
        # The VAE decoder was deleted by VPD; `post_quant_conv` survived but only feeds the decoder.
        rf"^{p}encoder_vq\.(post_quant_conv|decoder)\.",
        # The UNet's output norm + conv (to the predicted noise) is never run by VPD and not built by vpd_hf.
        rf"^{p}{re.escape(_LDM_UNET_PREFIX)}out\.",
    ]
    if task == "segmentation":
        rules.append(r"^sd_model\.")  # the emptied LatentDiffusion's noise-schedule buffers
    return [re.compile(rule) for rule in rules]


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _check_path(path: str | os.PathLike, name: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a str or os.PathLike, got {type(path).__name__}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{name}`: no such file: {path}")
    return path


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """Loads a pickled file, refusing unless the caller trusts it: unpickling can run arbitrary code."""
    if not trust_pickle:
        raise ValueError(
            f"Refusing to load {path.name!r}: {path.suffix} files are Python pickles, and unpickling a file can "
            "execute arbitrary code. Only if you trust its origin (e.g. the VPD authors' release), pass "
            "`trust_pickle=True` (CLI: `--trust-pickle`); or convert it to .safetensors on a trusted machine first."
        )
    try:
        # Restricted unpickler: tensors, dicts, lists, numbers and strings only.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # e.g. an `argparse.Namespace` under `args` (refer training files) or mmcv objects in `meta`.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
        logger.warning(
            "%s holds Python objects besides tensors (%s); loading it with weights_only=False because "
            "`trust_pickle=True` was given. This runs the file's pickle code.",
            path.name,
            reason[:200],
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as missing:
            raise ValueError(
                f"{path.name} references the Python module {missing.name!r}, which is not installed; the weights "
                "cannot be unpickled without it. Re-save the file's state dict alone (e.g. as .safetensors) where "
                "that module is available."
            ) from missing


def _read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a released file (unwrapped, `module.` stripped) and the names of the other entries ignored."""
    path = _check_path(path)
    if not isinstance(trust_pickle, bool):
        raise TypeError(f"`trust_pickle` must be a bool, got {trust_pickle!r}.")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            container: Any = load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    elif suffix in PICKLE_SUFFIXES:
        container = _torch_load(path, trust_pickle)
    else:
        raise ValueError(
            f"`path` must end with {SAFETENSORS_SUFFIX} or one of {list(PICKLE_SUFFIXES)} (pickles), got {path.name!r}."
        )
    if not isinstance(container, dict):
        raise ValueError(f"{path.name} holds a {type(container).__name__}, expected a dict of tensors.")

    ignored: list[str] = []
    weights: Any = container
    # mmcv checkpoints keep the weights under `state_dict`, the depth/refer training code under `model`.
    for wrapper in ("state_dict", "model"):
        if isinstance(container.get(wrapper), dict):
            weights = container[wrapper]
            ignored = sorted(str(key) for key in container if key != wrapper)
            break
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            ignored.append(str(key))
            continue
        # DDP wrappers prefix every key with `module.` (the official loaders strip it, too).
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in state_dict:
            raise ValueError(f"{path.name} has both {name!r} and 'module.{name}'.")
        state_dict[name] = value
    if not state_dict:
        raise ValueError(f"{path.name} contains no tensors (entries: {sorted(map(str, container))[:10]}).")
    return state_dict, ignored


def load_official_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    r"""
    Reads a released VPD checkpoint and returns its weights as a flat `{key: tensor}` dict (keys as in the file).

    `.safetensors` files are read directly. Pickled files (`.pth`, `.ckpt`, `.bin`, `.pt`) are refused unless
    `trust_pickle=True`, because unpickling can execute code; with it, `torch.load(weights_only=True)` is tried first
    and only a file that needs more (e.g. an `argparse.Namespace` in `args`) is loaded with `weights_only=False`, with
    a logged warning. The weights are taken from `state_dict` (mmcv), `model` (depth/refer training code) or the dict
    itself; other top-level entries (`meta`, `optimizer`, `args`, ...) are discarded, a leading `module.` is stripped.

    Raises:
        ValueError: unknown suffix, untrusted pickle, or a file without tensors.
        FileNotFoundError: `path` does not exist.
    """
    return _read_checkpoint(path, trust_pickle)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Task detection and shape inference
# ---------------------------------------------------------------------------------------------------------------------

# Head keys that only one task's file has (doc sections 5-7).
_TASK_SIGNATURES = {
    "segmentation": ("decode_head.conv_seg.weight", "neck.lateral_convs.0.conv.weight"),
    "depth": ("last_layer_depth.2.weight", "encoder.out_layer.0.weight"),
    "referring": ("classifier.conv1_4.weight", "classifier.conv1_1.weight"),
}


def _check_state_dict(state_dict: Any) -> None:
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise TypeError(f"`state_dict` must be a dict with str keys, got {type(state_dict).__name__}.")


def _check_task(task: Any) -> str:
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
    return task


def detect_task(state_dict: dict[str, torch.Tensor]) -> str:
    r"""
    Tells which released model `state_dict` comes from, by its head keys: `"segmentation"` (mmseg `decode_head.` and
    `neck.`), `"depth"` (`last_layer_depth.` and the neck convs under `encoder.`) or `"referring"` (LAVT
    `classifier.`). The matching UNet (`unet.unet.diffusion_model.`, under `encoder.` for depth) must be present too.

    Raises:
        ValueError: no task, or more than one, matches; or the UNet is missing.
    """
    _check_state_dict(state_dict)
    matches = [task for task, keys in _TASK_SIGNATURES.items() if any(key in state_dict for key in keys)]
    if len(matches) != 1:
        prefixes = sorted(Counter(key.split(".")[0] for key in state_dict).items())
        found = "several tasks' heads (" + ", ".join(matches) + ")" if matches else "no known head"
        signatures = {name: keys[0] for name, keys in _TASK_SIGNATURES.items()}
        raise ValueError(
            f"Cannot tell the VPD task of this checkpoint: it has {found}. Expected the head keys of exactly one "
            f"task, e.g. {signatures}. Top-level prefixes (count): {prefixes}."
        )
    task = matches[0]
    unet_prefix = _TASK_PREFIX[task] + _LDM_UNET_PREFIX
    if not any(key.startswith(unet_prefix) for key in state_dict):
        raise ValueError(
            f"The checkpoint has a {task} head but no UNet under {unet_prefix!r}: not a released VPD {task} file "
            "(or a file with an unknown layout)."
        )
    return task


def _shape(state_dict: dict[str, torch.Tensor], key: str, ndim: int | None = None) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"The checkpoint lacks {key!r}, which every released file of this task has.")
    shape = tuple(state_dict[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{key!r} has shape {list(shape)}; expected a {ndim}-d tensor.")
    return shape


def _ldm_unet_dims(state_dict: dict[str, torch.Tensor], task: str) -> dict[str, Any]:
    """Widths of the file's ldm UNet: `block_out_channels` (from the last conv of the first ResBlock of each level,
    ldm input blocks 1, 4, 7, 10 for two layers per block), `cross_attention_dim` and `in_channels`."""
    prefix = _TASK_PREFIX[task] + _LDM_UNET_PREFIX
    channels = [
        _shape(state_dict, f"{prefix}input_blocks.{1 + 3 * level}.0.out_layers.3.weight", 4)[0] for level in range(4)
    ]
    cross = _shape(state_dict, f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 2)[1]
    in_channels = _shape(state_dict, f"{prefix}input_blocks.0.0.weight", 4)[1]
    return {"block_out_channels": channels, "cross_attention_dim": cross, "in_channels": in_channels}


def _attention_levels(extras: Sequence[int], num_tokens: int, what: Sequence[str]) -> list[int]:
    """Attention resolutions (512-scale names 64/32/16) from the extra input channels of the three finest levels."""
    resolutions = []
    for resolution, extra, name in zip((64, 32, 16), extras, what, strict=True):
        if extra == num_tokens:
            resolutions.append(resolution)
        elif extra != 0:
            raise ValueError(
                f"{name} has {extra} input channels beyond the UNet features; expected 0 or {num_tokens} (one "
                "attention-map channel per text token). The file is not a VPD model of this layout."
            )
    return resolutions


def _infer_segmentation(sd: dict[str, torch.Tensor], channels: list[int], dim: int) -> dict[str, Any]:
    num_classes, head_channels, kh, kw = _shape(sd, "decode_head.conv_seg.weight", 4)
    if (kh, kw) != (1, 1):
        raise ValueError(
            f"'decode_head.conv_seg.weight' must be a 1x1 conv, got shape {[num_classes, head_channels, kh, kw]}."
        )
    fpn_channels, lateral0_in = _shape(sd, "neck.lateral_convs.0.conv.weight", 4)[:2]
    lateral_in = [lateral0_in]
    for level in range(1, 4):
        out, inputs = _shape(sd, f"neck.lateral_convs.{level}.conv.weight", 4)[:2]
        if out != fpn_channels:
            raise ValueError(
                f"'neck.lateral_convs.{level}.conv.weight' has {out} outputs, lateral 0 has {fpn_channels}."
            )
        lateral_in.append(inputs)
    for level in range(4):
        shape = _shape(sd, f"neck.fpn_convs.{level}.conv.weight", 4)
        if shape[:2] != (fpn_channels, fpn_channels):
            raise ValueError(
                f"'neck.fpn_convs.{level}.conv.weight' has shape {list(shape)}; expected "
                f"[{fpn_channels}, {fpn_channels}, 3, 3]."
            )
    # Semantic FPN: level i has max(1, i) ConvModules at Sequential indices 0, 2, 4 (odd indices are Upsample).
    for level in range(4):
        for step in range(max(1, level)):
            key = f"decode_head.scale_heads.{level}.{2 * step}.conv.weight"
            out, inputs = _shape(sd, key, 4)[:2]
            expected_in = fpn_channels if step == 0 else head_channels
            if (out, inputs) != (head_channels, expected_in):
                raise ValueError(
                    f"{key!r} maps {inputs} -> {out} channels, but 'decode_head.conv_seg.weight' reads {head_channels} "
                    f"channels and the FPN gives {fpn_channels}: expected {expected_in} -> {head_channels}. The head "
                    "widths of this file are inconsistent (not a VPD Semantic FPN head)."
                )
    extras = [inputs - width for inputs, width in zip(lateral_in, channels, strict=True)]
    if extras[3] != 0:
        raise ValueError(
            f"'neck.lateral_convs.3.conv.weight' reads {lateral_in[3]} channels; the 1/64 UNet map has {channels[3]} "
            "(VPD never adds attention maps there)."
        )
    names = [f"'neck.lateral_convs.{level}.conv.weight'" for level in range(3)]
    resolutions = _attention_levels(extras[:3], num_classes, names)
    if "class_embeddings" in sd:
        rows, width = _shape(sd, "class_embeddings", 2)
        if (rows, width) != (num_classes, dim):
            raise ValueError(
                f"'class_embeddings' has shape {[rows, width]}; expected [{num_classes}, {dim}] (one prompt per class)."
            )
    return {
        "num_labels": num_classes,
        "num_prompts": num_classes,
        "attention_resolutions": resolutions,
        "fpn_channels": fpn_channels,
        "semantic_head_channels": head_channels,
    }


def _infer_depth(sd: dict[str, torch.Tensor], channels: list[int], dim: int) -> dict[str, Any]:
    for key, width in (("encoder.layer1.0.weight", channels[0]), ("encoder.layer1.3.weight", channels[0]),
                       ("encoder.layer2.0.weight", channels[1])):  # fmt: skip
        shape = _shape(sd, key, 4)
        if shape[:2] != (width, width):
            raise ValueError(f"{key!r} has shape {list(shape)}; expected [{width}, {width}, 3, 3] for this UNet.")
    neck_channels, neck_in = _shape(sd, "encoder.out_layer.0.weight", 4)[:2]
    if neck_in != sum(channels):
        raise ValueError(
            f"'encoder.out_layer.0.weight' reads {neck_in} channels; the four UNet maps have {sum(channels)} "
            f"({' + '.join(map(str, channels))}). Depth variants with attention-map channels (e.g. EVP) are not "
            "VPD's released depth model."
        )
    filters, kernels, planes, index = [], [], neck_channels, 0
    while f"decoder.deconv_layers.{index}.weight" in sd:
        key = f"decoder.deconv_layers.{index}.weight"
        inputs, out, kh, kw = _shape(sd, key, 4)
        if inputs != planes or kh != kw:
            raise ValueError(f"{key!r} has shape {[inputs, out, kh, kw]}; expected [{planes}, C, k, k].")
        filters.append(out)
        kernels.append(kh)
        planes, index = out, index + 3  # ConvTranspose2d, BatchNorm2d, ReLU
    if not filters:
        raise ValueError("The checkpoint lacks 'decoder.deconv_layers.0.weight' (the depth decoder).")
    head_channels, conv_in = _shape(sd, "decoder.conv_layers.0.weight", 4)[:2]
    if conv_in != planes:
        raise ValueError(f"'decoder.conv_layers.0.weight' reads {conv_in} channels; the deconvolutions give {planes}.")
    for key, expected in (("last_layer_depth.0.weight", (head_channels, head_channels)),
                          ("last_layer_depth.2.weight", (1, head_channels))):  # fmt: skip
        shape = _shape(sd, key, 4)
        if shape[:2] != expected:
            raise ValueError(f"{key!r} has shape {list(shape)}; expected {list(expected)} + kernel.")
    overrides: dict[str, Any] = {
        "attention_resolutions": [],
        "depth_neck_channels": neck_channels,
        "depth_head_channels": head_channels,
        "depth_deconv_filters": filters,
        "depth_deconv_kernels": kernels,
    }
    if "encoder.class_embeddings" in sd:
        rows, width = _shape(sd, "encoder.class_embeddings", 2)
        if width != dim:
            raise ValueError(f"'encoder.class_embeddings' has width {width}; the text adapter has {dim}.")
        overrides["num_prompts"] = rows
    return overrides


def _infer_referring(sd: dict[str, torch.Tensor], channels: list[int]) -> dict[str, Any]:
    hidden, in4 = _shape(sd, "classifier.conv1_4.weight", 4)[:2]
    # conv1_4 reads the upsampled 1/64 map and the 1/32 map with its T token maps (doc section 7).
    tokens = in4 - channels[3] - channels[2]
    if tokens < 1:
        raise ValueError(
            f"'classifier.conv1_4.weight' reads {in4} channels: fewer than the {channels[3] + channels[2]} UNet "
            "channels plus at least one token map."
        )
    in3 = _shape(sd, "classifier.conv1_3.weight", 4)[1]
    if in3 != hidden + channels[1] + tokens:
        raise ValueError(
            f"Inconsistent referring head: 'classifier.conv1_4.weight' implies token_length {tokens}, so "
            f"'classifier.conv1_3.weight' should read {hidden} + {channels[1]} + {tokens} = "
            f"{hidden + channels[1] + tokens} channels, but reads {in3}."
        )
    in2 = _shape(sd, "classifier.conv1_2.weight", 4)[1]
    extras = [in2 - hidden - channels[0], tokens, tokens]
    resolutions = _attention_levels(extras, tokens, ["'classifier.conv1_2.weight'", "", ""])
    for key in ("classifier.conv2_4.weight", "classifier.conv2_3.weight", "classifier.conv2_2.weight"):
        shape = _shape(sd, key, 4)
        if shape[:2] != (hidden, hidden):
            raise ValueError(f"{key!r} has shape {list(shape)}; expected [{hidden}, {hidden}, 3, 3].")
    shape = _shape(sd, "classifier.conv1_1.weight", 4)
    if shape[:2] != (2, hidden):
        raise ValueError(f"'classifier.conv1_1.weight' has shape {list(shape)}; expected [2, {hidden}, 1, 1].")
    return {
        "num_prompts": 0,
        "token_length": tokens,
        "attention_resolutions": resolutions,
        "referring_decoder_channels": hidden,
    }


def infer_config_overrides(state_dict: dict[str, torch.Tensor], task: str) -> dict[str, Any]:
    r"""
    `VPDConfig` fields of the model in `state_dict`, read from its shapes, with consistency checks that reject files of
    another layout (doc section 10, point 7):

    - all tasks: `prompt_embed_dim` (the adapter width, which must equal the UNet's cross-attention width);
    - segmentation: `num_labels` = `num_prompts` (rows of `decode_head.conv_seg.weight`), `fpn_channels`,
      `semantic_head_channels` and `attention_resolutions` (FPN lateral inputs minus the UNet widths must be 0 or one
      channel per class);
    - depth: `depth_neck_channels`, `depth_head_channels`, `depth_deconv_filters`, `depth_deconv_kernels`, no attention
      maps, and `num_prompts` from `encoder.class_embeddings` when present;
    - referring: `token_length` T = `conv1_4` inputs minus the two deepest UNet widths (2560 for SD 1.5), checked
      against `conv1_3` (= decoder width + 640 + T), `referring_decoder_channels` and `attention_resolutions`.

    Raises:
        ValueError: a required key is missing or the shapes do not fit together.
    """
    _check_state_dict(state_dict)
    task = _check_task(task)
    dims = _ldm_unet_dims(state_dict, task)
    channels = dims["block_out_channels"]
    p = _TASK_PREFIX[task]
    (dim,) = _shape(state_dict, f"{p}gamma", 1)
    for index in (0, 2):
        shape = _shape(state_dict, f"{p}text_adapter.fc.{index}.weight", 2)
        if shape != (dim, dim):
            raise ValueError(f"'{p}text_adapter.fc.{index}.weight' has shape {list(shape)}; expected [{dim}, {dim}].")
    if dim != dims["cross_attention_dim"]:
        raise ValueError(
            f"The text adapter is {dim} wide but the UNet's cross-attention reads {dims['cross_attention_dim']}."
        )
    if task == "segmentation":
        overrides = _infer_segmentation(state_dict, channels, dim)
    elif task == "depth":
        overrides = _infer_depth(state_dict, channels, dim)
    else:
        overrides = _infer_referring(state_dict, channels)
    overrides["prompt_embed_dim"] = dim
    if channels == _SD15_WIDTHS:
        # A full-size file whose head differs from the release is most likely another experiment: say so.
        official = _OFFICIAL_WIDTHS.get(task, {})
        variants = {k: overrides[k] for k, v in official.items() if overrides[k] != v}
        if variants:
            logger.warning("Head widths differ from the released VPD %s model %s: %s.", task, official, variants)
    return overrides


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _group_keys(keys: Iterable[str]) -> dict[str, int]:
    """Counts keys per module prefix, for readable summaries (`{'sd_model': 13, 'vpd.vae': 108}`)."""
    long_prefixes = (
        "encoder." + _LDM_UNET_PREFIX,
        _LDM_UNET_PREFIX,
        "encoder." + _LDM_VAE_PREFIX,
        _LDM_VAE_PREFIX,
    )
    counts: Counter[str] = Counter()
    for key in keys:
        for prefix in long_prefixes:
            if key.startswith(prefix):
                rest = key[len(prefix) :].split(".")
                counts[prefix + rest[0] if len(rest) > 1 else prefix.rstrip(".")] += 1
                break
        else:
            # `vpd.unet.*`, `head.scale_heads.*`, `vpd.prompt_embeddings`, but `sd_model.*` (buffers) as one group.
            parts = key.split(".")
            counts[".".join(parts[: 2 if len(parts) > 2 or parts[0] == "vpd" else 1])] += 1
    return dict(sorted(counts.items()))


@dataclass
class ConversionReport:
    r"""
    What a conversion did with every tensor.

    Attributes:
        task: `"depth"`, `"segmentation"` or `"referring"`.
        source: the converted file (None for an in-memory state dict).
        converted: `{our key: key in the file}` for every tensor taken from the file.
        dropped: keys of the file deliberately not converted (noise-schedule buffers, VAE decoder parts, the UNet's
            unused output layers), see `docs/vpd-checkpoint-keys.md` section 9.
        unexpected: keys of the file that match nothing we know (not converted).
        missing: keys of the target model that the file does not provide.
        filled: `{our key: origin}` for the missing keys filled in by :func:`convert_checkpoint` (e.g. the Stable
            Diffusion folder's `vae/` or `text_encoder/`).
        ignored_entries: top-level entries of the file besides the weights (`meta`, `optimizer`, `args`, ...).
        config_overrides: the config fields inferred from the shapes.
        notes: anything else worth knowing (sanity checks, regenerated prompts, ...).
    """

    task: str
    source: str | None = None
    converted: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    filled: dict[str, str] = field(default_factory=dict)
    ignored_entries: list[str] = field(default_factory=list)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def unresolved(self) -> list[str]:
        """Missing keys that nothing filled in."""
        return [key for key in self.missing if key not in self.filled]

    def summary(self) -> str:
        """A few readable lines: counts per module prefix for each category."""

        def describe(keys: Iterable[str]) -> str:
            groups = _group_keys(keys)
            return ", ".join(f"{name} {count}" for name, count in groups.items()) if groups else "none"

        origins = Counter(self.filled.values())
        lines = [
            f"VPD {self.task} checkpoint" + (f" {self.source}" if self.source else ""),
            f"  converted:  {len(self.converted)} tensors ({describe(self.converted)})",
            f"  dropped:    {len(self.dropped)} ({describe(self.dropped)})",
            f"  unexpected: {len(self.unexpected)} ({describe(self.unexpected)})",
            f"  missing:    {len(self.missing)} ({describe(self.missing)})",
            f"  filled:     {len(self.filled)}"
            + (
                " (" + ", ".join(f"{count} from {origin}" for origin, count in origins.items()) + ")" if origins else ""
            ),
        ]
        if self.ignored_entries:
            lines.append(f"  ignored file entries: {', '.join(self.ignored_entries)}")
        if self.config_overrides:
            lines.append(f"  inferred config: {self.config_overrides}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["unresolved"] = self.unresolved
        return data

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)


# ---------------------------------------------------------------------------------------------------------------------
# State-dict conversion
# ---------------------------------------------------------------------------------------------------------------------


def _model_class(task: str) -> type:
    from .modeling_vpd import TASK_MODEL_CLASSES

    return TASK_MODEL_CLASSES[task]


def _target_tensors(task: str, config: VPDConfig) -> dict[str, torch.Tensor]:
    """The state dict of the target model, built on the meta device (shapes and dtypes only, no memory)."""
    with torch.device("meta"):
        model = _model_class(task)(config)
    return dict(model.state_dict())


def _run_ldm_converter(
    kind: str,
    converter: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]],
    component: dict[str, torch.Tensor],
    file_prefix: str,
    ldm_prefix: str,
    component_config: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Runs one of diffusers' ldm converters on the `component` tensors (keys without `file_prefix`) and returns the
    diffusers-named tensors and `{diffusers key: file key}`; every given tensor must come out exactly once.

    The converter runs on meta-device stand-ins, one fresh tensor per key, so that each output can be traced back to
    its file key (the same object, or a view of it where diffusers squeezes the VAE attention's 1x1 conv weights into
    Linear weights) and no memory is touched; the real tensors are then renamed (and reshaped) accordingly.
    """
    # diffusers' helpers only look for the ldm checkpoint prefixes (`model.diffusion_model.`, `first_stage_model.`):
    # without this rewrite the UNet helper returns nothing and the VAE helper keeps unusable names (doc section 10).
    stand_ins = {
        ldm_prefix + key: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        for key, tensor in component.items()
    }
    try:
        outputs = converter(stand_ins, dict(component_config))
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise RuntimeError(
            f"diffusers' ldm {kind} converter failed ({type(error).__name__}: {error}); it is a semi-internal helper, "
            f"tested here with diffusers {TESTED_DIFFUSERS_VERSION}."
        ) from error
    by_id = {id(tensor): key for key, tensor in stand_ins.items()}
    renamed: dict[str, torch.Tensor] = {}
    mapping: dict[str, str] = {}
    for key, output in outputs.items():
        source = by_id.get(id(output))
        if source is None and isinstance(output, torch.Tensor) and output._base is not None:
            source = by_id.get(id(output._base))
        if source is None:
            raise RuntimeError(
                f"Cannot tell which file tensor diffusers' ldm {kind} converter put under {key!r}: this diffusers "
                f"version does more than rename (tested with {TESTED_DIFFUSERS_VERSION})."
            )
        real = component[source[len(ldm_prefix) :]]
        if output.shape != real.shape:
            if output.numel() != real.numel():
                raise RuntimeError(
                    f"diffusers' converter changed {source!r} {list(real.shape)} to {list(output.shape)}."
                )
            real = real.reshape(output.shape)
        renamed[key] = real
        mapping[key] = file_prefix + source[len(ldm_prefix) :]
    used = Counter(mapping.values())
    unused = sorted(set(file_prefix + key for key in component) - set(used))
    repeated = sorted(key for key, count in used.items() if count > 1)
    if unused or repeated:
        raise RuntimeError(
            f"diffusers' ldm {kind} converter turned {len(component)} tensors into {len(outputs)} keys (unused: "
            f"{unused[:5]}, used twice: {repeated[:5]}); expected a one-to-one renaming (tested with diffusers "
            f"{TESTED_DIFFUSERS_VERSION})."
        )
    return renamed, mapping


def _convert_diffusion_parts(
    state_dict: dict[str, torch.Tensor], task: str, config: VPDConfig, drop: list[re.Pattern[str]]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """UNet and VAE encoder: ldm names -> `vpd.unet.*` / `vpd.vae.*` through diffusers' converters. Returns the
    renamed tensors and `{our key: file key}`."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    p = _TASK_PREFIX[task]
    new: dict[str, torch.Tensor] = {}
    converted: dict[str, str] = {}
    parts = (
        ("UNet", p + _LDM_UNET_PREFIX, _DIFFUSERS_LDM_UNET_PREFIX, convert_ldm_unet_checkpoint, config.unet_config,
         "vpd.unet."),
        ("VAE", p + _LDM_VAE_PREFIX, _DIFFUSERS_LDM_VAE_PREFIX, convert_ldm_vae_checkpoint, config.vae_config,
         "vpd.vae."),
    )  # fmt: skip
    for kind, file_prefix, ldm_prefix, converter, component_config, our_prefix in parts:
        component = {
            key[len(file_prefix) :]: tensor
            for key, tensor in state_dict.items()
            if key.startswith(file_prefix) and not any(rule.search(key) for rule in drop)
        }
        if not component:
            continue  # e.g. the slim segmentation file without the frozen VAE: reported as missing
        outputs, mapping = _run_ldm_converter(kind, converter, component, file_prefix, ldm_prefix, component_config)
        for key, tensor in outputs.items():
            new[our_prefix + key] = tensor
            converted[our_prefix + key] = mapping[key]
    return new, converted


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], task: str, config: VPDConfig
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    r"""
    Renames a released VPD state dict (keys as in the file, see :func:`load_official_state_dict`) to the parameter
    names of the vpd_hf model of `task` built from `config`.

    - UNet (`unet.unet.diffusion_model.*`, under `encoder.` for depth) and VAE (`encoder_vq.*`): diffusers'
      `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` after rewriting the prefixes they expect, each
      checked to rename every tensor exactly once, then prefixed `vpd.unet.` / `vpd.vae.` (encoder + quant_conv).
    - TextAdapter `text_adapter.fc.{0,2}` -> `vpd.text_adapter.linear_{1,2}`, `gamma` -> `vpd.text_adapter.gamma`,
      `class_embeddings` -> `vpd.prompt_embeddings`; heads: mmcv `ConvModule` names -> ours (segmentation),
      `encoder.{layer1,layer2,out_layer}` -> `head.neck.*`, `decoder.*` -> `head.decoder.*` (depth),
      `classifier.*` -> `decoder.*` (referring).
    - Dropped: `sd_model.*`, the VAE's `post_quant_conv`/`decoder`, the UNet's `out.*`.

    Every converted tensor is checked against the target model's shape (ValueError naming the key otherwise); keys the
    file does not provide are listed in `report.missing`, unknown file keys in `report.unexpected`. Tensors are not
    copied: the output shares memory with `state_dict` (the VAE attention weights are reshaped views).

    Returns:
        `(new_state_dict, report)`.
    """
    _check_state_dict(state_dict)
    task = _check_task(task)
    if not isinstance(config, VPDConfig):
        raise TypeError(f"`config` must be a VPDConfig, got {type(config).__name__}.")
    bad = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if bad:
        raise TypeError(f"`state_dict` values must be tensors; these are not: {bad[:5]}.")

    drop = _drop_rules(task)
    new, converted = _convert_diffusion_parts(state_dict, task, config, drop)
    report = ConversionReport(task=task)
    handled = set(converted.values())
    rules = _rename_rules(task)
    for key, tensor in state_dict.items():
        if key in handled:
            continue
        if any(rule.search(key) for rule in drop):
            report.dropped.append(key)
            continue
        for pattern, replacement in rules:
            if pattern.match(key):
                target = pattern.sub(replacement, key)
                new[target] = tensor
                converted[target] = key
                break
        else:
            report.unexpected.append(key)

    target = _target_tensors(task, config)
    for key in sorted(set(new) - set(target)):
        # Renamed but not part of our model (e.g. an extra scale-head conv): report the file key as unexpected.
        report.unexpected.append(converted.pop(key))
        del new[key]
    for key, tensor in new.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ValueError(
                f"Shape mismatch for {converted[key]!r} -> {key!r}: the file has {list(tensor.shape)}, the model built "
                f"from the config expects {list(target[key].shape)}. The config does not describe this checkpoint."
            )
    report.converted = dict(sorted(converted.items()))
    report.missing = sorted(set(target) - set(new))
    report.dropped.sort()
    report.unexpected.sort()
    return new, report


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"`dtype` must be a floating torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}.")


def _names(value: Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(item, str) and item for item in value):
        raise TypeError(f"`{name}` must be a list of non-empty strings, got {value!r}.")
    names = list(value)
    if len(set(names)) != len(names):
        raise ValueError(f"`{name}` must not contain duplicates.")
    return names


def _component_configs(stable_diffusion: str | os.PathLike | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The UNet and VAE configs: the Stable Diffusion folder's `unet/` and `vae/` configs, or SD 1.5's."""
    if stable_diffusion is None:
        return dict(SD15_UNET_CONFIG), dict(SD15_VAE_CONFIG)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = str(stable_diffusion)
    unet_config = dict(UNet2DConditionModel.load_config(path, subfolder="unet"))
    vae_config = dict(AutoencoderKL.load_config(path, subfolder="vae"))
    return unet_config, vae_config


def _check_backbone(state_dict: dict[str, torch.Tensor], task: str, unet_config: dict[str, Any], source: str) -> None:
    dims = _ldm_unet_dims(state_dict, task)
    expected = {
        "block_out_channels": list(unet_config.get("block_out_channels", ())),
        "cross_attention_dim": unet_config.get("cross_attention_dim"),
        "in_channels": unet_config.get("in_channels", 4),
    }
    if dims != expected:
        raise ValueError(
            f"The checkpoint's UNet has {dims}, but the {source} UNet config has {expected}. Pass "
            "`stable_diffusion` = the diffusers folder of the base model the checkpoint was fine-tuned from."
        )


def _load_prompt_table(value: str | os.PathLike | torch.Tensor, trust_pickle: bool) -> torch.Tensor:
    """A prompt table given as a tensor or a file (the official `class_embeddings.pth` is a pickled tensor)."""
    if isinstance(value, torch.Tensor):
        return value
    path = _check_path(value, "prompt_embeddings")
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        tensors = _torch_load(path, trust_pickle)
    else:
        raise ValueError(f"`prompt_embeddings` must be a tensor or a .safetensors/.pth file, got {path.name!r}.")
    if isinstance(tensors, dict):
        if len(tensors) != 1:
            raise ValueError(f"{path.name} holds {len(tensors)} entries; expected a single [num_prompts, dim] tensor.")
        tensors = next(iter(tensors.values()))
    if not isinstance(tensors, torch.Tensor):
        raise ValueError(f"{path.name} holds a {type(tensors).__name__}; expected a tensor.")
    return tensors


def _fill_missing(
    new: dict[str, torch.Tensor],
    report: ConversionReport,
    task: str,
    config: VPDConfig,
    stable_diffusion: str | os.PathLike | None,
    prompt_table: torch.Tensor | None,
    target: dict[str, torch.Tensor],
) -> None:
    """Fills what the file lacks: the VAE encoder and the CLIP text encoder from the Stable Diffusion folder, the prompt
    table from `prompt_table` or (with a note) re-embedded with the Stable Diffusion text encoder, and BatchNorm
    `num_batches_tracked` counters (unused in eval) with 0. Groups are all-or-nothing: a partly missing UNet, VAE or
    head means a broken file and stays unresolved."""
    missing = set(report.missing)

    def require_sd(what: str) -> str:
        if stable_diffusion is None:
            raise ValueError(
                f"The checkpoint lacks {what}; pass `stable_diffusion` (a diffusers-layout Stable Diffusion folder, "
                "the base model VPD was fine-tuned from, e.g. stable-diffusion-v1-5) to take it from there."
            )
        return str(stable_diffusion)

    vae_keys = {key for key in target if key.startswith("vpd.vae.")}
    if vae_keys and vae_keys <= missing:
        from diffusers import AutoencoderKL

        path = require_sd("the VAE encoder (`encoder_vq.*`)")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae").state_dict()
        absent = sorted(key for key in vae_keys if key[len("vpd.vae.") :] not in vae)
        if absent:
            raise ValueError(f"{path}/vae lacks {absent[:5]}: not the VAE this model needs.")
        for key in vae_keys:
            new[key] = vae[key[len("vpd.vae.") :]]
            report.filled[key] = f"{path}/vae"
        report.notes.append("VAE encoder taken from the Stable Diffusion folder (VPD keeps it frozen).")

    text_keys = {key for key in target if key.startswith("text_encoder.")}
    if text_keys and text_keys <= missing:
        from transformers import CLIPTextModel

        path = require_sd("the CLIP text encoder (never part of the released files)")
        text_state = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").state_dict()
        absent = sorted(key for key in text_keys if key[len("text_encoder.") :] not in text_state)
        if absent:
            raise ValueError(f"{path}/text_encoder lacks {absent[:5]}: not the text encoder this model needs.")
        for key in text_keys:
            new[key] = text_state[key[len("text_encoder.") :]]
            report.filled[key] = f"{path}/text_encoder"

    if "vpd.prompt_embeddings" in target:
        expected = tuple(target["vpd.prompt_embeddings"].shape)
        if prompt_table is not None:
            if tuple(prompt_table.shape) != expected:
                raise ValueError(
                    f"`prompt_embeddings` has shape {list(prompt_table.shape)}; the model needs {list(expected)}."
                )
            if "vpd.prompt_embeddings" not in missing:
                report.notes.append("The file's prompt table was replaced by the given `prompt_embeddings`.")
            new["vpd.prompt_embeddings"] = prompt_table.float()
            report.filled["vpd.prompt_embeddings"] = "prompt_embeddings argument"
        elif "vpd.prompt_embeddings" in missing:
            from transformers import CLIPTextModel, CLIPTokenizer

            from .prompts import encode_prompts

            path = require_sd("the class/scene prompt table (`class_embeddings`) and no `prompt_embeddings` was given")
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            max_length = NYU_PROMPT_MAX_LENGTH if task == "depth" else None
            new["vpd.prompt_embeddings"] = encode_prompts(
                text_encoder, tokenizer, config.prompt_names, config.prompt_templates, max_length, show_progress=False
            )
            report.filled["vpd.prompt_embeddings"] = f"{path}/text_encoder (re-embedded prompts)"
            report.notes.append(
                "The prompt table was re-embedded with the Stable Diffusion text encoder; the authors' released "
                "table gives slightly different numbers (issue wl-zhao/VPD#56). Prefer `prompt_embeddings=` with "
                "the repository's class_embeddings.pth / nyu_class_embeddings.pth."
            )

    for key in missing:
        if key.endswith(".num_batches_tracked") and key not in new:
            new[key] = torch.zeros((), dtype=torch.long)
            report.filled[key] = "zero (BatchNorm counter, unused in eval)"


def _empty_model(task: str, config: VPDConfig) -> torch.nn.Module:
    """The model without random weights: parameters on the meta device, buffers real (so that non-persistent ones,
    like CLIP's `position_ids`, are initialised). Its state dict doubles as the conversion target."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return _model_class(task)(config)


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Assigns `weights` to the empty `model`: every key must be there, no other (strict), nothing left on meta."""
    reference = dict(model.state_dict())
    missing, unknown = sorted(set(reference) - set(weights)), sorted(set(weights) - set(reference))
    if missing or unknown:
        raise RuntimeError(f"Weights do not match the model: missing {missing[:5]}, unexpected {unknown[:5]}.")
    prepared = {}
    for key, tensor in weights.items():
        # Keep integer buffers (BatchNorm counters) integer; bring floats to the model's dtype (float32).
        wanted = reference[key].dtype
        prepared[key] = (tensor.to(wanted) if tensor.is_floating_point() else tensor).contiguous()
    model.load_state_dict(prepared, strict=True, assign=True)
    leftovers = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftovers:
        raise RuntimeError(f"These tensors were not loaded: {leftovers[:10]}.")
    return model.eval()


def _compare_vae_with_stable_diffusion(
    new: dict[str, torch.Tensor], report: ConversionReport, stable_diffusion: str
) -> None:
    """The VAE is frozen in VPD, so the file's copy should equal the base model's: a cheap provenance check."""
    from diffusers import AutoencoderKL

    reference = AutoencoderKL.from_pretrained(stable_diffusion, subfolder="vae").state_dict()
    worst = 0.0
    for key, tensor in new.items():
        if key.startswith("vpd.vae.") and key in report.converted:
            other = reference.get(key[len("vpd.vae.") :])
            if other is None or other.shape != tensor.shape:
                report.notes.append(f"VAE check skipped: {key} has no counterpart in {stable_diffusion}/vae.")
                return
            worst = max(worst, (tensor.float() - other.float()).abs().max().item())
    report.notes.append(f"VAE encoder of the file vs {stable_diffusion}/vae: max abs difference {worst:.3g}.")


def convert_checkpoint(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    task: str | None = None,
    stable_diffusion: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    class_names: Sequence[str] | None = None,
    scene_names: Sequence[str] | None = None,
    token_length: int | None = None,
    dtype: str | torch.dtype | None = None,
    prompt_embeddings: str | os.PathLike | torch.Tensor | None = None,
    strict: bool = True,
) -> ConversionReport:
    r"""
    Converts a released VPD checkpoint into a vpd_hf folder: `config.json`, `model.safetensors`, the processor files
    and `conversion_report.json`, loadable with `VPDModelFor*.from_pretrained(output_dir)`.

    Args:
        path: the released file (`.safetensors`, or a pickle with `trust_pickle=True`).
        output_dir: the folder to write (created if needed; existing files are overwritten).
        task: `"depth"`, `"segmentation"` or `"referring"`; detected from the keys when None (and checked when given).
        stable_diffusion: a diffusers-layout Stable Diffusion folder (or Hub id), the base model of the checkpoint
            (`stable-diffusion-v1-5`). Its `unet/` and `vae/` configs describe the model (SD 1.5's when None), and it
            supplies what the file lacks: the VAE encoder (may be absent from the "slim" segmentation file), the CLIP
            text encoder and tokenizer (referring: required), a re-embedded prompt table (when the file has none).
        trust_pickle: allow unpickling `path` (and a pickled `prompt_embeddings`); only for files you trust.
        class_names: segmentation label names in label order (default: the 150 ADE20K classes).
        scene_names: depth scene names in prompt-table order (default: the 27 NYUv2 scenes, official order).
        token_length: referring tokens per expression; must equal the one the file was trained with (inferred).
        dtype: dtype of the saved weights (`"float32"` default as in the file, `"float16"`, `"bfloat16"`).
        prompt_embeddings: the prompt table `[num_prompts, dim]` (tensor or file) to use instead of the file's, e.g.
            the repository's `segmentation/class_embeddings.pth` when the slim file lacks `class_embeddings`.
        strict: raise on file keys that match nothing known (else they are reported and skipped).

    Returns:
        The :class:`ConversionReport` (also written to `output_dir/conversion_report.json`).

    Raises:
        ValueError: bad arguments, an untrusted pickle, a file of another layout, or weights that nothing supplies.
    """
    from .image_processing_vpd import VPDImageProcessor
    from .processing_vpd import VPDProcessor

    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"`output_dir` must be a str or os.PathLike, got {type(output_dir).__name__}.")
    if stable_diffusion is not None and not isinstance(stable_diffusion, (str, os.PathLike)):
        raise TypeError(f"`stable_diffusion` must be a folder path or Hub id, got {type(stable_diffusion).__name__}.")
    if token_length is not None and (not isinstance(token_length, int) or isinstance(token_length, bool)):
        raise TypeError(f"`token_length` must be an int, got {token_length!r}.")
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be a bool, got {strict!r}.")
    torch_dtype = _resolve_dtype(dtype)
    class_names, scene_names = _names(class_names, "class_names"), _names(scene_names, "scene_names")
    prompt_table = None if prompt_embeddings is None else _load_prompt_table(prompt_embeddings, trust_pickle)

    state_dict, ignored = _read_checkpoint(path, trust_pickle)
    detected = detect_task(state_dict)
    if task is not None and _check_task(task) != detected:
        raise ValueError(f"`task` is {task!r} but the checkpoint is a {detected} model (by its keys).")
    task = detected
    if task == "referring" and stable_diffusion is None:
        raise ValueError(
            "Referring checkpoints do not contain the CLIP text encoder: pass `stable_diffusion` (its "
            "`text_encoder/` and `tokenizer/` are openai/clip-vit-large-patch14, the encoder VPD used)."
        )
    unet_config, vae_config = _component_configs(stable_diffusion)
    _check_backbone(state_dict, task, unet_config, "Stable Diffusion folder's" if stable_diffusion else "SD 1.5")
    overrides = infer_config_overrides(state_dict, task)
    kwargs = dict(overrides)

    if task == "segmentation":
        num_classes = kwargs.pop("num_labels")
        if class_names is None:
            if num_classes != len(ADE20K_CLASS_NAMES):
                raise ValueError(f"The checkpoint has {num_classes} classes, not ADE20K's 150: pass `class_names`.")
            class_names = list(ADE20K_CLASS_NAMES)
        if len(class_names) != num_classes:
            raise ValueError(f"`class_names` has {len(class_names)} names; the checkpoint has {num_classes} classes.")
        kwargs.update(
            prompt_names=class_names,
            prompt_templates=[ADE20K_PROMPT_TEMPLATE],
            id2label=dict(enumerate(class_names)),
            label2id={name: index for index, name in enumerate(class_names)},
            semantic_inference_mode="slide",
        )
    elif task == "depth":
        rows = kwargs.get("num_prompts")
        if rows is None and prompt_table is not None:
            rows = prompt_table.shape[0]
        if scene_names is None:
            if rows not in (None, len(NYU_SCENE_NAMES)):
                raise ValueError(f"The prompt table has {rows} rows, not NYUv2's 27 scenes: pass `scene_names`.")
            scene_names = list(NYU_SCENE_NAMES)
        if rows is not None and len(scene_names) != rows:
            raise ValueError(f"`scene_names` has {len(scene_names)} names; the prompt table has {rows} rows.")
        kwargs.update(
            num_prompts=len(scene_names),
            prompt_names=scene_names,
            prompt_templates=list(CLIP_IMAGENET_TEMPLATES),
            max_depth=10.0,  # the released model's `--max_depth` (not stored in the file)
        )
    else:
        if token_length is not None and token_length != kwargs["token_length"]:
            raise ValueError(
                f"`token_length` is {token_length} but the checkpoint's head was trained with {kwargs['token_length']} "
                "tokens per expression (from 'classifier.conv1_4.weight')."
            )
        from transformers import CLIPTextConfig

        text_config = CLIPTextConfig.from_pretrained(str(stable_diffusion), subfolder="text_encoder")
        kwargs["text_config"] = text_config.to_dict()

    # The released models were fine-tuned from Stable Diffusion v1-5.
    kwargs.setdefault("base_model", str(stable_diffusion) if stable_diffusion else SD15_HUB_ID)
    config = VPDConfig(unet_config=unet_config, vae_config=vae_config, **kwargs)
    new, report = convert_state_dict(state_dict, task, config)
    report.source = str(path)
    report.ignored_entries = ignored
    report.config_overrides = overrides
    if report.unexpected:
        message = f"{len(report.unexpected)} keys of the file match nothing known: {report.unexpected[:10]}"
        if strict:
            raise ValueError(message + " (pass `strict=False` to skip them).")
        logger.warning("%s; skipped.", message)
    model = _empty_model(task, config)
    target = dict(model.state_dict())
    if stable_diffusion is not None and any(key.startswith("vpd.vae.") for key in report.converted):
        _compare_vae_with_stable_diffusion(new, report, str(stable_diffusion))
    _fill_missing(new, report, task, config, stable_diffusion, prompt_table, target)
    if report.unresolved:
        raise ValueError(
            f"The checkpoint lacks {len(report.unresolved)} weights of the model that nothing supplies: "
            f"{_group_keys(report.unresolved)} (e.g. {report.unresolved[:5]})."
        )

    model = _load_weights(model, new)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if task == "referring":
        processor = VPDProcessor.from_stable_diffusion(str(stable_diffusion), token_length=config.token_length)
    else:
        processor = VPDImageProcessor.for_task(task)
    processor.save_pretrained(output_dir)
    (output_dir / "conversion_report.json").write_text(report.to_json())
    logger.info("Converted %s (%s) -> %s", path, task, output_dir)
    return report


__all__ = [
    "PICKLE_SUFFIXES",
    "TASKS",
    "TESTED_DIFFUSERS_VERSION",
    "ConversionReport",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_task",
    "infer_config_overrides",
    "load_official_state_dict",
]
