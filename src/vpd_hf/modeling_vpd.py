"""VPD: a Stable Diffusion UNet as a perception backbone (Zhao et al., "Unleashing Text-to-Image Diffusion Models for
Visual Perception", ICCV 2023), on diffusers modules and the transformers `PreTrainedModel` API."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import Encoder
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import DepthEstimatorOutput, SemanticSegmenterOutput
from transformers.utils import ModelOutput

from .attention import ForwardRecorder, attention_key, install_cross_attention_capture
from .backbones import UNET_OUTPUT, backbone_layout, sdxl_time_ids
from .batching import crop, merge, merge_tuples, size_groups
from .configuration_vpd import ATTENTION_RESOLUTIONS, DENSE_TASKS, VPDConfig
from .heads import VPDDepthHead, VPDFPNNeck, VPDNormalsHead, VPDReferringDecoder, VPDSemanticFPNHead, tag_init
from .inference import is_single_pass, masked_test_time_logits, semantic_inference_options
from .losses import normals_cosine_loss, semantic_cross_entropy, silog_loss
from .prompts import (
    ADE20K_CLASS_NAMES,
    ADE20K_PROMPT_TEMPLATE,
    CLIP_IMAGENET_TEMPLATES,
    NYU_PROMPT_MAX_LENGTH,
    NYU_SCENE_NAMES,
    encode_prompts,
    encode_sdxl_prompts,
    repad_after_eos,
    sdxl_text_states,
)
from .weights_loading import HUB_KWARGS, casts_on_load, pread_state_dict, safetensors_files

# The UNet modules VPD reads (for SD 1.5: ldm output blocks 1, 4, 7, see the method notes, section 2.2) and the
# attention-map layers come from `vpd_hf.backbones.backbone_layout(config.unet_config)`.


def _feature_key(level: int) -> str:
    return f"features.level{level}"


def _resolution_level(resolution: int) -> int:
    return ATTENTION_RESOLUTIONS.index(resolution)


def _hub_kwargs(revision, variant, cache_dir, token, local_files_only) -> dict[str, Any]:
    kwargs = dict(
        revision=revision, variant=variant, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    return {key: value for key, value in kwargs.items() if value is not None}


def _check_pixel_mask(pixel_mask: torch.Tensor | None, pixel_values: torch.Tensor) -> None:
    expected = (pixel_values.shape[0], *pixel_values.shape[-2:])
    if pixel_mask is not None and tuple(pixel_mask.shape) != expected:
        raise ValueError(f"`pixel_mask` must have shape {expected}, got {tuple(pixel_mask.shape)}.")


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class VPDBackboneOutput(ModelOutput):
    r"""
    feature_maps (`tuple(torch.FloatTensor)`):
        Four UNet decoder maps, high resolution first, at strides 8, 16, 32 and 64 of the *padded* image (64x64x320,
        32x32x640, 16x16x1280, 8x8x1280 for a 512x512 input with SD 1.5). Where attention maps are configured, they are
        concatenated after the UNet channels of the map with the same resolution.
    attention_maps (`tuple(torch.FloatTensor)`, *optional*):
        The cross-attention maps alone, one `(B, num_tokens, h, w)` tensor per configured resolution (largest first):
        softmax over the text tokens, averaged over heads and over the layers of that resolution.
    """

    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    attention_maps: tuple[torch.FloatTensor, ...] | None = None


def _merge_backbone_outputs(
    parts: Sequence[VPDBackboneOutput], rows: Sequence[torch.Tensor], batch_size: int
) -> VPDBackboneOutput:
    """The backbone outputs of size groups (see `vpd_hf.batching`) as one, each map zero-padded to the largest."""
    return VPDBackboneOutput(
        feature_maps=merge_tuples([p.feature_maps for p in parts], rows, batch_size),
        attention_maps=merge_tuples([p.attention_maps for p in parts], rows, batch_size),
    )


@dataclass
class VPDDepthEstimatorOutput(DepthEstimatorOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): scale-invariant log loss, when `labels` are given.
    predicted_depth (`torch.FloatTensor` of shape `(B, H, W)`): metric depth at the input (`pixel_values`) resolution.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): the backbone feature maps, when `output_hidden_states`.
    attentions (`tuple(torch.FloatTensor)`, *optional*): the cross-attention maps, when `output_attentions`.
    pixel_mask (`torch.LongTensor` of shape `(B, H, W)`, *optional*):
        The `pixel_mask` the model was called with (1 on image pixels, 0 on padding), passed through so that
        `VPDImageProcessor.post_process_depth_estimation` can remove the padding of each image.
    """

    pixel_mask: torch.LongTensor | None = None


@dataclass
class VPDSemanticSegmenterOutput(SemanticSegmenterOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): cross-entropy, when `labels` are given.
    logits (`torch.FloatTensor` of shape `(B, num_labels, h, w)`):
        Class scores. From a single pass (training, `labels` given, or `semantic_inference_mode="whole"`): at 1/8 of
        the input, cell `(i, j)` covering input pixels `[8i, 8i + 8) x [8j, 8j + 8)`. From the test-time procedure
        (eval mode without labels, sliding windows and/or several views): at the input resolution.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): the backbone feature maps, when `output_hidden_states`.
    attentions (`tuple(torch.FloatTensor)`, *optional*): the cross-attention maps, when `output_attentions`.
    pixel_mask (`torch.LongTensor` of shape `(B, H, W)`, *optional*):
        The `pixel_mask` of the call (1 = image, 0 = padding), passed through for post-processing.
    """

    pixel_mask: torch.LongTensor | None = None


@dataclass
class VPDNormalEstimatorOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): `1 - cos` angular loss over valid pixels, when `labels` are given.
    predicted_normals (`torch.FloatTensor` of shape `(B, 3, H, W)`):
        Unit surface normals in the camera frame (+x right, +y up, +z towards the observer; diffusers' Marigold
        convention) at the input (`pixel_values`) resolution.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): the backbone feature maps, when `output_hidden_states`.
    attentions (`tuple(torch.FloatTensor)`, *optional*): the cross-attention maps, when `output_attentions`.
    pixel_mask (`torch.LongTensor` of shape `(B, H, W)`, *optional*): the `pixel_mask` of the call, for post-processing.
    """

    loss: torch.FloatTensor | None = None
    predicted_normals: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    pixel_mask: torch.LongTensor | None = None


@dataclass
class VPDDensePredictionOutput(ModelOutput):
    r"""
    The outputs of one pass of a multi-task model; a task the model has no head for (or without labels, for the losses)
    is None.

    loss (`torch.FloatTensor`, *optional*): `sum(config.task_loss_weights[t] * loss_t)` over the tasks given labels.
    depth_loss, segmentation_loss, normals_loss (`torch.FloatTensor`, *optional*): each task's unweighted loss.
    predicted_depth (`torch.FloatTensor` of shape `(B, H, W)`, *optional*): metric depth at the input resolution.
    logits (`torch.FloatTensor` of shape `(B, num_labels, ceil(H / 8), ceil(W / 8))`, *optional*): class scores.
    predicted_normals (`torch.FloatTensor` of shape `(B, 3, H, W)`, *optional*): unit normals at the input resolution.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): the backbone feature maps, when `output_hidden_states`.
    attentions (`tuple(torch.FloatTensor)`, *optional*): the cross-attention maps, when `output_attentions`.
    pixel_mask (`torch.LongTensor` of shape `(B, H, W)`, *optional*): the `pixel_mask` of the call, for post-processing.
    """

    loss: torch.FloatTensor | None = None
    depth_loss: torch.FloatTensor | None = None
    segmentation_loss: torch.FloatTensor | None = None
    normals_loss: torch.FloatTensor | None = None
    predicted_depth: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    predicted_normals: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    pixel_mask: torch.LongTensor | None = None


@dataclass
class VPDReferringSegmentationOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): class-weighted cross-entropy, when `labels` are given.
    logits (`torch.FloatTensor` of shape `(N, 2, h, w)`):
        Background / foreground scores per expression at 1/8 of the input (`h = ceil(H / 8)`).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): the backbone feature maps, when `output_hidden_states`.
    attentions (`tuple(torch.FloatTensor)`, *optional*): the token attention maps, when `output_attentions`.
    pixel_mask (`torch.LongTensor` of shape `(N, H, W)`, *optional*): each expression's image `pixel_mask`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    pixel_mask: torch.LongTensor | None = None

    def foreground_probability(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """`(N, h, w)` probability of the referred object (softmax over the two classes); with `size`, bilinearly
        upsampled (align_corners=True, as the official evaluation) to `(N, *size)`."""
        logits = self.logits.float()
        if size is not None:
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
        return logits.softmax(dim=1)[:, 1]


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


class VPDTextAdapter(nn.Module):
    r"""
    `c' = c + gamma * MLP(c)` with `MLP = Linear -> GELU -> Linear` and a learnable per-channel `gamma` initialised
    small (1e-4), so the UNet first sees (almost) the raw CLIP embeddings. Works on `(..., dim)` inputs.
    """

    def __init__(self, dim: int, gamma_init: float = 1e-4) -> None:
        super().__init__()
        self.linear_1 = tag_init(nn.Linear(dim, dim), "torch_default")
        self.act = nn.GELU()
        self.linear_2 = tag_init(nn.Linear(dim, dim), "torch_default")
        self.gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))
        tag_init(self, "gamma", float(gamma_init))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings + self.gamma * self.linear_2(self.act(self.linear_1(embeddings)))


