"""Tiny, randomly initialised Stable Diffusion components and VPD configs, built offline.

They keep the Stable Diffusion block layout (so every VPD tap and attention level exists) at a few hundred
kilobytes, and are what the tests, the offline demo and the CI benchmark smoke runs use. `save_tiny_stable_diffusion`
writes a folder in the Hub's diffusers layout (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`,
`model_index.json`), which `from_stable_diffusion` reads exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from .backbones import SD21_TEXT_CONFIG, SD21_UNET_CONFIG, SDXL_TEXT_CONFIG_2, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG
from .configuration_vpd import SD15_UNET_CONFIG, SD15_VAE_CONFIG, VPDConfig

# The Stable Diffusion 1.5 layouts at small widths (every block, tap and attention level of the real model exists).
TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}

# The SD 2.x layout at small widths: per-block head counts, linear transformer projections, a wider (1024-like) context
# from a text encoder with "!" padding.
TINY_SD2_UNET_CONFIG: dict[str, Any] = {
    **SD21_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 48,
    "attention_head_dim": [2, 4, 4, 4],
    "norm_num_groups": 16,
}

# The SDXL layout at small widths: three levels (none with cross-attention at the first), several transformer layers
# per block, two text encoders (32 + 48 = 80-wide context) and `text_time` added conditioning whose pooled width (40)
# differs from both encoders' hidden sizes.
TINY_SDXL_TEXT_WIDTHS = (32, 48)
TINY_SDXL_POOLED_DIM = 40
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64],
    "transformer_layers_per_block": [1, 2, 2],
    "cross_attention_dim": sum(TINY_SDXL_TEXT_WIDTHS),
    "attention_head_dim": [2, 4, 4],
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TINY_SDXL_POOLED_DIM + 6 * 8,
    "norm_num_groups": 16,
}
TINY_SDXL_VAE_CONFIG: dict[str, Any] = {
    **SDXL_VAE_CONFIG,
    **{key: TINY_VAE_CONFIG[key] for key in ("block_out_channels", "layers_per_block", "norm_num_groups")},
    "sample_size": 64,
}

# Tiny versions of each family's UNet and VAE configs, by `save_tiny_stable_diffusion(family=...)` name.
TINY_FAMILY_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sd15": (TINY_UNET_CONFIG, TINY_VAE_CONFIG),
    "sd2": (TINY_SD2_UNET_CONFIG, TINY_VAE_CONFIG),
    "sdxl": (TINY_SDXL_UNET_CONFIG, TINY_SDXL_VAE_CONFIG),
}

TINY_DEPTH_HEAD: dict[str, Any] = {
    "depth_neck_channels": 64,
    "depth_head_channels": 16,
    "depth_deconv_filters": [8, 8, 8],
    "depth_deconv_kernels": [2, 2, 2],
}

# A small vocabulary for the offline CLIP tokenizer: CLIP's byte-level alphabet plus whole words for these.
_TINY_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "an",
    "in",
    "and",
    "my",
    "on",
    "one",
    "room",
    "with",
    "bathroom",
    "kitchen",
    "bedroom",
    "office",
    "study",
    "living",
    "dining",
    "printer",
    "conference",
    "home",
    "indoor",
    "balcony",
    "laundry",
    "basement",
    "foyer",
    "storage",
    "cafe",
    "furniture",
    "store",
    "student",
    "lounge",
    "reception",
    "computer",
    "lab",
    "classroom",
    "bookstore",
    "man",
    "woman",
    "red",
    "blue",
    "green",
    "shirt",
    "left",
    "right",
    "small",
    "large",
    # the synthetic referring expressions (`vpd_hf.data.synthetic`): whole tokens, so that none is truncated
    "object",
    "box",
    "sphere",
    "cone",
    "capsule",
    "cylinder",
    "nearest",
    "farthest",
    "leftmost",
    "rightmost",
    "orange",
    "white",
    "yellow",
    "black",
    "purple",
]


def tiny_vpd_config(**overrides: Any):
    """A `VPDConfig` with the tiny UNet/VAE/depth head (27 prompts of width 32 unless overridden)."""

    kwargs = {"unet_config": dict(TINY_UNET_CONFIG), "vae_config": dict(TINY_VAE_CONFIG), **TINY_DEPTH_HEAD}
    kwargs.update(overrides)
    return VPDConfig(**kwargs)


TINY_SEGMENTATION_HEAD: dict[str, Any] = {"fpn_channels": 32, "semantic_head_channels": 32}


def tiny_segmentation_config(class_names: list[str] | None = None, **overrides: Any) -> VPDConfig:
    """A `VPDConfig` for a tiny segmentation model: one prompt per class, attention maps at 32 and 16 (512 scale)."""
    names = list(class_names) if class_names is not None else ["wall", "floor", "ceiling", "sphere", "box"]
    kwargs = {
        "num_prompts": len(names),
        "prompt_names": names,
        "id2label": dict(enumerate(names)),
        "label2id": {name: index for index, name in enumerate(names)},
        "attention_resolutions": [32, 16],
        **TINY_SEGMENTATION_HEAD,
    }
    kwargs.update(overrides)
    return tiny_vpd_config(**kwargs)


def tiny_referring_config(token_length: int = 8, vocab_size: int | None = None, **overrides: Any) -> VPDConfig:
    """A `VPDConfig` for a tiny referring model (tiny CLIP text encoder, no prompt table, maps at 32 and 16)."""
    vocab_size = TINY_CLIP_VOCAB_SIZE if vocab_size is None else vocab_size
    kwargs = {
        "num_prompts": 0,
        "text_config": tiny_clip_text_config(vocab_size, TINY_UNET_CONFIG["cross_attention_dim"]).to_dict(),
        "token_length": token_length,
        "attention_resolutions": [32, 16],
        "referring_decoder_channels": 32,
    }
    kwargs.update(overrides)
    return tiny_vpd_config(**kwargs)


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0-255 (printable ASCII/Latin-1 map to
    themselves, the rest to code points from 256 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE on one word: repeatedly merge every occurrence of the best-ranked adjacent pair."""
    while len(pieces) > 1:
        candidates = [(ranks[pair], pair) for pair in itertools.pairwise(pieces) if pair in ranks]
        if not candidates:
            break
        _, (first, second) = min(candidates)
        merged, index = [], 0
        while index < len(pieces):
            if index + 1 < len(pieces) and pieces[index] == first and pieces[index + 1] == second:
                merged.append(first + second)
                index += 2
            else:
                merged.append(pieces[index])
                index += 1
        pieces = merged
    return pieces


