"""Stable Diffusion UNet families as VPD backbones: where the feature taps and the attention-map layers sit, and how
the UNet is conditioned, all derived from the diffusers `UNet2DConditionModel` config by :func:`backbone_layout`.

The rule (VPD's choice for SD 1.5, stated for any supported layout). Level `l` is the UNet resolution at latent
stride `2**l` (image stride `8 * 2**l`); VPD reads one decoder-side map per image stride 8, 16, 32 and 64:

* stride 8 (level 0): the UNet output itself (its output norm and conv are removed), i.e. after the last up block;
* levels `l >= 1`: inside the up block of level `l`, after layer `layers_per_block - 1` (0-based; each up block has
  `layers_per_block + 1` resnet(+transformer) layers). That is after the layers that consume the skip connections of
  the same level's down-block layers, before the last one, which consumes the skip from the level above. For SD 1.5
  these are ldm output blocks 1, 4 and 7 (`up_blocks.0.resnets.1`, `up_blocks.1.attentions.1`,
  `up_blocks.2.attentions.1`), as in the official code; the transformer output where the block has one, else the
  resnet output.
* 4-level UNets (SD 1.x, SD 2.x) have all four levels. 3-level UNets (SDXL) have no stride-64 level; its map is
  **derived**: 2x2 average pooling (stride 2) of the mid block's output, the UNet's deepest feature (1/32, 1280
  channels for SDXL). It is parameter-free, so the heads see four maps at strides 8/16/32/64 with no change; images
  are still padded to a multiple of 64 so that the pooling is exact.

Cross-attention maps of a level (named by their size for a 512x512 input: 64, 32, 16 for levels 0, 1, 2) average the
`attn2` layers of every transformer block of that level's down and up blocks (not the mid block), as VPD does: for SD
1.x/2.x 2 down + 3 up layers per level; for SDXL 2x2 + 3x2 = 10 at 32 and 2x10 + 3x10 = 50 at 16, none at 64 (SDXL's
first level has no cross-attention, so `attention_resolutions` may not contain 64).

Conditioning (see also `vpd_hf.prompts.encode_dual_prompts`): SD 1.x/2.x use one CLIP text encoder whose last hidden
state (after the final LayerNorm) is the UNet's context; a VPD prompt token is that state at the EOS token (the pooled
output), as in VPD. SDXL's context is the concatenation of the *penultimate* hidden states of its two encoders (CLIP
ViT-L, 768, and OpenCLIP bigG, 1280 -> 2048) and it also takes `added_cond_kwargs`: `text_embeds`, the second encoder's
projected pooled output (1280), and `time_ids` (original size, crop top-left, target size). VPD on SDXL therefore uses:

* prompt tokens: the concatenated penultimate states at the EOS token (the same space as SDXL's context tokens);
* a pooled table beside the prompt table: the second encoder's `text_embeds` of each prompt (template-averaged like
  the tokens); an image conditioned on one prompt row gets that row, a context of the whole table (segmentation) or
  the unknown prompt gets the table's mean; referring expressions get their own pooled output;
* `time_ids = (H, W, 0, 0, H, W)` with `(H, W)` the padded image size the UNet sees (no crop), which is what the SDXL
  pipeline passes by default for an image of that size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Stable Diffusion 1.5 component configs (the non-default entries of `unet/config.json` and `vae/config.json` of
# `stable-diffusion-v1-5/stable-diffusion-v1-5`); every other argument takes the diffusers default.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

# Published diffusers configs (`unet/config.json`, non-default entries) of the other supported families; every other
# constructor argument takes the diffusers default. `stabilityai/stable-diffusion-2-1`: SD 1.5's layout with per-block
# head dims, linear projections and a 1024-wide context.
SD21_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}

# `stabilityai/stable-diffusion-xl-base-1.0`:
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

# Stable Diffusion 1.x/2.x's VAE (`vae/config.json`; VPD keeps its encoder).
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# SDXL's VAE: SD's architecture with another latent scale (`vae/config.json` of the same repository).
SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# Text encoders (transformers `CLIPTextConfig` arguments) of SD 2.x (OpenCLIP ViT-H in the CLIP layout, 23 of its 24
# layers, so that the last hidden state is OpenCLIP's penultimate one) and SDXL's two encoders.
SD21_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512,
}  # fmt: skip
SDXL_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768,
}  # fmt: skip
SDXL_TEXT_CONFIG_2: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280,
}  # fmt: skip

# Display names of the families (README, model cards, error messages).
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
NUM_TAPS = 4  # feature maps at image strides 8, 16, 32, 64
TIME_IDS_LENGTH = 6  # SDXL's (original h, w, crop top, left, target h, w)
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # -> has cross-attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
UNET_OUTPUT = ""  # tap "module" meaning the UNet's own output


@dataclass(frozen=True)
class FeatureTap:
    """Where one VPD feature map comes from: the output of UNet module `module` (`UNET_OUTPUT` = the UNet's output),
    average-pooled by `pool` (1 = as is), with `channels` channels, at latent stride `latent_stride`."""

    module: str
    channels: int
    latent_stride: int
    pool: int = 1


@dataclass(frozen=True)
class BackboneLayout:
    r"""
    What VPD reads from a UNet, derived from its config by :func:`backbone_layout`.

    Attributes:
        family: `"sd1"`, `"sd2"` or `"sdxl"` (a label: SDXL = `addition_embed_type="text_time"`, SD 2.x = linear
            transformer projections, SD 1.x otherwise).
        num_levels: UNet resolution levels (4 for SD 1.x/2.x, 3 for SDXL).
        taps: the four feature taps, finest first (latent strides 1, 2, 4, 8).
        attention_layers: per level with cross-attention, the `attn2` module names whose maps are averaged.
        text_time: whether the UNet needs SDXL's `added_cond_kwargs` (`text_embeds`, `time_ids`).
        pooled_dim: width of `text_embeds` (SDXL), else None.
    """

    family: str
    num_levels: int
    taps: tuple[FeatureTap, ...]
    attention_layers: dict[int, tuple[str, ...]] = field(default_factory=dict)
    text_time: bool = False
    pooled_dim: int | None = None

    @property
    def channels(self) -> list[int]:
        """UNet channels of the four taps, finest first (SD 1.5: 320, 640, 1280, 1280)."""
        return [tap.channels for tap in self.taps]

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]


def _per_level(value: Any, levels: int, name: str) -> list[int]:
    items = [value] * levels if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        isinstance(items, (str, bytes))
        or not hasattr(items, "__iter__")
        or len(list(items)) != levels
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items)
    ):
        raise ValueError(
            f"`unet_config['{name}']` must be a positive integer or {levels} of them (one per level), got {value!r}."
        )
    return list(items)


def backbone_layout(unet_config: dict[str, Any]) -> BackboneLayout:
    r"""
    The VPD taps, attention-map layers and conditioning of a diffusers `UNet2DConditionModel` config (see the module
    docstring for the rule). Raises `ValueError` naming the offending `unet_config` entry for layouts VPD does not
    support.
    """
    if not isinstance(unet_config, dict):
        raise TypeError(f"`unet_config` must be a dict, got {type(unet_config).__name__}.")
    down = list(unet_config.get("down_block_types", ()))
    up = list(unet_config.get("up_block_types", ()))
    channels = unet_config.get("block_out_channels", ())
    if isinstance(channels, (str, bytes)) or not hasattr(channels, "__iter__"):
        raise TypeError(f"`unet_config['block_out_channels']` must be a list of integers, got {channels!r}.")
    channels = list(channels)
    levels = len(channels)
    if levels not in (3, 4) or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ValueError(
            "`unet_config['block_out_channels']` must be 4 (SD 1.x/2.x) or 3 (SDXL) positive integers, one per UNet "
            f"level, got {channels}."
        )
    if (
        len(down) != levels
        or len(up) != levels
        or any(t not in _DOWN_TYPES for t in down)
        or any(t not in _UP_TYPES for t in up)
        or [_DOWN_TYPES[t] for t in down] != [_UP_TYPES[t] for t in reversed(up)]
        or not any(_DOWN_TYPES[t] for t in down)
    ):
        raise ValueError(
            "`unet_config` must describe a Stable Diffusion style UNet: one down and one up block per level, each "
            "CrossAttnDownBlock2D/DownBlock2D (CrossAttnUpBlock2D/UpBlock2D), the up blocks mirroring the down blocks "
            "(e.g. SD 1.x/2.x: down ['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'], up ['UpBlock2D'] + "
            f"['CrossAttnUpBlock2D'] * 3; SDXL: three levels, no cross-attention at the first); got down={down}, up={up}."
        )
    layers = _per_level(unet_config.get("layers_per_block", 2), levels, "layers_per_block")
    if set(layers) != {2}:
        raise ValueError(
            f"`unet_config['layers_per_block']` must be 2 (VPD taps the second of the three layers of each decoder "
            f"level), got {unet_config.get('layers_per_block')}."
        )
    transformer_layers = unet_config.get("transformer_layers_per_block", 1)
    transformer_layers = _per_level(transformer_layers, levels, "transformer_layers_per_block")
    if unet_config.get("reverse_transformer_layers_per_block") is not None:
        raise ValueError("`unet_config['reverse_transformer_layers_per_block']` is not supported (must be None).")
    for key in ("class_embed_type", "encoder_hid_dim_type", "num_class_embeds", "time_cond_proj_dim"):
        if unet_config.get(key) is not None:
            raise ValueError(f"`unet_config['{key}']` must be None for a VPD backbone, got {unet_config[key]!r}.")
    if unet_config.get("dual_cross_attention") or unet_config.get("only_cross_attention"):
        raise ValueError("`unet_config['dual_cross_attention']` / `['only_cross_attention']` must be False.")
    if not isinstance(unet_config.get("cross_attention_dim", 1280), int):
        raise ValueError(
            "`unet_config['cross_attention_dim']` must be one integer (the text context width), got "
            f"{unet_config.get('cross_attention_dim')!r}."
        )
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _MID_TYPES:
        raise ValueError(f"`unet_config['mid_block_type']` must be one of {list(_MID_TYPES)}, got {mid!r}.")
    addition = unet_config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise ValueError(
            f"`unet_config['addition_embed_type']` must be None (SD 1.x/2.x) or 'text_time' (SDXL), got {addition!r}."
        )
    pooled_dim = None
    if addition == "text_time" and levels != 3:
        # the SDXL refiner (4 levels) conditions on an aesthetic score with 5 time ids, not SDXL base's 6
        raise ValueError(
            "`unet_config['addition_embed_type']` 'text_time' is supported on SDXL-base-shaped UNets (3 levels); got "
            f"{levels} levels (the SDXL refiner's layout is not supported)."
        )
    if addition == "text_time":
        time_dim = unet_config.get("addition_time_embed_dim")
        total = unet_config.get("projection_class_embeddings_input_dim")
        if not isinstance(time_dim, int) or not isinstance(total, int) or total <= TIME_IDS_LENGTH * time_dim:
            raise ValueError(
                "`unet_config['projection_class_embeddings_input_dim']` must exceed 6 x "
                f"`['addition_time_embed_dim']` (pooled text width + 6 time ids), got {total!r} and {time_dim!r}."
            )
        pooled_dim = total - TIME_IDS_LENGTH * time_dim

    taps = [FeatureTap(UNET_OUTPUT, channels[0], 1)]
    for level in range(1, levels):
        block = levels - 1 - level
        kind = "attentions" if _UP_TYPES[up[block]] else "resnets"
        taps.append(FeatureTap(f"up_blocks.{block}.{kind}.{layers[level] - 1}", channels[level], 2**level))
    if levels == 3:  # SDXL: the stride-64 map is the mid block's (stride-32) output pooled 2x2
        taps.append(FeatureTap("mid_block", channels[-1], 8, pool=2))

    attention_layers: dict[int, tuple[str, ...]] = {}
    for level in range(levels):
        if not _DOWN_TYPES[down[level]]:
            continue
        block, depth = levels - 1 - level, transformer_layers[level]
        names = [
            f"down_blocks.{level}.attentions.{i}.transformer_blocks.{k}.attn2"
            for i in range(layers[level])
            for k in range(depth)
        ] + [
            f"up_blocks.{block}.attentions.{i}.transformer_blocks.{k}.attn2"
            for i in range(layers[level] + 1)
            for k in range(depth)
        ]
        attention_layers[level] = tuple(names)

    if addition == "text_time":
        family = "sdxl"
    elif unet_config.get("use_linear_projection"):
        family = "sd2"
    else:
        family = "sd1"
    return BackboneLayout(family, levels, tuple(taps), attention_layers, addition == "text_time", pooled_dim)


def sdxl_time_ids(height: int, width: int, batch_size: int, device: Any = None):
    """SDXL's size conditioning for an uncropped `(height, width)` image: `(batch_size, 6)` float32 rows
    `(height, width, 0, 0, height, width)` (original size, crop top-left, target size)."""
    import torch

    row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return row.expand(batch_size, -1)


__all__ = [
    "FAMILY_NAMES",
    "SD21_TEXT_CONFIG",
    "SD21_UNET_CONFIG",
    "SDXL_TEXT_CONFIG",
    "SDXL_TEXT_CONFIG_2",
    "SDXL_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "BackboneLayout",
    "FeatureTap",
    "backbone_layout",
    "sdxl_time_ids",
]