class VPDVAEEncoder(nn.Module):
    r"""
    The encoder half of a diffusers `AutoencoderKL` (`encoder` and `quant_conv`, with the same parameter names); the
    decoder is never built. `forward` returns the posterior mode (mean), `(B, latent_channels, H / 8, W / 8)`.
    """

    def __init__(self, vae_config: dict[str, Any]) -> None:
        super().__init__()
        defaults = {
            name: param.default
            for name, param in inspect.signature(AutoencoderKL.__init__).parameters.items()
            if param.default is not inspect.Parameter.empty
        }
        cfg = {**defaults, **vae_config}
        self.encoder = Encoder(
            in_channels=cfg["in_channels"],
            out_channels=cfg["latent_channels"],
            down_block_types=tuple(cfg["down_block_types"]),
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg["layers_per_block"],
            act_fn=cfg["act_fn"],
            norm_num_groups=cfg["norm_num_groups"],
            double_z=True,
            mid_block_add_attention=cfg["mid_block_add_attention"],
        )
        latent = cfg["latent_channels"]
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg["use_quant_conv"] else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(pixel_values)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, _logvar = moments.chunk(2, dim=1)
        return mean


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained model base
# ---------------------------------------------------------------------------------------------------------------------


class VPDPreTrainedModel(PreTrainedModel):
    config_class = VPDConfig
    config: VPDConfig
    base_model_prefix = "vpd"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # Stable Diffusion's VAE overflows in float16 (not in bfloat16): `from_pretrained(dtype=torch.float16)` keeps it
    # in float32; `encode_images` casts its input and output.
    _keep_in_fp32_modules = ["vae"]
    # The tasks `from_stable_diffusion` builds by default (None: the class has no head, e.g. the backbone).
    _default_tasks: tuple[str, ...] | None = None
    # `from_pretrained` key renaming from a multi-task folder's head names to this class's (single-task classes).
    _multitask_key_mapping: dict[str, str] = {}
    _no_split_modules = [
        "BasicTransformerBlock",
        "ResnetBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnUpBlock2D",
        "UpBlock2D",
        "VPDVAEEncoder",
        "VPDDepthHead",
        "VPDNormalsHead",
        "VPDSemanticFPNHead",
        "VPDReferringDecoder",
        "CLIPEncoderLayer",
    ]

    def get_input_embeddings(self) -> None:
        """None: images come in, no token embedding to tie or resize (accelerate's FSDP2 `prepare` asks)."""
        return None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise only the layers VPD owns (tagged by their constructors); diffusion weights are never touched."""
        if isinstance(module, VPDModel):
            for table in (module.prompt_embeddings, module.pooled_prompt_embeddings):
                if table is not None:
                    init.zeros_(table)
            return
        spec = getattr(module, "vpd_init", None)
        if spec is None:
            return
        kind, value = spec
        if kind == "gamma":
            init.constant_(module.gamma, value)
        elif kind == "norm":
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif kind in ("normal", "trunc_normal", "torch_default", "xavier_uniform", "kaiming_fan_out"):
            if kind == "normal":
                init.normal_(module.weight, std=value)
            elif kind == "trunc_normal":
                init.trunc_normal_(module.weight, std=value)
            elif kind == "xavier_uniform":
                init.xavier_uniform_(module.weight)
            elif kind == "kaiming_fan_out":
                init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                if kind == "torch_default":
                    bound = 1 / math.sqrt(module.weight[0].numel())
                    init.uniform_(module.bias, -bound, bound)
                else:
                    init.zeros_(module.bias)
        else:
            raise ValueError(f"Unknown VPD init kind {kind!r} on {type(module).__name__}.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any = None, *model_args: Any, **kwargs: Any) -> Any:
        r"""
        transformers' `from_pretrained`. A plain load with an explicit `dtype` reads the safetensors tensor by tensor
        (see `vpd_hf.weights_loading`): the peak memory is the cast model plus one tensor, not plus the whole file.
        """
        # A single-task class reads its head from a folder saved by `VPDModelForDensePrediction` (where the head is
        # named after its task) and skips the other heads; `_keys_to_ignore_on_load_unexpected` keeps that silent.
        renamed = bool(cls._multitask_key_mapping) and "key_mapping" not in kwargs
        files = None
        if casts_on_load(pretrained_model_name_or_path, model_args, kwargs):
            hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
            files = safetensors_files(pretrained_model_name_or_path, hub_kwargs)
            if files is None:
                kwargs.update(hub_kwargs)
        if renamed:  # after the check above, which only takes plain loads (this renaming is ours, not the caller's)
            kwargs["key_mapping"] = dict(cls._multitask_key_mapping)
        if files is None:
            result = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        else:
            config = kwargs.pop("config", None) or cls.config_class.from_pretrained(
                pretrained_model_name_or_path, **hub_kwargs
            )
            with pread_state_dict(files) as state_dict:
                result = super().from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        if files is not None:  # as transformers records it when it reads the files itself
            model.name_or_path = model.config.name_or_path = str(pretrained_model_name_or_path)
        if renamed:
            # transformers would invert the renaming on `save_pretrained` (writing `depth_head.*` for the `head.*` of
            # any depth model it loaded): a single-task model saves under its own names.
            model._weight_conversions = None
        if isinstance(model, VPDPreTrainedModel):
            model.apply_frozen_parts()  # loading materialises fresh parameters, which would all require gradients
            model._own_integer_buffers()
        return result

    def _own_integer_buffers(self) -> None:
        # `dtype=` casts floating tensors only: integer buffers (BatchNorm's `num_batches_tracked`) stay views of the
        # memory-mapped checkpoint, and a few bytes keep the whole file mapped (3.5 GB resident for an SD-1.5-sized
        # model loaded in bf16 from fp32 weights). Owning copies let the mapping go.
        for module in self.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_floating_point():
                    module._buffers[name] = buffer.clone()

    def use_fast_memory_format(self) -> VPDPreTrainedModel:
        r"""
        On the CPU, puts the weights in channels_last memory format, which oneDNN's convolutions run much faster
        (SD-1.5 size, 512x512, 2-core CPU: bf16 4.3 -> 2.2 s, fp32 10.2 -> 8.1 s per image; BENCHMARKS.md). The
        values, `state_dict()` and saved checkpoints are unchanged. Elsewhere a no-op (not measured on GPUs). The
        pipelines and `vpd-hf predict` call it; call it yourself for direct CPU inference.
        """
        if self.device.type == "cpu":
            self.to(memory_format=torch.channels_last)
        return self

    def apply_frozen_parts(self) -> VPDPreTrainedModel:
        """Freezes what VPD never trains: the VAE encoder, and the text encoder unless `config.train_text_encoder`."""
        for module in self.modules():
            if isinstance(module, VPDModel):
                module.vae.requires_grad_(False)
        for name in ("text_encoder", "text_encoder_2"):
            text_encoder = getattr(self, name, None)
            if text_encoder is not None:
                text_encoder.requires_grad_(bool(self.config.train_text_encoder))
        return self

    def convert_sync_batchnorm(self, process_group: Any = None) -> VPDPreTrainedModel:
        """Turns the heads' BatchNorm layers into `SyncBatchNorm` in place (for DDP training; same state-dict keys)."""
        for name, child in list(self.named_children()):
            setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, process_group))
        return self

    # -- Stable Diffusion import --------------------------------------------------------------------------------------

    @classmethod
    def from_stable_diffusion(
        cls,
        pretrained_model_name_or_path: str,
        *,
        tasks: Sequence[str] | None = None,
        scene_names: Sequence[str] | None = None,
        prompt_templates: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        prompt_template: str | None = None,
        token_length: int | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        variant: str | None = None,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        show_progress: bool = True,
        **config_kwargs: Any,
    ):
        r"""
        Builds this VPD class from a diffusers-layout Stable Diffusion checkpoint (SD 1.x, SD 2.x or SDXL; Hub id or
        local folder with `unet/`, `vae/`, `text_encoder/` and `tokenizer/`, other subfolders ignored): the config
        from the checkpoint's own component configs, the UNet and VAE-encoder weights, and the conditioning of the
        tasks, made with the checkpoint's CLIP text encoder(s):

        - class prompts (segmentation among the tasks): one pooled CLIP embedding per class, `prompt_template` filled
          with the class name; cross-attention maps at 32x32 and 16x16 (512 scale). A segmentation-only model gets the
          official sliding-window test procedure; a multi-task model runs one pass (`semantic_inference_mode="whole"`).
        - scene prompts (depth and/or normals only): one embedding per scene, averaged over `prompt_templates`.
        - referring: the text encoder is kept (frozen by default); `token_length` tokens per expression. The matching
          processor (with the checkpoint's tokenizer) is `VPDProcessor.from_stable_diffusion(...)`.

        The text encoders are dropped after use unless the model keeps them (referring).

        Args:
            pretrained_model_name_or_path: e.g. `"stable-diffusion-v1-5/stable-diffusion-v1-5"`.
            tasks: the heads (default: this class's task; for `VPDModelForDensePrediction`, depth, segmentation and
                normals). A single-task class given several tasks keeps their shared conditioning and builds its head.
            scene_names: rows of the scene-prompt table (default: the 27 NYUv2 scene types, official order).
            prompt_templates: scene templates with one `{}` (default: the 80 CLIP ImageNet templates).
            class_names: the label names, in label order (default: ADE20K's 150).
            prompt_template: the class template with one `{}` (default `"a photo of a {}."`).
            token_length: tokens per referring expression (default 40: RefCOCO/RefCOCO+; 77 for RefCOCOg).
            dtype: dtype of the returned model (weights are imported in float32).
            config_kwargs: any other `VPDConfig` field (e.g. `max_depth=80.0`, `latent_scaling="scaling_factor"`).
        """
        if tasks is None:
            if cls._default_tasks is None:
                raise TypeError(f"{cls.__name__} has no task head; build a task class from Stable Diffusion instead.")
            tasks = cls._default_tasks
        if isinstance(tasks, str):
            tasks = [tasks]
        probe = VPDConfig(tasks=list(tasks), unet_config=None, num_prompts=0)  # validates `tasks` (canonical order)
        tasks, conditioning = list(probe.tasks), probe.conditioning
        own = cls._default_tasks or ()
        if len(own) == 1 and own[0] not in tasks:
            raise ValueError(f"`tasks` {tasks} has no {own[0]} head for {cls.__name__}.")
        unused = {
            "scene_names": conditioning == "scene_prompt",
            "prompt_templates": conditioning == "scene_prompt",
            "class_names": conditioning == "class_prompts",
            "prompt_template": conditioning == "class_prompts",
            "token_length": conditioning == "text",
        }
        given = {
            "scene_names": scene_names,
            "prompt_templates": prompt_templates,
            "class_names": class_names,
            "prompt_template": prompt_template,
            "token_length": token_length,
        }
        for name, used in unused.items():
            if given[name] is not None and not used:
                raise ValueError(f"`{name}` does not apply to tasks {tasks} (their conditioning is {conditioning!r}).")

        def make_prompts(text: StableDiffusionText) -> dict[str, Any]:
            if conditioning == "text":
                return {
                    **text.text_encoder_entries(),
                    "num_prompts": 0,
                    "token_length": 40 if token_length is None else token_length,
                }
            if conditioning == "class_prompts":
                template = ADE20K_PROMPT_TEMPLATE if prompt_template is None else prompt_template
                tables = text.encode_prompts(names, [template], show_progress=show_progress)
                return {
                    **tables,
                    "num_prompts": len(names),
                    "prompt_names": names,
                    "prompt_templates": [template],
                    "id2label": dict(enumerate(names)),
                    "label2id": {name: index for index, name in enumerate(names)},
                    # The official test procedure for segmentation alone; one pass for a multi-task model.
                    "semantic_inference_mode": "slide" if tasks == ["segmentation"] else "whole",
                }
            tables = text.encode_prompts(
                names, templates, max_length=NYU_PROMPT_MAX_LENGTH, show_progress=show_progress
            )
            return {**tables, "num_prompts": len(names), "prompt_names": names, "prompt_templates": templates}

        if conditioning == "class_prompts":
            names = list(class_names) if class_names is not None else list(ADE20K_CLASS_NAMES)
            if len(set(names)) != len(names):
                raise ValueError("`class_names` must be unique (they become `id2label` / `label2id`).")
        else:
            names = list(scene_names) if scene_names is not None else list(NYU_SCENE_NAMES)
            templates = list(prompt_templates) if prompt_templates is not None else list(CLIP_IMAGENET_TEMPLATES)
        hub_kwargs = _hub_kwargs(revision, variant, cache_dir, token, local_files_only)
        return cls._build_from_stable_diffusion(
            pretrained_model_name_or_path, make_prompts, {"tasks": tasks, **config_kwargs}, hub_kwargs, dtype
        )

    @classmethod
    def _build_from_stable_diffusion(
        cls,
        pretrained_model_name_or_path: str,
        make_prompts: Callable[[StableDiffusionText], dict[str, Any]],
        config_kwargs: dict[str, Any],
        hub_kwargs: dict[str, Any],
        dtype: torch.dtype | None = None,
    ):
        """
        Builds `cls` from a diffusers-layout Stable Diffusion checkpoint (SD 1.x, SD 2.x or SDXL): the config from its
        `unet/` and `vae/` configs, the UNet and VAE-encoder weights, and whatever `make_prompts(text)` derives from
        its text encoder(s) and tokenizer(s) (:class:`StableDiffusionText`): config entries, plus optionally
        `prompt_embeddings` / `pooled_prompt_embeddings` tensors for the prompt tables and text-encoder state dicts
        for a model that keeps them.
        """
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = str(pretrained_model_name_or_path)
        unet_config = dict(UNet2DConditionModel.load_config(path, subfolder="unet", **hub_kwargs))
        vae_config = dict(AutoencoderKL.load_config(path, subfolder="vae", **hub_kwargs))
        layout = backbone_layout({k: v for k, v in unet_config.items() if not k.startswith("_")})  # fail early
        hub_no_variant = {k: v for k, v in hub_kwargs.items() if k != "variant"}
        text = StableDiffusionText(
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **hub_kwargs).eval(),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **hub_no_variant),
        )
        if layout.text_time:  # SDXL: the second (OpenCLIP bigG) encoder gives half the context and the pooled text
            text.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", **hub_kwargs
            ).eval()
            text.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **hub_no_variant)
            if text.tokenizer_2.get_vocab() != text.tokenizer.get_vocab():
                raise ValueError(
                    f"{path}: `tokenizer_2` has another vocabulary than `tokenizer`; VPD tokenises text once for both "
                    "SDXL encoders (they share the CLIP BPE vocabulary in SDXL)."
                )
        prompts = make_prompts(text)
        tables = {name: prompts.pop(name, None) for name in ("prompt_embeddings", "pooled_prompt_embeddings")}
        text_encoder_states = {
            name: prompts.pop(f"{name}_state_dict", None) for name in ("text_encoder", "text_encoder_2")
        }
        del text

        config = VPDConfig(
            unet_config=unet_config, vae_config=vae_config, **{"base_model": path, **prompts, **config_kwargs}
        )
        config.name_or_path = path
        model = cls(config)

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **hub_kwargs)
        wanted = model.vpd.unet.state_dict().keys()  # once: in the condition it was rebuilt for every key (O(n^2))
        unet_state = {k: v for k, v in unet.state_dict().items() if k in wanted}
        model.vpd.unet.load_state_dict(unet_state, strict=True)
        del unet, unet_state
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **hub_kwargs)
        vae_state = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
        model.vpd.vae.load_state_dict(vae_state, strict=True)
        del vae, vae_state
        for name, table in tables.items():
            if table is not None:
                getattr(model.vpd, name).copy_(table)
        for name, state in text_encoder_states.items():
            if state is not None:
                getattr(model, name).load_state_dict(state, strict=True)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()