def _tiny_vocabulary() -> tuple[dict[str, int], list[str]]:
    """The tiny CLIP BPE vocabulary and merges: the byte alphabet plus every word of `_TINY_WORDS` as one token.

    Each word is first split by the merges learnt so far (as the tokenizer will split it), then its pieces are joined
    left to right by new, lower-priority merges; so a word's own merges never break one learnt earlier."""
    alphabet = _byte_alphabet()
    vocab_tokens = alphabet + [char + "</w>" for char in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in _TINY_WORDS:
        pieces = _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in vocab_tokens:
                vocab_tokens.append(pieces[0])
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


TINY_CLIP_VOCAB_SIZE = len(_tiny_vocabulary()[0])


def save_tiny_clip_tokenizer(directory: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Writes a CLIP BPE tokenizer (`vocab.json`, `merges.txt`, configs) in the layout of SD's `tokenizer/`;
    `pad_token="!"` gives the padding of SD 2.x's tokenizer and SDXL's `tokenizer_2`."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_vocabulary()
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77, pad_token=pad_token
    )
    tokenizer.save_pretrained(directory)
    # Stable Diffusion repos ship the slow-tokenizer files only (vocab.json + merges.txt, no tokenizer.json).
    (directory / "tokenizer.json").unlink(missing_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def tiny_clip_text_config(vocab_size: int, hidden_size: int = 32, projection_dim: int | None = None, **overrides: Any):
    """A 2-layer CLIP text config; `overrides` take other `CLIPTextConfig` fields (e.g. a real config's `hidden_act`)."""
    from transformers import CLIPTextConfig

    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": hidden_size if projection_dim is None else projection_dim,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def perturb_weights(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Adds `scale` x N(0, 1) noise to every floating tensor of the state dict (a fresh model has zero prompt tables and
    constant norms, which would hide differences); returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    return model


def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replaces every floating tensor of the state dict (BatchNorm's `running_var` excepted) by N(0, its std) — N(0, 1)
    where it is constant (norm weights, zero-initialised output layers, which scaled by their std of 0 would stay
    dead) — so that no layer hides a difference; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and "running_var" not in name:
                spread = float(tensor.std()) if tensor.numel() > 1 else 0.0
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (spread if spread > 0 else 1.0))
    return model.eval()


def save_tiny_stable_diffusion(directory: str | Path, seed: int = 0, family: str = "sd15") -> Path:
    r"""
    Writes a tiny random Stable Diffusion checkpoint in the diffusers Hub layout and returns its path.

    `family`: `"sd15"` (`StableDiffusionPipeline` layout), `"sd2"` (SD 2.x: per-block head counts, linear projections,
    a 48-wide context from a text encoder padding with "!") or `"sdxl"` (`StableDiffusionXLPipeline` layout: three UNet
    levels, `text_encoder` + `text_encoder_2` (with projection) and `tokenizer` + `tokenizer_2` (padding "!")).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in TINY_FAMILY_CONFIGS:
        raise ValueError(f"`family` must be one of {list(TINY_FAMILY_CONFIGS)}, got {family!r}.")
    unet_config, vae_config = TINY_FAMILY_CONFIGS[family]
    directory = Path(directory)
    torch.manual_seed(seed)
    UNet2DConditionModel(**unet_config).save_pretrained(directory / "unet")
    AutoencoderKL(**vae_config).save_pretrained(directory / "vae")
    save_tiny_clip_tokenizer(directory / "tokenizer", pad_token="!" if family == "sd2" else "<|endoftext|>")
    vocab_size = len(CLIPTokenizer.from_pretrained(directory / "tokenizer"))
    components = {
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if family == "sdxl":
        first, second = TINY_SDXL_TEXT_WIDTHS
        CLIPTextModel(tiny_clip_text_config(vocab_size, first)).save_pretrained(directory / "text_encoder")
        config_2 = tiny_clip_text_config(
            vocab_size, second, TINY_SDXL_POOLED_DIM, hidden_act=SDXL_TEXT_CONFIG_2["hidden_act"]
        )
        CLIPTextModelWithProjection(config_2).save_pretrained(directory / "text_encoder_2")
        save_tiny_clip_tokenizer(directory / "tokenizer_2", pad_token="!")
        components |= {
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
        pipeline_class, extra = "StableDiffusionXLPipeline", {"force_zeros_for_empty_prompt": True}
    else:
        overrides = {"hidden_act": SD21_TEXT_CONFIG["hidden_act"]} if family == "sd2" else {}
        config = tiny_clip_text_config(vocab_size, unet_config["cross_attention_dim"], **overrides)
        CLIPTextModel(config).save_pretrained(directory / "text_encoder")
        pipeline_class = "StableDiffusionPipeline"
        extra = {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        directory / "scheduler"
    )
    model_index = {
        "_class_name": pipeline_class,
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        **components,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **extra,
    }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return directory


__all__ = [
    "TINY_CLIP_VOCAB_SIZE",
    "TINY_DEPTH_HEAD",
    "TINY_FAMILY_CONFIGS",
    "TINY_SD2_UNET_CONFIG",
    "TINY_SDXL_UNET_CONFIG",
    "TINY_SDXL_VAE_CONFIG",
    "TINY_SEGMENTATION_HEAD",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "perturb_weights",
    "randomize_weights",
    "save_tiny_clip_tokenizer",
    "save_tiny_stable_diffusion",
    "tiny_clip_text_config",
    "tiny_referring_config",
    "tiny_segmentation_config",
    "tiny_vpd_config",
]
