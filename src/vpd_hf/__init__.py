"""vpd_hf: VPD (Visual Perception with a pre-trained Diffusion model, ICCV 2023) on Hugging Face transformers and
diffusers.

Importing the package registers VPD with transformers' Auto classes, so that `AutoModelForDepthEstimation`,
`AutoImageProcessor` and `pipeline("depth-estimation", model=...)` load VPD checkpoints without `trust_remote_code`.

The package imports lazily (PEP 562, as transformers does): `import vpd_hf` loads neither torch nor diffusers, and a
name such as `vpd_hf.VPDModelForDepthEstimation` imports its submodule on first use. The registration runs as soon as
transformers' Auto machinery or a VPD class is imported (see `vpd_hf._registration`), which is before any Auto class
or pipeline can look VPD up.
"""

from __future__ import annotations

import importlib
import logging as _logging
from typing import TYPE_CHECKING, Any

from . import _registration

__version__ = "0.1.0.dev0"

# Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["SD15_UNET_CONFIG", "SD15_VAE_CONFIG", "VPDConfig"], "configuration_vpd"),
    "VPDImageProcessor": "image_processing_vpd",
    **dict.fromkeys(["sliding_window_logits", "test_time_logits"], "inference"),
    **dict.fromkeys(
        [
            "DepthMetric",
            "DepthMetricAccumulator",
            "MeanIoU",
            "MeanIoUAccumulator",
            "ReferringMetricAccumulator",
            "ReferringSegmentationMetric",
            "compute_depth_metrics",
            "compute_mean_iou",
            "compute_referring_metrics",
        ],
        "metrics",
    ),
    **dict.fromkeys(
        [
            "TASK_MODEL_CLASSES",
            "VPDBackboneOutput",
            "VPDDensePredictionOutput",
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
        ],
        "modeling_vpd",
    ),
    **dict.fromkeys(
        [
            "ReferringImageSegmentationPipeline",
            "VPDDepthEstimationPipeline",
            "VPDImageSegmentationPipeline",
            "register_pipelines",
            "register_referring_pipeline",
        ],
        "pipelines",
    ),
    **dict.fromkeys(["BackboneLayout", "backbone_layout"], "backbones"),
    "VPDProcessor": "processing_vpd",
    **dict.fromkeys(
        ["ADE20K_CLASS_NAMES", "CLIP_IMAGENET_TEMPLATES", "NYU_SCENE_NAMES", "encode_prompts", "encode_sdxl_prompts"],
        "prompts",
    ),
    **dict.fromkeys(
        [
            "colorize_depth",
            "depth_to_uint16_png",
            "overlay_mask",
            "overlay_segmentation",
            "segmentation_palette",
            "visualize_normals",
        ],
        "visualization",
    ),
}
# Submodules reachable as attributes (`vpd_hf.data.loading`, ...) without importing them first, as before.
_SUBMODULES = frozenset(
    {
        "attention",
        "backbones",
        "batching",
        "cli",
        "configuration_vpd",
        "conversion",
        "data",
        "demo",
        "examples",
        "heads",
        "hub",
        "image_processing_vpd",
        "inference",
        "losses",
        "metrics",
        "modeling_vpd",
        "pipelines",
        "prediction",
        "processing_vpd",
        "prompts",
        "testing_utils",
        "training",
        "visualization",
        "weights_loading",
    }
)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        _registration.ensure_registered()  # a VPD class in hand: the Auto classes know it too
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:  # what type checkers and IDEs see: the eager imports
    from .configuration_vpd import SD15_UNET_CONFIG, SD15_VAE_CONFIG, VPDConfig
    from .image_processing_vpd import VPDImageProcessor
    from .inference import sliding_window_logits, test_time_logits
    from .metrics import (
        DepthMetric,
        DepthMetricAccumulator,
        MeanIoU,
        MeanIoUAccumulator,
        ReferringMetricAccumulator,
        ReferringSegmentationMetric,
        compute_depth_metrics,
        compute_mean_iou,
        compute_referring_metrics,
    )
    from .modeling_vpd import (
        TASK_MODEL_CLASSES,
        VPDBackboneOutput,
        VPDDensePredictionOutput,
        VPDDepthEstimatorOutput,
        VPDModel,
        VPDModelForDensePrediction,
        VPDModelForDepthEstimation,
        VPDModelForNormalEstimation,
        VPDModelForReferringSegmentation,
        VPDModelForSegmentation,
        VPDModelForSemanticSegmentation,
        VPDNormalEstimatorOutput,
        VPDPreTrainedModel,
        VPDReferringSegmentationOutput,
        VPDSemanticSegmenterOutput,
    )
    from .pipelines import ReferringImageSegmentationPipeline
    from .processing_vpd import VPDProcessor
    from .prompts import ADE20K_CLASS_NAMES, CLIP_IMAGENET_TEMPLATES, NYU_SCENE_NAMES, encode_prompts
    from .visualization import (
        colorize_depth,
        depth_to_uint16_png,
        overlay_mask,
        overlay_segmentation,
        segmentation_palette,
        visualize_normals,
    )


class _RegisteredVPDModelFilter(_logging.Filter):
    """transformers' built-in pipelines check the model class against their static name tables only and log an
    ERROR ("not supported") for classes registered at run time, although they then work; drop that one message."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("The model 'VPDModel") and "is not supported for" in message)


# Both cheap: a logger object (transformers' own `logging.getLogger` returns the same one) and a meta-path finder.
_logging.getLogger("transformers.pipelines.base").addFilter(_RegisteredVPDModelFilter())
_registration.install()

__all__ = [
    "ADE20K_CLASS_NAMES",
    "CLIP_IMAGENET_TEMPLATES",
    "NYU_SCENE_NAMES",
    "SD15_UNET_CONFIG",
    "SD15_VAE_CONFIG",
    "TASK_MODEL_CLASSES",
    "BackboneLayout",
    "DepthMetric",
    "DepthMetricAccumulator",
    "MeanIoU",
    "MeanIoUAccumulator",
    "ReferringImageSegmentationPipeline",
    "ReferringMetricAccumulator",
    "ReferringSegmentationMetric",
    "VPDBackboneOutput",
    "VPDConfig",
    "VPDDensePredictionOutput",
    "VPDDepthEstimationPipeline",
    "VPDDepthEstimatorOutput",
    "VPDImageProcessor",
    "VPDImageSegmentationPipeline",
    "VPDModel",
    "VPDModelForDensePrediction",
    "VPDModelForDepthEstimation",
    "VPDModelForNormalEstimation",
    "VPDModelForReferringSegmentation",
    "VPDModelForSegmentation",
    "VPDModelForSemanticSegmentation",
    "VPDNormalEstimatorOutput",
    "VPDPreTrainedModel",
    "VPDProcessor",
    "VPDReferringSegmentationOutput",
    "VPDSemanticSegmenterOutput",
    "backbone_layout",
    "colorize_depth",
    "compute_depth_metrics",
    "compute_mean_iou",
    "compute_referring_metrics",
    "depth_to_uint16_png",
    "encode_prompts",
    "encode_sdxl_prompts",
    "overlay_mask",
    "overlay_segmentation",
    "register_pipelines",
    "segmentation_palette",
    "sliding_window_logits",
    "test_time_logits",
    "visualize_normals",
]