@dataclass
class StableDiffusionText:
    """The text side of a Stable Diffusion checkpoint, given to each task's prompt builder: one CLIP text encoder and
    tokenizer (SD 1.x/2.x), or SDXL's two."""

    text_encoder: nn.Module
    tokenizer: Any
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None

    def encode_prompts(
        self,
        names: Sequence[str],
        templates: Sequence[str],
        max_length: int | None = None,
        show_progress: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The prompt table `(len(names), prompt_embed_dim)` (`"prompt_embeddings"`) and, for SDXL, the pooled table
        `(len(names), pooled_dim)` (`"pooled_prompt_embeddings"`); see `encode_prompts` / `encode_sdxl_prompts`."""
        if self.text_encoder_2 is None:
            embeddings = encode_prompts(
                self.text_encoder, self.tokenizer, names, templates, max_length=max_length, show_progress=show_progress
            )
            return {"prompt_embeddings": embeddings}
        embeddings, pooled = encode_sdxl_prompts(
            self.text_encoder,
            self.text_encoder_2,
            self.tokenizer,
            names,
            templates,
            max_length=max_length,
            pad_token_id_2=self.tokenizer_2.pad_token_id,
            show_progress=show_progress,
        )
        return {"prompt_embeddings": embeddings, "pooled_prompt_embeddings": pooled}

    def text_encoder_entries(self) -> dict[str, Any]:
        """Config entries and state dicts of the text encoder(s) a referring model keeps. SDXL's second encoder
        records `tokenizer_2`'s pad and EOS ids in its config (used to re-pad the once-tokenised expressions)."""
        entries = {
            "text_encoder_state_dict": self.text_encoder.state_dict(),
            "text_config": self.text_encoder.config.to_dict(),
        }
        if self.text_encoder_2 is not None:
            entries["text_encoder_2_state_dict"] = self.text_encoder_2.state_dict()
            entries["text_config_2"] = {
                **self.text_encoder_2.config.to_dict(),
                "pad_token_id": self.tokenizer_2.pad_token_id,
                "eos_token_id": self.tokenizer_2.eos_token_id,
            }
        return entries


# ---------------------------------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------------------------------


class VPDModel(VPDPreTrainedModel):
    r"""
    The VPD backbone: `pixel_values -> VAE encoder (frozen, posterior mode) -> optional latent scaling -> one UNet pass
    at `config.timestep` conditioned on `TextAdapter(prompt_embeds)` -> four decoder feature maps (+ cross-attention
    maps where configured)`. Which UNet modules give the maps, and which layers the attention maps, follow from the
    UNet config (`vpd_hf.backbones.backbone_layout`; SD 1.x, SD 2.x and SDXL).

    Submodules: `unet` (diffusers `UNet2DConditionModel` without its unused output norm/conv), `vae`
    (:class:`VPDVAEEncoder`), `text_adapter` (:class:`VPDTextAdapter`), and the persistent buffer `prompt_embeddings`
    `(num_prompts, prompt_embed_dim)` holding the class or scene embeddings (none when `num_prompts == 0`). SDXL UNets
    also get `pooled_prompt_embeddings` `(num_prompts, pooled_dim)`, each prompt's pooled text embedding (SDXL's
    `added_cond_kwargs["text_embeds"]`); None otherwise.
    """

    def __init__(self, config: VPDConfig) -> None:
        super().__init__(config)
        self.vae = VPDVAEEncoder(config.vae_config)
        self.vae.requires_grad_(False)
        self.unet = UNet2DConditionModel(**config.unet_config)
        # The UNet's output head (GroupNorm + SiLU + conv to the noise) is never used by VPD: drop it, so that its
        # output is the 1/8 feature map and DDP sees no unused parameters.
        self.unet.conv_norm_out = None
        self.unet.conv_out = nn.Identity()
        self.text_adapter = VPDTextAdapter(config.prompt_embed_dim, config.text_adapter_gamma_init)
        self._backbone = config.backbone
        if config.num_prompts > 0:
            self.register_buffer("prompt_embeddings", torch.zeros(config.num_prompts, config.prompt_embed_dim))
        else:
            self.prompt_embeddings = None
        if config.num_prompts > 0 and self._backbone.text_time:
            pooled = torch.zeros(config.num_prompts, self._backbone.pooled_dim)
            self.register_buffer("pooled_prompt_embeddings", pooled)
        else:
            self.pooled_prompt_embeddings = None

        self._recorder = ForwardRecorder()
        for level, tap in enumerate(self._backbone.taps):
            if tap.module != UNET_OUTPUT:  # the stride-8 map is the UNet's output
                self.unet.get_submodule(tap.module).register_forward_hook(self._recorder.hook(_feature_key(level)))
        self._attention_levels = [_resolution_level(r) for r in config.attention_resolutions]
        self.install_attention_capture()
        self.post_init()

    # -- inputs --------------------------------------------------------------------------------------------------------

    def feature_channels(self, num_tokens: int) -> list[int]:
        """Channels of the four output feature maps when the context has `num_tokens` tokens."""
        channels = self.config.unet_channels
        return [c + (num_tokens if level in self._attention_levels else 0) for level, c in enumerate(channels)]

    def get_prompt_embeddings(self, prompt_ids: torch.Tensor | Sequence[int] | None, batch_size: int) -> torch.Tensor:
        r"""
        One prompt token per image, `(batch_size, 1, prompt_embed_dim)`: row `prompt_ids[i]` of the prompt table, or the
        mean of the table (the "unknown" prompt, as mmsegmentation's VPD) where `prompt_ids` is None or -1.
        """
        table = self.prompt_embeddings
        if table is None:
            raise ValueError("This model has no prompt table (`num_prompts` is 0); pass `prompt_embeds` instead.")
        return self._table_rows(table, prompt_ids, batch_size).unsqueeze(1)

    def get_pooled_prompt_embeddings(
        self, prompt_ids: torch.Tensor | Sequence[int] | None, batch_size: int
    ) -> torch.Tensor | None:
        r"""
        SDXL: the pooled text embedding of each image's prompt, `(batch_size, pooled_dim)`, chosen as in
        :meth:`get_prompt_embeddings` (row `prompt_ids[i]`, the table mean for None / -1). None for SD 1.x/2.x.
        """
        table = self.pooled_prompt_embeddings
        if not self._backbone.text_time or table is None:
            return None
        return self._table_rows(table, prompt_ids, batch_size)

    @staticmethod
    def _table_rows(
        table: torch.Tensor, prompt_ids: torch.Tensor | Sequence[int] | None, batch_size: int
    ) -> torch.Tensor:
        """`(batch_size, D)`: row `prompt_ids[i]` of `table`, its mean row where the id is -1 or `prompt_ids` is None."""
        mean = table.mean(dim=0, keepdim=True)
        if prompt_ids is None:
            return mean.expand(batch_size, -1)
        ids = torch.as_tensor(prompt_ids, device=table.device)
        if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex() or ids.shape != (batch_size,):
            raise ValueError(
                f"`scene_ids` must be integers of shape ({batch_size},) (one per image, -1 for unknown); "
                f"got dtype {ids.dtype} and shape {tuple(ids.shape)}."
            )
        if bool(((ids < -1) | (ids >= table.shape[0])).any()):
            raise ValueError(
                f"`scene_ids` must lie in [-1, {table.shape[0] - 1}] (the {table.shape[0]} prompt rows, -1 = unknown); "
                f"got {ids.tolist()}."
            )
        return torch.where((ids >= 0)[:, None], table[ids.clamp_min(0)], mean)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
        in_channels = self.vae.encoder.conv_in.in_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != in_channels or not pixel_values.is_floating_point():
            raise ValueError(
                f"`pixel_values` must be a float tensor of shape (batch, {in_channels}, height, width) in [-1, 1]; "
                f"got {pixel_values.dtype} of shape {tuple(pixel_values.shape)}."
            )

    # -- forward ------------------------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        r"""
        VAE posterior mode of `pixel_values` `(B, 3, H, W)` in [-1, 1], zero-padded at the bottom/right to a multiple of
        `config.pad_multiple` (64), with the configured latent scaling. Runs without gradients (the VAE is frozen).
        Returns `(B, latent_channels, ceil(H / 64) * 8, ceil(W / 64) * 8)` in the UNet's dtype.
        """
        self._check_pixel_values(pixel_values)
        multiple = self.config.pad_multiple
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        vae_dtype = self.vae.encoder.conv_in.weight.dtype
        with torch.no_grad():
            latents = self.vae(pixel_values.to(vae_dtype))
        if vae_dtype == torch.float16 and not bool(torch.isfinite(latents).all()):
            raise FloatingPointError(
                "The VAE encoder overflowed in float16 (a known property of Stable Diffusion's VAE). Keep it in float32: "
                "`model.vpd.vae.float()`, as `from_pretrained(..., dtype=torch.float16)` does, or use bfloat16."
            )
        scaling = self.config.latent_scaling
        if scaling == "scaling_factor":
            latents = latents * float(self.config.vae_config.get("scaling_factor", 0.18215))
        elif scaling is not None:
            latents = latents / float(scaling)
        return latents.to(self.unet.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        return_dict: bool | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> VPDBackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`):
                Images in [-1, 1]; any size (padded internally to a multiple of 64).
            prompt_embeds (`torch.FloatTensor` of shape `(B, T, D)` or `(T, D)`, *optional*):
                Raw text conditioning before the TextAdapter; a 2-D tensor is shared by the whole batch. Defaults to
                the whole prompt table `(num_prompts, D)`.
            latents (`torch.FloatTensor` of shape `(B, C, h, w)`, *optional*):
                Output of :meth:`encode_images`, to reuse one encoding for several prompts (instead of `pixel_values`).
            pooled_prompt_embeds (`torch.FloatTensor` of shape `(B, P)` or `(P,)`, *optional*):
                SDXL only: the pooled text embedding (`added_cond_kwargs["text_embeds"]`) of `prompt_embeds`; required
                with `prompt_embeds`, defaults to the mean of `pooled_prompt_embeddings` with the whole prompt table.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (pixel_values is None) == (latents is None):
            raise ValueError("Pass exactly one of `pixel_values` and `latents`.")
        if latents is None:
            latents = self.encode_images(pixel_values)
        elif latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"`latents` must have shape (batch, {self.config.latent_channels}, h, w), got {tuple(latents.shape)}."
            )
        batch_size = latents.shape[0]
        timesteps = torch.full((batch_size,), self.config.timestep, dtype=torch.long, device=latents.device)
        conditioning = self.unet_conditioning(latents, prompt_embeds, pooled_prompt_embeds)

        with self._recorder.record() as record:
            level0 = self.unet(latents, timesteps, **conditioning, return_dict=False)[0]
        features = [level0] + [self._tapped(record, level) for level in range(1, len(self._backbone.taps))]
        if level0.requires_grad and not all(f.requires_grad for f in features):
            raise RuntimeError(
                "UNet features lost their gradient: reentrant activation checkpointing hides module outputs from "
                "autograd. Enable it with `activation_checkpointing_kwargs={'use_reentrant': False}` (the default)."
            )
        attention_maps = []
        for level in self._attention_levels:
            maps = self._attention_map(record, level, features[level].shape[-2:])
            attention_maps.append(maps)
            features[level] = torch.cat([features[level], maps.to(features[level].dtype)], dim=1)
        output = VPDBackboneOutput(feature_maps=tuple(features), attention_maps=tuple(attention_maps) or None)
        return output if return_dict else output.to_tuple()

    def unet_conditioning(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        r"""
        The UNet's conditioning keyword arguments for `latents` `(B, C, h, w)`: `encoder_hidden_states` (the adapted
        context, `(B, T, D)`) and, for SDXL, `added_cond_kwargs` with `text_embeds` `(B, P)` and `time_ids` `(B, 6)` =
        `(H, W, 0, 0, H, W)`, `(H, W)` the padded image size (`h, w` times the VAE factor). See :meth:`forward`.
        """
        batch_size = latents.shape[0]
        conditioning: dict[str, Any] = {"encoder_hidden_states": self._context(prompt_embeds, batch_size)}
        if not self._backbone.text_time:
            if pooled_prompt_embeds is not None:
                raise ValueError("`pooled_prompt_embeds` is for SDXL UNets (`addition_embed_type='text_time'`) only.")
            return conditioning
        if pooled_prompt_embeds is None:
            if prompt_embeds is not None:
                raise ValueError(
                    "This SDXL backbone needs `pooled_prompt_embeds` (SDXL's pooled text embedding) with `prompt_embeds`."
                )
            if self.pooled_prompt_embeddings is None:
                raise ValueError("`pooled_prompt_embeds` is required: this model has no pooled prompt table.")
            pooled_prompt_embeds = self.pooled_prompt_embeddings.mean(dim=0)
        dim = self._backbone.pooled_dim
        if pooled_prompt_embeds.ndim not in (1, 2) or pooled_prompt_embeds.shape[-1] != dim:
            raise ValueError(
                f"`pooled_prompt_embeds` must have shape (batch, {dim}) or ({dim},), got {tuple(pooled_prompt_embeds.shape)}."
            )
        if pooled_prompt_embeds.ndim == 2 and pooled_prompt_embeds.shape[0] != batch_size:
            raise ValueError(
                f"`pooled_prompt_embeds` has batch size {pooled_prompt_embeds.shape[0]}, the images {batch_size}."
            )
        factor = self.config.vae_downsample_factor
        height, width = latents.shape[-2] * factor, latents.shape[-1] * factor
        conditioning["added_cond_kwargs"] = {
            "text_embeds": pooled_prompt_embeds.expand(batch_size, -1).to(self.unet.dtype),
            "time_ids": sdxl_time_ids(height, width, batch_size, device=latents.device),
        }
        return conditioning

    def _tapped(self, record: dict[str, list[torch.Tensor]], level: int) -> torch.Tensor:
        """The feature map of tap `level` (>= 1) from the record, average-pooled where the tap is derived (SDXL's
        stride-64 map from its stride-32 mid block)."""
        hidden = self._single(record, _feature_key(level))
        pool = self._backbone.taps[level].pool
        return F.avg_pool2d(hidden, pool) if pool > 1 else hidden

    def _context(self, prompt_embeds: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if prompt_embeds is None:
            if self.prompt_embeddings is None:
                raise ValueError("`prompt_embeds` is required: this model has no prompt table (`num_prompts` is 0).")
            prompt_embeds = self.prompt_embeddings
        dim = self.config.prompt_embed_dim
        if prompt_embeds.ndim not in (2, 3) or prompt_embeds.shape[-1] != dim or prompt_embeds.shape[-2] == 0:
            raise ValueError(
                f"`prompt_embeds` must have shape (batch, tokens, {dim}) or (tokens, {dim}), "
                f"got {tuple(prompt_embeds.shape)}."
            )
        if prompt_embeds.ndim == 3 and prompt_embeds.shape[0] != batch_size:
            raise ValueError(f"`prompt_embeds` has batch size {prompt_embeds.shape[0]}, the images {batch_size}.")
        context = self.text_adapter(prompt_embeds.to(self.text_adapter.gamma.dtype))
        if context.ndim == 2:
            context = context.unsqueeze(0).expand(batch_size, -1, -1)
        return context.to(self.unet.dtype)

    @staticmethod
    def _single(record: dict[str, list[torch.Tensor]], key: str) -> torch.Tensor:
        values = record.get(key, [])
        if len(values) != 1:
            raise RuntimeError(f"Expected one UNet output for `{key}`, captured {len(values)}.")
        return values[0]

    def _attention_map(self, record: dict[str, list[torch.Tensor]], level: int, size: torch.Size) -> torch.Tensor:
        maps = record.get(attention_key(level), [])
        expected = self._attention_layer_counts[level]
        if len(maps) != expected:
            raise RuntimeError(
                f"Captured {len(maps)} of the {expected} cross-attention maps at UNet level {level}: the attention "
                "processors installed by VPD were replaced (e.g. by `unet.set_attn_processor`). Rebuild the model or "
                "call `model.vpd.install_attention_capture()`."
            )
        mean = torch.stack(maps).mean(dim=0)  # (B, h * w, T)
        return mean.transpose(1, 2).unflatten(2, tuple(size))

    def install_attention_capture(self) -> None:
        """(Re)install the attention-map processors, e.g. after the UNet's attention processors were replaced."""
        layers = {level: self._backbone.attention_layers[level] for level in self._attention_levels}
        self._attention_layer_counts = install_cross_attention_capture(
            self.unet, layers, self._recorder, detach=self.config.detach_attention_maps
        )


