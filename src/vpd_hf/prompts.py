"""Text prompts of VPD: the NYUv2 scene names, the CLIP prompt templates, and their embedding with a CLIP text encoder
(or, for SDXL, its two encoders)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

# The 27 NYUv2 scene types in the order of the official `nyu_class_list.json` (the folder names of
# `official_splits/train`, in the order `glob` listed them). The order is the row order of the released
# `nyu_class_embeddings.pth`, so it must not be sorted. "excercise_room" is spelled as the dataset spells it.
NYU_SCENE_NAMES: tuple[str, ...] = (
    "printer_room", "bathroom", "living_room", "study", "conference_room", "study_room", "kitchen", "home_office",
    "bedroom", "dinette", "playroom", "indoor_balcony", "laundry_room", "basement", "excercise_room", "foyer",
    "home_storage", "cafe", "furniture_store", "office_kitchen", "student_lounge", "dining_room", "reception_room",
    "computer_lab", "classroom", "office", "bookstore",
)  # fmt: skip

# The 150 ADE20K (SceneParsing) classes in label order (annotation value k + 1 is class k), as mmsegmentation lists
# them (without its stray trailing space in "bed ").
ADE20K_CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# Template of VPD's segmentation class embeddings (one pooled CLIP feature per class, per the authors).
ADE20K_PROMPT_TEMPLATE = "a photo of a {}."

# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation; VPD averages the scene embeddings over them.
CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip

# Token length the official NYUv2 scene embeddings were made with. CLIP's causal text encoder makes the pooled (EOS)
# output independent of padding, so the length only matters through truncation.
NYU_PROMPT_MAX_LENGTH = 20


def _check_strings(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, str) or not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"`{name}` must be a non-empty list of non-empty strings, got {values!r}.")
    return list(values)


def format_prompts(names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """`templates` filled with each name (underscores read as spaces), one list per name."""
    names = _check_strings(names, "names")
    templates = _check_strings(templates, "prompt_templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"Each prompt template needs exactly one '{{}}' placeholder; these do not: {bad}.")
    return [[template.format(name.replace("_", " ")) for template in templates] for name in names]


def _token_batches(
    tokenizer, prompts: list[list[str]], max_length: int | None, batch_size: int, show_progress: bool, device
) -> Iterator[torch.Tensor]:
    """The flattened `prompts` tokenised to `max_length` (default: the tokenizer's), `batch_size` at a time."""
    flat = [prompt for group in prompts for prompt in group]
    for start in tqdm(range(0, len(flat), batch_size), desc="Embedding prompts", disable=not show_progress):
        yield tokenizer(
            flat[start : start + batch_size],
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)


@torch.no_grad()
def encode_prompts(
    text_encoder: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}.",),
    max_length: int | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> torch.Tensor:
    r"""
    Embeds each name as the mean over `templates` of CLIP's pooled text output (the final-LayerNorm state at the EOS
    token, no projection), as VPD's class and scene embeddings are made.

    Returns:
        `(len(names), hidden_size)` float32 tensor on the text encoder's device.
    """
    prompts = format_prompts(names, templates)
    device = next(text_encoder.parameters()).device
    pooled = []
    for ids in _token_batches(tokenizer, prompts, max_length, batch_size, show_progress, device):
        pooled.append(text_encoder(input_ids=ids).pooler_output.float())
    embeddings = torch.cat(pooled).unflatten(0, (len(prompts), len(prompts[0])))
    return embeddings.mean(dim=1)


def first_eos_index(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """`(N,)` position of the first `eos_token_id` in each row of `input_ids` `(N, T)` (the last position if none,
    which only happens for rows truncated without an EOS)."""
    is_eos = input_ids == eos_token_id
    return torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), input_ids.shape[1] - 1)


def repad_after_eos(input_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """`input_ids` `(N, T)` with every position after the first EOS set to `pad_token_id`: SDXL's second tokenizer
    has the first one's vocabulary and merges and differs only in its padding token (`!` instead of EOS)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    after = positions[None, :] > first_eos_index(input_ids, eos_token_id)[:, None]
    return input_ids.masked_fill(after, pad_token_id)


def sdxl_text_states(
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    input_ids: torch.Tensor,
    input_ids_2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    SDXL's text conditioning, as `StableDiffusionXLPipeline.encode_prompt` computes it: the penultimate hidden states
    of both encoders concatenated, `(N, T, D_1 + D_2)` (768 + 1280 = 2048), and the second encoder's projected pooled
    output `text_embeds`, `(N, P)` (1280).
    """
    first = text_encoder(input_ids=input_ids, output_hidden_states=True).hidden_states[-2]
    second = text_encoder_2(input_ids=input_ids_2, output_hidden_states=True)
    return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


@torch.no_grad()
def encode_sdxl_prompts(
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}.",),
    max_length: int | None = None,
    pad_token_id_2: int | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    VPD prompt tokens for SDXL: per name, the mean over `templates` of the concatenated penultimate hidden states of
    both encoders at the EOS token (SDXL's context space, as the pooled EOS state is SD 1.x's), and the mean of the
    second encoder's pooled `text_embeds` (SDXL's `added_cond_kwargs["text_embeds"]`). Text is tokenised once with
    `tokenizer`; the second encoder sees it re-padded with `pad_token_id_2` (`tokenizer_2`'s padding; the causal
    encoders make the EOS states independent of padding anyway).

    Returns:
        `(len(names), D_1 + D_2)` prompt embeddings and `(len(names), P)` pooled embeddings, float32.
    """
    prompts = format_prompts(names, templates)
    eos = tokenizer.eos_token_id
    pad_2 = eos if pad_token_id_2 is None else pad_token_id_2
    device = next(text_encoder.parameters()).device
    tokens, pooled = [], []
    for ids in _token_batches(tokenizer, prompts, max_length, batch_size, show_progress, device):
        states, text_embeds = sdxl_text_states(text_encoder, text_encoder_2, ids, repad_after_eos(ids, eos, pad_2))
        tokens.append(states[torch.arange(len(ids), device=device), first_eos_index(ids, eos)].float())
        pooled.append(text_embeds.float())
    shape = (len(prompts), len(prompts[0]))
    return torch.cat(tokens).unflatten(0, shape).mean(dim=1), torch.cat(pooled).unflatten(0, shape).mean(dim=1)


__all__ = [
    "ADE20K_CLASS_NAMES",
    "ADE20K_PROMPT_TEMPLATE",
    "CLIP_IMAGENET_TEMPLATES",
    "NYU_PROMPT_MAX_LENGTH",
    "NYU_SCENE_NAMES",
    "encode_prompts",
    "encode_sdxl_prompts",
    "first_eos_index",
    "format_prompts",
    "repad_after_eos",
    "sdxl_text_states",
]
