"""VPD model configuration."""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

from .backbones import NUM_TAPS, SD15_UNET_CONFIG, SD15_VAE_CONFIG, BackboneLayout, backbone_layout

# The Stable Diffusion checkpoint VPD was built on (the official code's `v1-5-pruned-emaonly`), on the Hub.
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


# The UNet levels whose cross-attention maps VPD can use, named by their map size for a 512x512 input
# (latent strides 1, 2 and 4, i.e. image strides 8, 16 and 32). The 8x8 mid block is never used.
ATTENTION_RESOLUTIONS = (64, 32, 16)
LATENT_SCALING_OPTIONS = ("scaling_factor",)
SEMANTIC_INFERENCE_MODES = ("whole", "slide")
# The dense tasks one model (and one UNet pass) can serve together, and the referring task, which cannot share a pass
# (its conditioning is the sentence).
DENSE_TASKS = ("depth", "segmentation", "normals")
TASKS = (*DENSE_TASKS, "referring")
# Defaults derived from the tasks (the paper's recipes): the number of scene prompts of a depth/normals model, and the
# attention maps of a model with class prompts or a sentence.
NYU_NUM_SCENES = 27
_PROMPT_ATTENTION_RESOLUTIONS = [32, 16]
_DEPTH_GROUP_NORM_GROUPS = 16
_DECONV_KERNELS = (2, 3, 4)


def _clean_component_config(config: dict[str, Any] | None, default: dict[str, Any], name: str) -> dict[str, Any]:
    if config is None:
        return dict(default)
    if not isinstance(config, dict):
        raise TypeError(f"`{name}` must be a dict of diffusers constructor arguments, got {type(config).__name__}.")
    # diffusers' config.json files carry bookkeeping entries (`_class_name`, `_diffusers_version`, ...).
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _as_int_list(value: Any, name: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"`{name}` must be a list of integers, got {value!r}.")
    items = list(value)
    if not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        raise TypeError(f"`{name}` must be a list of integers, got {value!r}.")
    return items