# ---------------------------------------------------------------------------------------------------------------------
# Dense tasks: one composition (backbone -> shared conditioning -> heads -> losses) for every dense class
# ---------------------------------------------------------------------------------------------------------------------

# The head modules of each task (role -> attribute name) in `VPDModelForDensePrediction`; a single-task class names them
# by role (`head`, `neck`), as its checkpoints always have.
_MULTITASK_MODULES: dict[str, dict[str, str]] = {
    "depth": {"head": "depth_head"},
    "segmentation": {"neck": "segmentation_neck", "head": "segmentation_head"},
    "normals": {"head": "normals_head"},
}


def _build_task_modules(task: str, config: VPDConfig, channels: list[int]) -> dict[str, nn.Module]:
    """The head modules of `task` (by role) on backbone feature maps of `channels`."""
    if task == "segmentation":
        return {
            "neck": VPDFPNNeck(channels, config.fpn_channels),
            "head": VPDSemanticFPNHead(
                config.num_labels,
                in_channels=config.fpn_channels,
                channels=config.semantic_head_channels,
                dropout=config.semantic_classifier_dropout,
            ),
        }
    kwargs = dict(
        in_channels=channels,
        neck_channels=config.depth_neck_channels,
        head_channels=config.depth_head_channels,
        deconv_filters=config.depth_deconv_filters,
        deconv_kernels=config.depth_deconv_kernels,
        neck_init_std=config.initializer_range,
    )
    if task == "depth":
        return {"head": VPDDepthHead(max_depth=config.max_depth, **kwargs)}
    return {"head": VPDNormalsHead(**kwargs)}


