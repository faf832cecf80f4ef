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


def save_tiny_clip_tokenizer(directory: str | Path) -> Path:
    """Writes a CLIP BPE tokenizer (`vocab.json`, `merges.txt`, configs) in the layout of SD's `tokenizer/`."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    tokenizer.save_pretrained(directory)
    # Stable Diffusion repos ship the slow-tokenizer files only (vocab.json + merges.txt, no tokenizer.json).
    (directory / "tokenizer.json").unlink(missing_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def tiny_clip_text_config(vocab_size: int, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def save_tiny_stable_diffusion(directory: str | Path, seed: int = 0) -> Path:
    """Writes a tiny random Stable Diffusion checkpoint in the diffusers Hub layout and returns its path."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(directory / "unet")
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(directory / "vae")
    save_tiny_clip_tokenizer(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    config = tiny_clip_text_config(len(tokenizer), hidden_size=TINY_UNET_CONFIG["cross_attention_dim"])
    CLIPTextModel(config).save_pretrained(directory / "text_encoder")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        directory / "scheduler"
    )
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return directory


__all__ = [
    "TINY_CLIP_VOCAB_SIZE",
    "TINY_DEPTH_HEAD",
    "TINY_SEGMENTATION_HEAD",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "save_tiny_clip_tokenizer",
    "save_tiny_stable_diffusion",
    "tiny_clip_text_config",
    "tiny_referring_config",
    "tiny_segmentation_config",
    "tiny_vpd_config",
]