class VPDConfig(PreTrainedConfig):
    r"""
    Configuration of a VPD model: a Stable Diffusion UNet used as a perception backbone (one UNet pass at a fixed
    timestep on the VAE latent of the image, conditioned on text) followed by a task head.

    Everything needed to build the model is held here, so that `VPDModel*.from_config` / `from_pretrained` never
    download a diffusion checkpoint: the diffusers `unet_config` and `vae_config` describe the UNet and the VAE encoder;
    the prompt table (class or scene embeddings) is a buffer of the model whose shape is given by `num_prompts` x
    `prompt_embed_dim`. Defaults reproduce the official VPD depth model on Stable Diffusion 1.5.

    Args:
        tasks (`list[str]`, *optional*):
            The task heads of the model: a non-empty subset of `"depth"`, `"segmentation"`, `"normals"` (one UNet pass
            serves all of them, `VPDModelForDensePrediction`), or `["referring"]` alone. A single-task class has one.
            Configs saved before this field existed get it inferred from their other fields (a text encoder: referring;
            attention maps and one prompt per label: segmentation; otherwise depth). The tasks also choose the
            defaults of `num_prompts` and `attention_resolutions`, so that a bare config builds the paper's model, and
            the conditioning shared by the heads (:attr:`conditioning`).
        task_loss_weights (`dict[str, float]`, *optional*):
            Weight of each task's loss in the multi-task `loss` (default 1.0 for every task).
        unet_config (`dict`, *optional*):
            Constructor arguments of a diffusers `UNet2DConditionModel` with a Stable Diffusion block layout: SD 1.x/2.x
            (three cross-attention down blocks and a plain one, mirrored up blocks, two layers per down block) or SDXL
            (three levels, the first without cross-attention, several transformer layers per block, `text_time`
            added conditioning). Defaults to Stable Diffusion 1.5. See `vpd_hf.backbones` for where VPD taps them.
        vae_config (`dict`, *optional*):
            Constructor arguments of a diffusers `AutoencoderKL`; only its encoder and `quant_conv` are built.
            Defaults to the Stable Diffusion 1.5 VAE.
        prompt_embed_dim (`int`, *optional*):
            Width of the text embeddings; must equal the UNet's `cross_attention_dim` (the default).
        num_prompts (`int`, *optional*):
            Rows of the prompt-embedding table. Default from `tasks`: one per class (`num_labels`) when segmentation is
            among them, 0 for referring (the text comes from a text encoder at run time), else the 27 NYUv2 scene types.
        prompt_names (`list[str]`, *optional*):
            The name behind each row of the prompt table (e.g. the scene names that `scene_ids` index).
        prompt_templates (`list[str]`, *optional*):
            The templates the prompt embeddings were averaged over, kept for provenance.
        timestep (`int`, *optional*, defaults to 1):
            The diffusion timestep of the single UNet pass (the official code uses 1; the paper says 0).
        latent_scaling (`str` or `float`, *optional*):
            How the VAE latent is scaled before the UNet. `None` (default, as the official VPD code): unscaled
            posterior mode. `"scaling_factor"`: multiplied by the VAE's `scaling_factor` (0.18215 for SD 1.x), as
            Stable Diffusion itself does. A positive number `s`: divided by `s` (EVP uses the dataset latent std,
            5.07543 on NYUv2).
        attention_resolutions (`list[int]`, *optional*):
            Cross-attention maps to concatenate to the UNet features, named by their size for a 512x512 input: any of
            64, 32, 16 (image strides 8, 16, 32). Each map is the softmax over the text tokens, averaged over heads and
            over the down- and up-block cross-attention layers of that level (2 + 3 for SD 1.x/2.x; SDXL has none at 64,
            10 at 32 and 50 at 16). Default from `tasks`: `[32, 16]` with class prompts (segmentation, alone or with
            other tasks) and for referring segmentation, empty for depth and normals alone (official depth recipe).
        detach_attention_maps (`bool`, *optional*, defaults to `True`):
            Stop gradients through the attention-map channels, as the official code does implicitly (its attention
            blocks run under a `no_grad` checkpoint). Set to `False` to let them train the UNet and the adapter.
        text_adapter_gamma_init (`float`, *optional*, defaults to 1e-4):
            Initial value of the TextAdapter's per-channel blend `gamma` in `c + gamma * MLP(c)`.
        max_depth (`float`, *optional*, defaults to 10.0):
            Depth head output range: `sigmoid(x) * max_depth`, in metres.
        depth_neck_channels (`int`, *optional*, defaults to 1536):
            Channels of the depth neck (the 1x1 conv on the concatenated UNet features).
        depth_head_channels (`int`, *optional*, defaults to 192):
            Channels of the depth decoder's last convolutions.
        depth_deconv_filters (`list[int]`, *optional*, defaults to `[32, 32, 32]`):
            Output channels of the depth decoder's transposed convolutions (each upsamples by 2).
        depth_deconv_kernels (`list[int]`, *optional*, defaults to `[2, 2, 2]`):
            Kernel sizes of those transposed convolutions (2, 3 or 4).
        silog_lambda (`float`, *optional*, defaults to 0.5):
            Variance weight of the scale-invariant log loss.
        fpn_channels (`int`, *optional*, defaults to 256):
            Output channels of the segmentation FPN neck (one map per UNet level).
        semantic_head_channels (`int`, *optional*, defaults to 256):
            Channels of the Semantic FPN head's scale heads.
        semantic_classifier_dropout (`float`, *optional*, defaults to 0.1):
            Dropout2d before the segmentation classifier.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the segmentation loss (and used to pad label maps).
        semantic_loss_avg_non_ignore (`bool`, *optional*, defaults to `False`):
            Average the cross-entropy over non-ignored pixels only (PyTorch's and transformers' convention). The
            default follows mmsegmentation 0.x, which VPD used: ignored pixels add zero loss but count in the mean.
        semantic_inference_mode (`str`, *optional*, defaults to `"whole"`):
            What an eval-mode forward without labels does: `"whole"` (one pass, logits at 1/8 resolution) or `"slide"`
            (the official test procedure: overlapping `semantic_inference_crop_size` windows at
            `semantic_inference_stride`, logits averaged where windows overlap, returned at the input resolution).
        semantic_inference_crop_size (`int`, *optional*, defaults to 512):
            Side of the sliding windows.
        semantic_inference_stride (`int`, *optional*, defaults to 341):
            Step between sliding windows.
        semantic_inference_scales (`list[float]`, *optional*, defaults to `[1.0]`):
            Test-time scales (the paper's multi-scale test uses 1.0, 1.125, 1.25, 1.375, 1.5); with several scales or
            `semantic_inference_flip`, softmax probabilities are averaged and their log is returned as logits.
        semantic_inference_flip (`bool`, *optional*, defaults to `False`):
            Also average the horizontally flipped image's prediction.
        text_config (`dict`, *optional*):
            Constructor arguments of the `CLIPTextModel` that encodes referring expressions (referring segmentation
            only; its hidden size must equal `prompt_embed_dim`).
        text_config_2 (`dict`, *optional*):
            SDXL referring segmentation only: constructor arguments of the second text encoder
            (`CLIPTextModelWithProjection`, OpenCLIP bigG). The context is the concatenation of both encoders'
            penultimate hidden states (`text_config` + `text_config_2` hidden sizes = `prompt_embed_dim`) and its
            projected pooled output is SDXL's `text_embeds`. Its `pad_token_id` / `eos_token_id` are those of the
            checkpoint's `tokenizer_2` (expressions are tokenised once; the second encoder sees `tokenizer_2`'s padding).
        token_length (`int`, *optional*, defaults to 40):
            Tokens per referring expression (padded/truncated to it): 40 for RefCOCO/RefCOCO+, 77 for RefCOCOg. Every
            token, padding included, is a context token and an attention-map channel, as in the official code.
        train_text_encoder (`bool`, *optional*, defaults to `False`):
            Whether the referring model's CLIP text encoder is trained (frozen and run without gradients otherwise).
        referring_decoder_channels (`int`, *optional*):
            Hidden channels of the referring decoder (default: half the deepest UNet width, 640 for SD 1.5).
        referring_loss_weights (`list[float]`, *optional*, defaults to `[0.9, 1.1]`):
            Cross-entropy weights of background and foreground.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal used for the depth neck.
        base_model (`str`, *optional*):
            The Stable Diffusion checkpoint (Hub id or folder) the UNet and VAE were imported from; set by
            `from_stable_diffusion` and kept through fine-tuning, so that model cards can name it.
    """

    model_type = "vpd"

    tasks: list[str] | tuple[str, ...] | None = None
    task_loss_weights: dict[str, float] | None = None
    unet_config: dict | None = None
    vae_config: dict | None = None
    prompt_embed_dim: int | None = None
    num_prompts: int | None = None
    prompt_names: list[str] | None = None
    prompt_templates: list[str] | None = None
    timestep: int = 1
    latent_scaling: str | float | int | None = None
    attention_resolutions: list[int] | tuple[int, ...] | None = None
    detach_attention_maps: bool = True
    text_adapter_gamma_init: float | int = 1e-4
    max_depth: float | int = 10.0
    depth_neck_channels: int = 1536
    depth_head_channels: int = 192
    depth_deconv_filters: list[int] | tuple[int, ...] = (32, 32, 32)
    depth_deconv_kernels: list[int] | tuple[int, ...] = (2, 2, 2)
    silog_lambda: float | int = 0.5
    fpn_channels: int = 256
    semantic_head_channels: int = 256
    semantic_classifier_dropout: float | int = 0.1
    semantic_loss_ignore_index: int = 255
    semantic_loss_avg_non_ignore: bool = False
    semantic_inference_mode: str = "whole"
    semantic_inference_crop_size: int = 512
    semantic_inference_stride: int = 341
    semantic_inference_scales: list[float] | tuple[float, ...] = (1.0,)
    semantic_inference_flip: bool = False
    text_config: dict | None = None
    text_config_2: dict | None = None
    token_length: int = 40
    train_text_encoder: bool = False
    referring_decoder_channels: int | None = None
    referring_loss_weights: list[float] | tuple[float, ...] = (0.9, 1.1)
    initializer_range: float = 0.02
    base_model: str | None = None

    def __post_init__(self, **kwargs):
        self.unet_config = _clean_component_config(self.unet_config, SD15_UNET_CONFIG, "unet_config")
        self.vae_config = _clean_component_config(self.vae_config, SD15_VAE_CONFIG, "vae_config")
        self._validate_components()
        cross_attention_dim = self.unet_config.get("cross_attention_dim", 1280)
        if self.prompt_embed_dim is None:
            self.prompt_embed_dim = cross_attention_dim
        self._validate_tasks(kwargs)
        self._validate_prompts(cross_attention_dim)
        self._validate_backbone()
        self._validate_depth_head()
        self._validate_segmentation()
        self._validate_referring()
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise TypeError(f"`base_model` must be a string (a Hub id or folder) or None, got {self.base_model!r}.")
        super().__post_init__(**kwargs)

    # -- validation -----------------------------------------------------------------------------------------------

    def _validate_tasks(self, kwargs: dict[str, Any]) -> None:
        """Checks `tasks` (or infers it for a config saved before the field existed) and fills the defaults that
        depend on it: `num_prompts` and `attention_resolutions`."""
        if self.tasks is None:
            self.tasks = [self._infer_task(kwargs)]
        if isinstance(self.tasks, str) or not hasattr(self.tasks, "__iter__"):
            raise TypeError(f"`tasks` must be a list of task names, got {self.tasks!r}.")
        tasks = list(self.tasks)
        unknown = [task for task in tasks if task not in TASKS]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(
                f"`tasks` must be a non-empty list of distinct task names from {list(DENSE_TASKS)} (or ['referring'] "
                f"alone), got {self.tasks!r}."
            )
        if "referring" in tasks and len(tasks) > 1:
            raise ValueError(
                "`tasks`: referring segmentation cannot share a model with other tasks (its UNet conditioning is the "
                f"sentence, theirs a prompt table), got {tasks}."
            )
        self.tasks = [task for task in TASKS if task in tasks]  # canonical order
        weights = self.task_loss_weights
        if weights is not None:
            if not isinstance(weights, dict):
                raise TypeError(f"`task_loss_weights` must be a dict of task name -> weight, got {weights!r}.")
            unknown = [task for task in weights if task not in self.tasks]
            if unknown:
                raise ValueError(f"`task_loss_weights` names {unknown}, which are not among `tasks` {self.tasks}.")
            for task, weight in weights.items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                    raise ValueError(f"`task_loss_weights[{task!r}]` must be a non-negative number, got {weight!r}.")
            self.task_loss_weights = {task: float(weights[task]) for task in self.tasks if task in weights}
        if self.num_prompts is None:
            if "segmentation" in self.tasks:
                self.num_prompts = len(self.id2label) if self.id2label is not None else kwargs.get("num_labels", 2)
            else:
                self.num_prompts = 0 if "referring" in self.tasks else NYU_NUM_SCENES
        if self.attention_resolutions is None:
            uses_maps = "segmentation" in self.tasks or "referring" in self.tasks
            self.attention_resolutions = list(_PROMPT_ATTENTION_RESOLUTIONS) if uses_maps else []

    def _infer_task(self, kwargs: dict[str, Any]) -> str:
        """The task of a config saved without `tasks` (before multi-task models existed)."""
        if self.text_config is not None:
            return "referring"
        num_labels = len(self.id2label) if self.id2label is not None else kwargs.get("num_labels")
        if self.attention_resolutions and self.num_prompts is not None and self.num_prompts == num_labels:
            return "segmentation"
        return "depth"

    def loss_weight(self, task: str) -> float:
        """The weight of `task`'s loss in the multi-task loss (`task_loss_weights`, default 1.0)."""
        return float((self.task_loss_weights or {}).get(task, 1.0))

    def _validate_components(self) -> None:
        unet, vae = self.unet_config, self.vae_config
        backbone_layout(unet)  # raises for UNet layouts VPD cannot tap
        vae_channels = _as_int_list(vae.get("block_out_channels", (64,)), "vae_config['block_out_channels']")
        if len(vae_channels) != 4:
            raise ValueError(
                "`vae_config['block_out_channels']` must have 4 entries (a VAE that downsamples by 8), "
                f"got {vae_channels}."
            )
        latent_channels = vae.get("latent_channels", 4)
        if unet.get("in_channels", 4) != latent_channels:
            raise ValueError(
                f"`unet_config['in_channels']` ({unet.get('in_channels', 4)}) must equal "
                f"`vae_config['latent_channels']` ({latent_channels})."
            )

    def _validate_prompts(self, cross_attention_dim: int) -> None:
        if not isinstance(self.prompt_embed_dim, int) or self.prompt_embed_dim <= 0:
            raise ValueError(f"`prompt_embed_dim` must be a positive integer, got {self.prompt_embed_dim!r}.")
        if self.prompt_embed_dim != cross_attention_dim:
            raise ValueError(
                f"`prompt_embed_dim` ({self.prompt_embed_dim}) must equal the UNet's `cross_attention_dim` "
                f"({cross_attention_dim})."
            )
        if not isinstance(self.num_prompts, int) or isinstance(self.num_prompts, bool) or self.num_prompts < 0:
            raise ValueError(f"`num_prompts` must be a non-negative integer, got {self.num_prompts!r}.")
        for name in ("prompt_names", "prompt_templates"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(item, str) for item in value):
                raise TypeError(f"`{name}` must be a list of strings, got {value!r}.")
            setattr(self, name, list(value))
        if self.prompt_names is not None and len(self.prompt_names) != self.num_prompts:
            raise ValueError(
                f"`prompt_names` has {len(self.prompt_names)} entries but `num_prompts` is {self.num_prompts}."
            )

    def _validate_backbone(self) -> None:
        if not isinstance(self.timestep, int) or isinstance(self.timestep, bool) or not 0 <= self.timestep < 1000:
            raise ValueError(f"`timestep` must be an integer in [0, 1000), got {self.timestep!r}.")
        scaling = self.latent_scaling
        if isinstance(scaling, bool) or not (
            scaling is None
            or scaling in LATENT_SCALING_OPTIONS
            or (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0)
        ):
            raise ValueError(
                f"`latent_scaling` must be None, one of {list(LATENT_SCALING_OPTIONS)} or a positive number, "
                f"got {scaling!r}."
            )
        resolutions = _as_int_list(self.attention_resolutions, "attention_resolutions")
        unknown = [r for r in resolutions if r not in ATTENTION_RESOLUTIONS]
        if unknown:
            raise ValueError(
                f"`attention_resolutions` contains {unknown}; allowed values are {list(ATTENTION_RESOLUTIONS)} "
                "(map sizes for a 512x512 input)."
            )
        if len(set(resolutions)) != len(resolutions):
            raise ValueError(f"`attention_resolutions` has duplicates: {resolutions}.")
        layout = self.backbone
        missing = [r for r in resolutions if ATTENTION_RESOLUTIONS.index(r) not in layout.attention_layers]
        if missing:
            raise ValueError(
                f"`attention_resolutions` contains {missing}, but this {layout.family_name} UNet has no cross-attention "
                f"at that level; allowed: {[ATTENTION_RESOLUTIONS[level] for level in sorted(layout.attention_layers)]}."
            )
        self.attention_resolutions = sorted(resolutions, reverse=True)
        if not isinstance(self.detach_attention_maps, bool):
            raise TypeError(f"`detach_attention_maps` must be a bool, got {self.detach_attention_maps!r}.")
        gamma = self.text_adapter_gamma_init
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
            raise ValueError(f"`text_adapter_gamma_init` must be a finite number, got {gamma!r}.")

    def _validate_depth_head(self) -> None:
        if isinstance(self.max_depth, bool) or not isinstance(self.max_depth, (int, float)) or not self.max_depth > 0:
            raise ValueError(f"`max_depth` must be a positive number of metres, got {self.max_depth!r}.")
        for name in ("depth_neck_channels", "depth_head_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.depth_neck_channels % _DEPTH_GROUP_NORM_GROUPS:
            raise ValueError(
                f"`depth_neck_channels` ({self.depth_neck_channels}) must be divisible by "
                f"{_DEPTH_GROUP_NORM_GROUPS} (its GroupNorm has {_DEPTH_GROUP_NORM_GROUPS} groups)."
            )
        filters = _as_int_list(self.depth_deconv_filters, "depth_deconv_filters")
        kernels = _as_int_list(self.depth_deconv_kernels, "depth_deconv_kernels")
        if not filters or len(filters) != len(kernels) or min(filters) <= 0:
            raise ValueError(
                "`depth_deconv_filters` and `depth_deconv_kernels` must be non-empty lists of the same length with "
                f"positive filters, got {filters} and {kernels}."
            )
        if len(filters) > 5:
            raise ValueError(
                "`depth_deconv_filters` can have at most 5 entries: each deconvolution upsamples the 1/32 neck output "
                f"by 2; got {len(filters)}."
            )
        if any(k not in _DECONV_KERNELS for k in kernels):
            raise ValueError(f"`depth_deconv_kernels` entries must be in {list(_DECONV_KERNELS)}, got {kernels}.")
        self.depth_deconv_filters, self.depth_deconv_kernels = filters, kernels
        lam = self.silog_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
            raise ValueError(f"`silog_lambda` must be a number in [0, 1], got {lam!r}.")

    def _validate_segmentation(self) -> None:
        for name in (
            "fpn_channels",
            "semantic_head_channels",
            "semantic_inference_crop_size",
            "semantic_inference_stride",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        dropout = self.semantic_classifier_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`semantic_classifier_dropout` must be a number in [0, 1), got {dropout!r}.")
        ignore = self.semantic_loss_ignore_index
        if not isinstance(ignore, int) or isinstance(ignore, bool):
            raise ValueError(f"`semantic_loss_ignore_index` must be an integer, got {ignore!r}.")
        for name in ("semantic_loss_avg_non_ignore", "semantic_inference_flip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.semantic_inference_mode not in SEMANTIC_INFERENCE_MODES:
            raise ValueError(
                f"`semantic_inference_mode` must be one of {list(SEMANTIC_INFERENCE_MODES)}, "
                f"got {self.semantic_inference_mode!r}."
            )
        scales = self.semantic_inference_scales
        if (
            isinstance(scales, (str, bytes))
            or not hasattr(scales, "__iter__")
            or not list(scales)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in scales)
        ):
            raise ValueError(
                f"`semantic_inference_scales` must be a non-empty list of positive numbers, got {scales!r}."
            )
        self.semantic_inference_scales = [float(v) for v in scales]

    @staticmethod
    def _clean_text_config(text_config: Any, name: str) -> dict[str, Any]:
        if not isinstance(text_config, dict):
            raise TypeError(f"`{name}` must be a dict of CLIPTextConfig arguments, got {type(text_config).__name__}.")
        dropped = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype")
        return {key: value for key, value in text_config.items() if key not in dropped}

    def _validate_referring(self) -> None:
        if not isinstance(self.token_length, int) or isinstance(self.token_length, bool) or self.token_length < 1:
            raise ValueError(f"`token_length` must be a positive integer, got {self.token_length!r}.")
        sdxl = self.backbone.text_time
        if self.text_config_2 is not None and not sdxl:
            raise ValueError("`text_config_2` is for SDXL UNets (`addition_embed_type='text_time'`) only.")
        if self.text_config is not None:
            if sdxl and self.text_config_2 is None:
                raise ValueError("An SDXL referring model needs `text_config_2` (the second text encoder's config).")
            self.text_config = self._clean_text_config(self.text_config, "text_config")
            hidden = self.text_config.get("hidden_size", 512)
            if sdxl:
                self.text_config_2 = self._clean_text_config(self.text_config_2, "text_config_2")
                hidden_2 = self.text_config_2.get("hidden_size", 512)
                if hidden + hidden_2 != self.prompt_embed_dim:
                    raise ValueError(
                        f"`text_config['hidden_size']` + `text_config_2['hidden_size']` ({hidden} + {hidden_2}) must "
                        f"equal `prompt_embed_dim` ({self.prompt_embed_dim}): SDXL concatenates the two encoders' states."
                    )
                projection = self.text_config_2.get("projection_dim", 512)
                if projection != self.pooled_prompt_embed_dim:
                    raise ValueError(
                        f"`text_config_2['projection_dim']` ({projection}) must equal the UNet's pooled text width "
                        f"({self.pooled_prompt_embed_dim})."
                    )
            elif hidden != self.prompt_embed_dim:
                raise ValueError(
                    f"`text_config['hidden_size']` ({hidden}) must equal `prompt_embed_dim` ({self.prompt_embed_dim})."
                )
            for name in ("text_config", "text_config_2"):
                positions = (getattr(self, name) or {}).get("max_position_embeddings", 77)
                if self.token_length > positions:
                    raise ValueError(
                        f"`token_length` ({self.token_length}) exceeds the text encoder's {positions} positions."
                    )
        if not isinstance(self.train_text_encoder, bool):
            raise TypeError(f"`train_text_encoder` must be a bool, got {self.train_text_encoder!r}.")
        channels = self.referring_decoder_channels
        if channels is not None and (not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0):
            raise ValueError(f"`referring_decoder_channels` must be a positive integer or None, got {channels!r}.")
        weights = self.referring_loss_weights
        if (
            isinstance(weights, (str, bytes))
            or not hasattr(weights, "__iter__")
            or len(list(weights)) != 2
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights)
        ):
            raise ValueError(
                f"`referring_loss_weights` must be two positive numbers (background, foreground), got {weights!r}."
            )
        self.referring_loss_weights = [float(w) for w in weights]

    # -- derived quantities ---------------------------------------------------------------------------------------

    @property
    def conditioning(self) -> str:
        r"""
        The UNet's text conditioning, shared by every head of a pass (derived from `tasks`):

        - `"class_prompts"` when segmentation is among the tasks: the whole class-prompt table (one token per class,
          the same for every image), whose cross-attention maps join the features. Depth and normals heads of the
          same model read these features and maps too, so that one pass serves all heads.
        - `"scene_prompt"` for depth and/or normals without segmentation: one token per image, its row of the scene
          table (`scene_ids`), or the table's mean when the scene is unknown (the official depth recipe).
        - `"text"` for referring segmentation: the encoded sentence.
        """
        if "referring" in self.tasks:
            return "text"
        return "class_prompts" if "segmentation" in self.tasks else "scene_prompt"

    @property
    def context_tokens(self) -> int:
        """Tokens of the UNet context of a prompt-table model: all prompt rows (class prompts) or one (scene prompt)."""
        return self.num_prompts if self.conditioning == "class_prompts" else 1

    @property
    def backbone(self) -> BackboneLayout:
        """The UNet's VPD layout (family, taps, attention-map layers; see `vpd_hf.backbones.backbone_layout`)."""
        return backbone_layout(self.unet_config)

    @property
    def backbone_family(self) -> str:
        """`"sd1"`, `"sd2"` or `"sdxl"`, from the UNet config."""
        return self.backbone.family

    @property
    def unet_channels(self) -> list[int]:
        """UNet feature channels at the four taps, high resolution first (320, 640, 1280, 1280 for SD 1.5 and for
        SDXL, whose last one is the pooled mid block)."""
        return self.backbone.channels

    @property
    def pooled_prompt_embed_dim(self) -> int | None:
        """Width of SDXL's pooled text embedding (`added_cond_kwargs["text_embeds"]`); None for SD 1.x/2.x."""
        return self.backbone.pooled_dim

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 4))

    @property
    def vae_downsample_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def pad_multiple(self) -> int:
        """Image sizes are padded to this multiple, the stride of the coarsest tap, so that every feature map has an
        integer size (64 for SD; also for SDXL, whose stride-64 map is pooled from its stride-32 mid block)."""
        return self.vae_downsample_factor * 2 ** (NUM_TAPS - 1)

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' loader, refusing the config of another model. transformers only logs a warning for a
        `model_type` mismatch, and every VPD field has a default: a `bert` (or diffusers UNet) config.json would load
        as a default VPD config, and its model with random weights. This is the method `from_pretrained` of the
        config and of every VPD model class goes through (`AutoConfig` dispatches on `model_type` itself)."""
        config_dict, unused_kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        diffusers_class = config_dict.get("_class_name") if "_diffusers_version" in config_dict else None
        if model_type not in (None, cls.model_type) or diffusers_class:
            architectures = ", ".join(config_dict.get("architectures") or [])
            held = f"a `{model_type}` model" if model_type else f"a diffusers `{diffusers_class}`"
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} holds {held}{f' ({architectures})' if architectures else ''}, "
                f"not a VPD model (its config.json has `model_type` {model_type!r}, VPD's is {cls.model_type!r}). "
                "Load it with its own class (e.g. `AutoModel.from_pretrained`), or build a VPD model from a Stable "
                "Diffusion checkpoint with `VPDModelForDepthEstimation.from_stable_diffusion(...)` (or the "
                "segmentation / referring classes) or `vpd-hf train`."
            )
        return config_dict, unused_kwargs


__all__ = ["DENSE_TASKS", "SD15_HUB_ID", "SD15_UNET_CONFIG", "SD15_VAE_CONFIG", "TASKS", "VPDConfig"]