def _segmentation_to_input_resolution(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear x8 of 1/8 logits, cropped to the input `size` (exactly the input grid, also for sizes that are not
    multiples of 8)."""
    upsampled = F.interpolate(
        logits, size=(logits.shape[-2] * 8, logits.shape[-1] * 8), mode="bilinear", align_corners=False
    )
    return upsampled[..., : size[0], : size[1]]


def _prediction_size(task: str, size: tuple[int, int]) -> tuple[int, int]:
    """The spatial size of `task`'s prediction for an input of `size`: the input's, or 1/8 of it (segmentation)."""
    return (math.ceil(size[0] / 8), math.ceil(size[1] / 8)) if task == "segmentation" else tuple(size)


class VPDDenseTaskModel(VPDPreTrainedModel):
    r"""
    The composition shared by the dense VPD classes (depth, semantic segmentation, surface normals, and all of them at
    once): `pixel_values -> VAE -> UNet (one pass, with the conditioning of `config.conditioning`) -> each head ->
    each task's loss`. A subclass chooses its heads (`_head_tasks`, None: `config.tasks`) and their attribute names.

    A single-task class built on a multi-task config (e.g. loaded from a folder saved by
    :class:`VPDModelForDensePrediction`) keeps that config's conditioning and builds only its own head, so its output
    is exactly that head's output in the multi-task model.
    """

    # The heads this class builds (None: all of `config.tasks`) and each head's module names (role -> attribute).
    _head_tasks: tuple[str, ...] | None = None
    _task_modules: dict[str, dict[str, str]] = _MULTITASK_MODULES

    def __init__(self, config: VPDConfig) -> None:
        config = self._config_for_heads(config)
        super().__init__(config)
        self.vpd = VPDModel(config)
        if config.conditioning == "class_prompts" and config.num_prompts != config.num_labels:
            raise ValueError(
                f"Segmentation needs one class prompt per label: `num_prompts` is {config.num_prompts} but the config "
                f"has {config.num_labels} labels (`id2label`)."
            )
        channels = self.vpd.feature_channels(num_tokens=config.context_tokens)
        for task in self.tasks:
            for role, module in _build_task_modules(task, config, channels).items():
                self.add_module(self._task_modules[task][role], module)
        self.post_init()

    @classmethod
    def _config_for_heads(cls, config: VPDConfig) -> VPDConfig:
        """`config`, or for a single-task class given the config of another single task (as any VPD config could
        build any class before configs named their tasks) a copy naming this class's task."""
        if cls._head_tasks is None or set(cls._head_tasks) <= set(config.tasks):
            return config
        if len(config.tasks) > 1 or "referring" in config.tasks:
            raise ValueError(
                f"{cls.__name__} needs a {' and '.join(cls._head_tasks)} head, but this config's tasks are "
                f"{config.tasks}."
            )
        config = copy.deepcopy(config)
        config.tasks = list(cls._head_tasks)
        return config

    @property
    def tasks(self) -> list[str]:
        """The tasks this model has a head for (canonical order: depth, segmentation, normals)."""
        heads = self._head_tasks if self._head_tasks is not None else self.config.tasks
        return [task for task in self.config.tasks if task in heads] or list(heads)

    def _task_module(self, task: str, role: str = "head") -> nn.Module:
        return getattr(self, self._task_modules[task][role])

    # -- the pass ------------------------------------------------------------------------------------------------------

    def _conditioning(
        self, scene_ids: torch.Tensor | Sequence[int] | None, batch_size: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`prompt_embeds` and (SDXL) `pooled_prompt_embeds` for `VPDModel.forward`: one scene token per image, or
        (None, None) for the whole class-prompt table, shared by the batch (see `VPDConfig.conditioning`)."""
        if self.config.conditioning == "class_prompts":
            if scene_ids is not None:
                raise ValueError(
                    "`scene_ids`: this model is conditioned on its class prompts (shared by all heads of its tasks "
                    f"{self.config.tasks}), not on a scene prompt; leave `scene_ids` out."
                )
            return None, None
        return (
            self.vpd.get_prompt_embeddings(scene_ids, batch_size),
            self.vpd.get_pooled_prompt_embeddings(scene_ids, batch_size),  # SDXL only, else None
        )

    def _apply_head(self, task: str, features: tuple[torch.Tensor, ...], size: tuple[int, int]) -> torch.Tensor:
        """`task`'s prediction from one pass's feature maps, for images of `size` (H, W) before padding: depth
        `(B, H, W)`, normals `(B, 3, H, W)`, segmentation logits `(B, C, ceil(H / 8), ceil(W / 8))`."""
        if task == "segmentation":
            logits = self._task_module(task)(self._task_module(task, "neck")(features))
            return logits[..., : math.ceil(size[0] / 8), : math.ceil(size[1] / 8)]
        return self._task_module(task)(features, size)

    def _dense_pass(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        scene_ids: torch.Tensor | Sequence[int] | None,
        tasks: Sequence[str],
    ) -> tuple[dict[str, torch.Tensor], VPDBackboneOutput]:
        r"""
        One VAE + UNet pass for `pixel_values` `(B, 3, H, W)` and the predictions of `tasks` from it (see
        :meth:`_apply_head`). With `pixel_mask`, images of different sizes run at their own padded sizes, one pass
        per size group (see `vpd_hf.batching`), so that every output is independent of the rest of the batch.
        """
        self.vpd._check_pixel_values(pixel_values)
        _check_pixel_mask(pixel_mask, pixel_values)
        batch_size, _, height, width = pixel_values.shape
        prompt_embeds, pooled = self._conditioning(scene_ids, batch_size)
        groups = size_groups(pixel_mask, self.config.pad_multiple)
        if groups is None:
            backbone = self.vpd(pixel_values=pixel_values, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)
            return {task: self._apply_head(task, backbone.feature_maps, (height, width)) for task in tasks}, backbone
        parts = []
        for group in groups:
            out = self.vpd(
                pixel_values=crop(pixel_values, group),
                prompt_embeds=None if prompt_embeds is None else prompt_embeds[group.indices],
                pooled_prompt_embeds=None if pooled is None else pooled[group.indices],
            )
            parts.append(({task: self._apply_head(task, out.feature_maps, group.size) for task in tasks}, out))
        rows = [group.indices for group in groups]
        predictions = {
            task: merge(
                [part[task] for part, _ in parts], rows, batch_size, size=_prediction_size(task, (height, width))
            )
            for task in tasks
        }
        return predictions, _merge_backbone_outputs([out for _, out in parts], rows, batch_size)

    # -- losses --------------------------------------------------------------------------------------------------------

    def _check_labels(self, task: str, labels: torch.Tensor | None, pixel_values: torch.Tensor) -> None:
        """Raises a `ValueError` naming `argument` for labels of the wrong type or shape (before the pass runs)."""
        if labels is None:
            return
        argument = self._label_argument(task)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(labels).__name__}.")
        batch_size, _, height, width = pixel_values.shape
        expected = (batch_size, 3, height, width) if task == "normals" else (batch_size, height, width)
        if tuple(labels.shape) != expected:
            if task == "segmentation":
                raise ValueError(
                    f"`{argument}` must have shape {expected} (one class index per pixel), got {tuple(labels.shape)}."
                )
            what = "depth in metres" if task == "depth" else "unit normals"
            raise ValueError(
                f"`{argument}` must have the shape of the prediction, {expected} ({what}), got {tuple(labels.shape)}."
            )
        if task == "segmentation" and (labels.is_floating_point() or labels.dtype == torch.bool):
            raise TypeError(f"`{argument}` must be an integer tensor of class indices, got {labels.dtype}.")
        if task != "segmentation" and not labels.is_floating_point():
            raise TypeError(f"`{argument}` must be a float tensor, got {labels.dtype}.")

    def _label_argument(self, task: str) -> str:
        return "labels"

    def _task_loss(
        self, task: str, prediction: torch.Tensor, labels: torch.Tensor, pixel_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`task`'s training loss (padding, where `pixel_mask` is 0, left out): scale-invariant log loss (depth),
        cross-entropy at the input resolution (segmentation), `1 - cos` (normals)."""
        if task == "depth":
            return silog_loss(prediction, labels, self.config.silog_lambda, valid_mask=pixel_mask)
        if task == "normals":
            return normals_cosine_loss(prediction, labels, valid_mask=pixel_mask)
        ignore_index = self.config.semantic_loss_ignore_index
        if pixel_mask is not None:
            labels = labels.masked_fill(pixel_mask == 0, ignore_index)
        return semantic_cross_entropy(
            _segmentation_to_input_resolution(prediction, labels.shape[-2:]),
            labels,
            ignore_index=ignore_index,
            avg_non_ignore=self.config.semantic_loss_avg_non_ignore,
        )

    def _single_task_forward(
        self,
        task: str,
        pixel_values: torch.Tensor,
        scene_ids: torch.Tensor | Sequence[int] | None,
        labels: torch.Tensor | None,
        pixel_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, VPDBackboneOutput]:
        """The prediction of `task`, its loss when `labels` are given, and the backbone output of one pass."""
        self._check_labels(task, labels, pixel_values)
        predictions, backbone = self._dense_pass(pixel_values, pixel_mask, scene_ids, (task,))
        loss = None if labels is None else self._task_loss(task, predictions[task], labels, pixel_mask)
        return predictions[task], loss, backbone


# ---------------------------------------------------------------------------------------------------------------------
# Depth estimation
# ---------------------------------------------------------------------------------------------------------------------


def _single_task_loading(task: str) -> tuple[dict[str, str], list[str]]:
    """`from_pretrained` key renaming (multi-task head names -> this task's) and the other heads' key patterns, whose
    weights a single-task class skips without a warning."""
    mapping = {rf"^{name}\.": f"{role}." for role, name in _MULTITASK_MODULES[task].items()}
    others = [name for other, names in _MULTITASK_MODULES.items() if other != task for name in names.values()]
    return mapping, [rf"^{name}\." for name in others]


class VPDModelForDepthEstimation(VPDDenseTaskModel):
    r"""
    VPD for monocular metric depth (NYUv2): the backbone conditioned on one scene token per image, the official
    conv-deconv depth head with `sigmoid * max_depth` output, and the scale-invariant log loss. Built on a multi-task
    config (a folder saved by :class:`VPDModelForDensePrediction`), it keeps that model's conditioning (the class
    prompts, when segmentation is among its tasks) and gives its depth head's output.
    """

    _default_tasks = ("depth",)
    _head_tasks = ("depth",)
    _task_modules = {"depth": {"head": "head"}}
    _multitask_key_mapping, _keys_to_ignore_on_load_unexpected = _single_task_loading("depth")

    def forward(
        self,
        pixel_values: torch.Tensor,
        scene_ids: torch.Tensor | Sequence[int] | None = None,
        labels: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> VPDDepthEstimatorOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): images in [-1, 1], any size.
            scene_ids (`torch.LongTensor` of shape `(B,)`, *optional*):
                Row of the scene-prompt table per image (`config.prompt_names`); -1 or None uses the mean prompt.
                Not accepted by a model conditioned on class prompts (built with segmentation).
            labels (`torch.FloatTensor` of shape `(B, H, W)`, *optional*):
                Ground-truth depth in metres; 0 (or NaN/inf) marks pixels without depth.
            pixel_mask (`torch.LongTensor` of shape `(B, H, W)`, *optional*):
                1 on image pixels and 0 on padding (from `VPDImageProcessor`); padding is left out of the loss and the
                mask is returned with the output for post-processing.

        Returns:
            [`VPDDepthEstimatorOutput`] with `predicted_depth` `(B, H, W)` in metres and `loss` when `labels` are given.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        predicted_depth, loss, backbone = self._single_task_forward(
            "depth", pixel_values, scene_ids, labels, pixel_mask
        )
        output = VPDDepthEstimatorOutput(
            loss=loss,
            predicted_depth=predicted_depth,
            hidden_states=backbone.feature_maps if output_hidden_states else None,
            attentions=backbone.attention_maps if output_attentions else None,
            pixel_mask=pixel_mask,
        )
        return output if return_dict else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------------
# Semantic segmentation
# ---------------------------------------------------------------------------------------------------------------------


class VPDModelForSegmentation(VPDDenseTaskModel):
    r"""
    VPD for semantic segmentation (ADE20K): the backbone conditioned on the whole class-prompt table (one token per
    class, shared by the batch), the class tokens' cross-attention maps concatenated to the 1/16 and 1/32 features, an
    FPN neck and a Semantic FPN head predicting logits at 1/8 of the image, and pixel-wise cross-entropy.

    In eval mode and without labels, `forward` runs the configured test procedure (`config.semantic_inference_*`):
    the official sliding windows of 512 every 341 pixels when `semantic_inference_mode="slide"`, and optionally
    multi-scale and flip averaging, so that pipelines get the evaluation-quality prediction.
    """

    _default_tasks = ("segmentation",)
    _head_tasks = ("segmentation",)
    _task_modules = {"segmentation": {"neck": "neck", "head": "head"}}
    _multitask_key_mapping, _keys_to_ignore_on_load_unexpected = _single_task_loading("segmentation")

    def _single_pass(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, VPDBackboneOutput]:
        """Logits `(B, C, ceil(H / 8), ceil(W / 8))` of one pass, and the backbone output; with `pixel_mask`, images of
        different sizes run at their own padded sizes (see `vpd_hf.batching`)."""
        predictions, backbone = self._dense_pass(pixel_values, pixel_mask, None, ("segmentation",))
        return predictions["segmentation"], backbone

    @staticmethod
    def _to_input_resolution(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear x8 of 1/8 logits, cropped to the input `size`."""
        return _segmentation_to_input_resolution(logits, size)

    def dense_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One pass, logits `(B, num_labels, H, W)` at the input resolution (the `logits_fn` of the test procedures)."""
        logits, _ = self._single_pass(pixel_values)
        return self._to_input_resolution(logits, pixel_values.shape[-2:])

    def segmentation_logits(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        mode: str | None = None,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
        crop_size: int | None = None,
        stride: int | None = None,
    ) -> torch.Tensor:
        r"""
        Test-time logits `(B, num_labels, H, W)` at the input resolution: sliding windows and/or multi-scale and flip
        averaging (see `vpd_hf.inference.test_time_logits`) over each image's un-padded region (from `pixel_mask`);
        padding gets 0. Arguments left as None take the `config.semantic_inference_*` values.
        """
        self.vpd._check_pixel_values(pixel_values)
        _check_pixel_mask(pixel_mask, pixel_values)
        options = semantic_inference_options(
            self.config, mode=mode, scales=scales, flip=flip, crop_size=crop_size, stride=stride
        )
        return masked_test_time_logits(self.dense_logits, pixel_values, pixel_mask, **options)

    def _uses_test_time_procedure(self) -> bool:
        return not is_single_pass(semantic_inference_options(self.config))

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> VPDSemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): images in [-1, 1], any size.
            labels (`torch.LongTensor` of shape `(B, H, W)`, *optional*):
                Class indices in `[0, num_labels)`; `config.semantic_loss_ignore_index` (255) marks ignored pixels.
            pixel_mask (`torch.LongTensor` of shape `(B, H, W)`, *optional*):
                1 on image pixels, 0 on padding: padding is ignored by the loss and by the test procedure, and the
                mask is returned for post-processing.

        Returns:
            [`VPDSemanticSegmenterOutput`]; see its `logits` for their resolution in each mode.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self.vpd._check_pixel_values(pixel_values)
        _check_pixel_mask(pixel_mask, pixel_values)
        if not self.training and labels is None and self._uses_test_time_procedure():
            if output_hidden_states or output_attentions:
                raise ValueError(
                    "`output_hidden_states` / `output_attentions` describe one pass; the configured test procedure "
                    "runs several. Set `config.semantic_inference_mode='whole'` (and no extra scales/flip) for them."
                )
            output = VPDSemanticSegmenterOutput(
                logits=self.segmentation_logits(pixel_values, pixel_mask), pixel_mask=pixel_mask
            )
            return output if return_dict else output.to_tuple()

        logits, loss, backbone = self._single_task_forward("segmentation", pixel_values, None, labels, pixel_mask)
        output = VPDSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=backbone.feature_maps if output_hidden_states else None,
            attentions=backbone.attention_maps if output_attentions else None,
            pixel_mask=pixel_mask,
        )
        return output if return_dict else output.to_tuple()


VPDModelForSemanticSegmentation = VPDModelForSegmentation


# ---------------------------------------------------------------------------------------------------------------------
# Surface normals
# ---------------------------------------------------------------------------------------------------------------------


class VPDModelForNormalEstimation(VPDDenseTaskModel):
    r"""
    VPD for surface-normal estimation: the depth model's backbone and conditioning (one scene token per image; the
    class prompts and their attention maps when built on a multi-task config with segmentation), a head of the depth
    head's architecture with three outputs normalised to unit length (:class:`VPDNormalsHead`), and the `1 - cos` loss
    on valid pixels (see `vpd_hf.losses.normals_cosine_loss` for why not the angular NLL).

    Convention (diffusers' Marigold, so that `MarigoldImageProcessor.visualize_normals` and
    `vpd_hf.visualization.visualize_normals` colour them alike): unit vectors in the camera frame, +x to the right of
    the image, +y up, +z towards the observer (out of the screen); a wall facing the camera is `(0, 0, 1)`, a floor
    `(0, 1, 0)`. Colour = `(n + 1) / 2`.
    """

    _default_tasks = ("normals",)
    _head_tasks = ("normals",)
    _task_modules = {"normals": {"head": "head"}}
    _multitask_key_mapping, _keys_to_ignore_on_load_unexpected = _single_task_loading("normals")

    def forward(
        self,
        pixel_values: torch.Tensor,
        scene_ids: torch.Tensor | Sequence[int] | None = None,
        labels: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> VPDNormalEstimatorOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): images in [-1, 1], any size.
            scene_ids (`torch.LongTensor` of shape `(B,)`, *optional*):
                Row of the scene-prompt table per image; -1 or None uses the mean prompt. Not accepted by a model
                conditioned on class prompts (built with segmentation).
            labels (`torch.FloatTensor` of shape `(B, 3, H, W)`, *optional*):
                Ground-truth unit normals in the convention above; an all-zero vector marks a pixel without a label.
            pixel_mask (`torch.LongTensor` of shape `(B, H, W)`, *optional*):
                1 on image pixels and 0 on padding; padding is left out of the loss and the mask is returned.

        Returns:
            [`VPDNormalEstimatorOutput`] with `predicted_normals` `(B, 3, H, W)` (unit length) and `loss` when
            `labels` are given.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        normals, loss, backbone = self._single_task_forward("normals", pixel_values, scene_ids, labels, pixel_mask)
        output = VPDNormalEstimatorOutput(
            loss=loss,
            predicted_normals=normals,
            hidden_states=backbone.feature_maps if output_hidden_states else None,
            attentions=backbone.attention_maps if output_attentions else None,
            pixel_mask=pixel_mask,
        )
        return output if return_dict else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------------
# Several dense tasks from one pass
# ---------------------------------------------------------------------------------------------------------------------


class VPDModelForDensePrediction(VPDDenseTaskModel):
    r"""
    Several dense tasks from ONE VAE + UNet pass: a head per task of `config.tasks` (any non-empty subset of depth,
    semantic segmentation and surface normals) on the same feature maps, each task's loss, and their weighted sum
    (`config.task_loss_weights`). The backbone (about 1.9 TFLOPs per 512x512 crop for SD 1.5) dominates the cost (a
    depth or normals head is about 0.17 TFLOPs, mostly its last full-resolution 3x3 convolution; the segmentation head
    a few GFLOPs), so a second or third task costs a fraction of a second model.

    Conditioning shared by all heads (`config.conditioning`): with segmentation among the tasks, the whole class-prompt
    table (one token per class, as the segmentation recipe), whose 32x32 and 16x16 cross-attention maps join the
    features of every head; without it, the depth recipe's scene token per image (`scene_ids`). Why the class prompts
    and no scene token next to them: the segmentation head needs one attention-map channel per class, which only the
    class tokens give, while the scene token of the depth recipe is the scene table's mean whenever the scene is
    unknown (as at inference on arbitrary images), a constant the class tokens already subsume; a scene token would also
    add a channel to every attention map that single-task segmentation checkpoints do not have. The depth and normals
    heads read the attention maps too (their first layers take the extra channels), which makes each head's input the
    same in this model and in a single-task class loaded from its folder.

    The single-task classes (`VPDModelForDepthEstimation`, `VPDModelForSegmentation`, `VPDModelForNormalEstimation`,
    and the Auto classes and pipelines built on them) load a folder saved by this class: same conditioning, same output
    as the corresponding head here. Segmentation logits come from the single pass (`semantic_inference_mode` applies to
    the single-task segmentation class only). Referring segmentation is not a task of this model: its conditioning is
    the sentence, a pass per expression.
    """

    _default_tasks = DENSE_TASKS

    def _label_argument(self, task: str) -> str:
        return {"depth": "depth_labels", "segmentation": "segmentation_labels", "normals": "normal_labels"}[task]

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        depth_labels: torch.Tensor | None = None,
        segmentation_labels: torch.Tensor | None = None,
        normal_labels: torch.Tensor | None = None,
        scene_ids: torch.Tensor | Sequence[int] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> VPDDensePredictionOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): images in [-1, 1], any size.
            pixel_mask (`torch.LongTensor` of shape `(B, H, W)`, *optional*):
                1 on image pixels, 0 on padding: images of different sizes run at their own padded sizes, padding is
                left out of every loss, and the mask is returned for post-processing.
            depth_labels (`torch.FloatTensor` of shape `(B, H, W)`, *optional*): depth in metres, 0 = no depth.
            segmentation_labels (`torch.LongTensor` of shape `(B, H, W)`, *optional*):
                class indices, `config.semantic_loss_ignore_index` = ignored.
            normal_labels (`torch.FloatTensor` of shape `(B, 3, H, W)`, *optional*):
                unit normals (see `VPDModelForNormalEstimation`), all-zero vectors = no label.
            scene_ids (`torch.LongTensor` of shape `(B,)`, *optional*):
                only for models without segmentation (scene-prompt conditioning), as in the depth model.

        Any subset of the labels may be given: a task without labels adds no loss and no gradient. Labels of a task
        the model has no head for raise a `ValueError`.

        Returns:
            [`VPDDensePredictionOutput`]: `predicted_depth` `(B, H, W)`, `logits` `(B, num_labels, ceil(H / 8),
            ceil(W / 8))`, `predicted_normals` `(B, 3, H, W)` for the model's tasks (None for the others), each
            given task's loss and `loss` = their weighted sum.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        labels = {"depth": depth_labels, "segmentation": segmentation_labels, "normals": normal_labels}
        for task, task_labels in labels.items():
            if task_labels is not None and task not in self.tasks:
                raise ValueError(
                    f"`{self._label_argument(task)}` given, but this model has no {task} head (its tasks: "
                    f"{self.tasks})."
                )
            self._check_labels(task, task_labels, pixel_values)
        predictions, backbone = self._dense_pass(pixel_values, pixel_mask, scene_ids, self.tasks)
        losses = {
            task: self._task_loss(task, predictions[task], labels[task], pixel_mask)
            for task in self.tasks
            if labels[task] is not None
        }
        loss = None
        if losses:
            loss = sum(self.config.loss_weight(task) * task_loss for task, task_loss in losses.items())
        output = VPDDensePredictionOutput(
            loss=loss,
            depth_loss=losses.get("depth"),
            segmentation_loss=losses.get("segmentation"),
            normals_loss=losses.get("normals"),
            predicted_depth=predictions.get("depth"),
            logits=predictions.get("segmentation"),
            predicted_normals=predictions.get("normals"),
            hidden_states=backbone.feature_maps if output_hidden_states else None,
            attentions=backbone.attention_maps if output_attentions else None,
            pixel_mask=pixel_mask,
        )
        return output if return_dict else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------------
# Referring segmentation
# ---------------------------------------------------------------------------------------------------------------------


class VPDModelForReferringSegmentation(VPDPreTrainedModel):
    r"""
    VPD for referring image segmentation (RefCOCO/+/g): the expression is encoded by a CLIP text encoder (frozen by
    default) into `token_length` token states, which go through the TextAdapter into the UNet's cross-attention; the
    tokens' attention maps join the 1/16 and 1/32 features, and LAVT's decoder predicts background/foreground logits at
    1/8 of the image, trained with a class-weighted cross-entropy (0.9, 1.1).

    Several expressions about one image share its VAE encoding: pass the images once and `image_indices`.
    """

    input_modalities = ("image", "text")
    _default_tasks = ("referring",)

    def __init__(self, config: VPDConfig) -> None:
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("Referring segmentation needs `config.text_config` (the CLIP text encoder's config).")
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        self.vpd = VPDModel(config)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_config))
        self.text_encoder.requires_grad_(config.train_text_encoder)
        # SDXL: the second encoder (context half + pooled `text_embeds`); None for SD 1.x/2.x.
        self.text_encoder_2 = None
        if config.text_config_2 is not None:
            self.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config.text_config_2))
            self.text_encoder_2.requires_grad_(config.train_text_encoder)
        hidden = config.referring_decoder_channels or config.unet_channels[-1] // 2
        self.decoder = VPDReferringDecoder(self.vpd.feature_channels(num_tokens=config.token_length), hidden)
        self.post_init()

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """CLIP's last hidden states `(N, token_length, D)` of `input_ids` `(N, token_length)` (padding unmasked, as the
        official model); for SDXL both encoders' penultimate states, concatenated. Without gradients unless
        `config.train_text_encoder`."""
        return self.encode_text_and_pooled(input_ids)[0]

    def encode_text_and_pooled(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`encode_text` and, for SDXL, the second encoder's pooled `text_embeds` `(N, P)` (None otherwise). The
        second encoder sees `input_ids` re-padded with `tokenizer_2`'s pad id (`config.text_config_2`)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError(f"`input_ids` must be an integer tensor (num_texts, {self.config.token_length}).")
        if input_ids.shape[1] != self.config.token_length:
            raise ValueError(
                f"`input_ids` must have exactly `token_length` = {self.config.token_length} tokens per expression "
                f"(pad/truncate with VPDProcessor), got {input_ids.shape[1]}."
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_text_encoder):
            if self.text_encoder_2 is None:
                return self.text_encoder(input_ids=input_ids).last_hidden_state, None
            config_2 = self.config.text_config_2
            input_ids_2 = repad_after_eos(input_ids, config_2["eos_token_id"], config_2["pad_token_id"])
            return sdxl_text_states(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2)

    @staticmethod
    def _resolve_image_indices(
        image_indices: torch.Tensor | None, num_texts: int, num_images: int, device
    ) -> torch.Tensor:
        if image_indices is None:
            if num_images not in (1, num_texts):
                raise ValueError(
                    f"Got {num_texts} expressions for {num_images} images: pass `image_indices` (the image of each "
                    "expression), or one image, or one expression per image."
                )
            return (
                torch.arange(num_texts, device=device)
                if num_images == num_texts
                else torch.zeros(num_texts, dtype=torch.long, device=device)
            )
        indices = torch.as_tensor(image_indices, device=device)
        if indices.shape != (num_texts,) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(
                f"`image_indices` must be {num_texts} integers (one per expression), got {tuple(indices.shape)}."
            )
        if bool(((indices < 0) | (indices >= num_images)).any()):
            raise ValueError(f"`image_indices` must lie in [0, {num_images - 1}], got {indices.tolist()}.")
        return indices.long()

    def _decode(
        self,
        latents: torch.Tensor,
        text_states: torch.Tensor,
        size: tuple[int, int],
        pooled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, VPDBackboneOutput]:
        """Logits `(N, 2, ceil(H / 8), ceil(W / 8))` of the UNet pass of one latent per expression, for images of
        `size` (H, W), and the backbone output; `pooled` `(N, P)`: SDXL's pooled text of each expression."""
        backbone = self.vpd(latents=latents, prompt_embeds=text_states, pooled_prompt_embeds=pooled)
        logits = self.decoder(backbone.feature_maps)[..., : math.ceil(size[0] / 8), : math.ceil(size[1] / 8)]
        return logits, backbone

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        image_indices: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> VPDReferringSegmentationOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`): images in [-1, 1] (each encoded once).
            input_ids (`torch.LongTensor` of shape `(N, token_length)`): the tokenized expressions.
            attention_mask (`torch.LongTensor`, *optional*): accepted for compatibility with the tokenizer's output and
                not used: the official model does not mask padding tokens.
            labels (`torch.LongTensor` of shape `(N, H, W)`, *optional*): 1 = referred object, 0 = background,
                255 = ignored.
            pixel_mask (`torch.LongTensor` of shape `(num_images, H, W)`, *optional*): 1 on image pixels, 0 on padding.
            image_indices (`torch.LongTensor` of shape `(N,)`, *optional*): the image of each expression (default: one
                image per expression, or a single image shared by all).
            latents (`torch.FloatTensor`, *optional*): `VPDModel.encode_images` output, instead of `pixel_values`.

        Returns:
            [`VPDReferringSegmentationOutput`] with `logits` `(N, 2, ceil(H / 8), ceil(W / 8))`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (pixel_values is None) == (latents is None):
            raise ValueError("Pass exactly one of `pixel_values` and `latents`.")
        if input_ids is None:
            raise ValueError("`input_ids` (the tokenized referring expressions) are required.")
        groups = None
        if pixel_values is not None:
            self.vpd._check_pixel_values(pixel_values)
            _check_pixel_mask(pixel_mask, pixel_values)
            height, width = pixel_values.shape[-2:]
            groups = size_groups(pixel_mask, self.config.pad_multiple)
            num_images, device = pixel_values.shape[0], pixel_values.device
        else:
            height, width = (
                latents.shape[-2] * self.config.vae_downsample_factor,
                latents.shape[-1] * self.config.vae_downsample_factor,
            )
            num_images, device = latents.shape[0], latents.device
        text_states, pooled = self.encode_text_and_pooled(input_ids)  # pooled: SDXL only, else None
        indices = self._resolve_image_indices(image_indices, input_ids.shape[0], num_images, device)
        if groups is None:
            if latents is None:
                latents = self.vpd.encode_images(pixel_values)
            logits, backbone = self._decode(latents[indices], text_states, (height, width), pooled)
        else:  # images of different sizes: each at its own padded size (see `vpd_hf.batching`)
            parts, rows, used_groups = [], [], []
            for group in groups:
                texts = torch.isin(indices, group.indices).nonzero().squeeze(1)
                if texts.numel() == 0:
                    continue  # an image no expression refers to is not encoded at all
                group_latents = self.vpd.encode_images(crop(pixel_values, group))
                local = (indices[texts, None] == group.indices[None]).int().argmax(dim=1)
                group_pooled = None if pooled is None else pooled[texts]
                parts.append(self._decode(group_latents[local], text_states[texts], group.size, group_pooled))
                rows.append(texts)
                used_groups.append(group)
            size = (math.ceil(height / 8), math.ceil(width / 8))
            logits = merge([part_logits for part_logits, _ in parts], rows, input_ids.shape[0], size=size)
            backbone = _merge_backbone_outputs([out for _, out in parts], rows, input_ids.shape[0])
        text_pixel_mask = None if pixel_mask is None else pixel_mask[indices]

        loss = None
        if labels is not None:
            if tuple(labels.shape) != (input_ids.shape[0], height, width):
                raise ValueError(
                    f"`labels` must have shape {(input_ids.shape[0], height, width)} (one mask per expression), "
                    f"got {tuple(labels.shape)}."
                )
            if text_pixel_mask is not None:
                labels = labels.masked_fill(text_pixel_mask == 0, 255)
            if groups is None:
                upsampled = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)
            else:  # each group upsampled on its own grid: align_corners=True samples depend on the grid's size
                upsampled = merge(
                    [
                        F.interpolate(part, size=group.size, mode="bilinear", align_corners=True)
                        for (part, _), group in zip(parts, used_groups, strict=True)
                    ],
                    rows,
                    input_ids.shape[0],
                    size=(height, width),
                )
            loss = semantic_cross_entropy(
                upsampled,
                labels,
                ignore_index=255,
                avg_non_ignore=True,
                class_weight=torch.tensor(self.config.referring_loss_weights),
            )
        output = VPDReferringSegmentationOutput(
            loss=loss,
            logits=logits,
            hidden_states=backbone.feature_maps if output_hidden_states else None,
            attentions=backbone.attention_maps if output_attentions else None,
            pixel_mask=text_pixel_mask,
        )
        return output if return_dict else output.to_tuple()


# The model class of each task name used across vpd_hf (training, conversion, prediction, cards).
TASK_MODEL_CLASSES: dict[str, type[VPDPreTrainedModel]] = {
    "depth": VPDModelForDepthEstimation,
    "segmentation": VPDModelForSegmentation,
    "referring": VPDModelForReferringSegmentation,
    "normals": VPDModelForNormalEstimation,
    "multitask": VPDModelForDensePrediction,
}


__all__ = [
    "TASK_MODEL_CLASSES",
    "VPDBackboneOutput",
    "VPDDensePredictionOutput",
    "VPDDenseTaskModel",
    "VPDDepthEstimatorOutput",
    "VPDModel",
    "VPDModelForDensePrediction",
    "VPDModelForDepthEstimation",
    "VPDModelForNormalEstimation",
    "VPDModelForReferringSegmentation",
    "VPDModelForSegmentation",
    "VPDModelForSemanticSegmentation",
    "VPDNormalEstimatorOutput",
    "VPDPreTrainedModel",
    "VPDReferringSegmentationOutput",
    "VPDSemanticSegmenterOutput",
    "VPDTextAdapter",
    "VPDVAEEncoder",
]
