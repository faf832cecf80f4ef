"""vpd_hf: VPD (Visual Perception with a pre-trained Diffusion model, ICCV 2023) on Hugging Face transformers and
diffusers.

Importing the package registers VPD with transformers' Auto classes, so that `AutoModelForDepthEstimation`,
`AutoImageProcessor` and `pipeline("depth-estimation", model=...)` load VPD checkpoints without `trust_remote_code`.
"""

from __future__ import annotations

import logging as _logging

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForSemanticSegmentation,
    AutoProcessor,
)
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

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
    VPDDepthEstimatorOutput,
    VPDModel,
    VPDModelForDepthEstimation,
    VPDModelForReferringSegmentation,
    VPDModelForSegmentation,
    VPDModelForSemanticSegmentation,
    VPDPreTrainedModel,
    VPDReferringSegmentationOutput,
    VPDSemanticSegmenterOutput,
)
from .pipelines import ReferringImageSegmentationPipeline, register_pipelines
from .processing_vpd import VPDProcessor
from .prompts import ADE20K_CLASS_NAMES, CLIP_IMAGENET_TEMPLATES, NYU_SCENE_NAMES, encode_prompts
from .visualization import (
    colorize_depth,
    depth_to_uint16_png,
    overlay_mask,
    overlay_segmentation,
    segmentation_palette,
)

__version__ = "0.1.0.dev0"

AutoConfig.register(VPDConfig.model_type, VPDConfig, exist_ok=True)
AutoModel.register(VPDConfig, VPDModel, exist_ok=True)
AutoModelForDepthEstimation.register(VPDConfig, VPDModelForDepthEstimation, exist_ok=True)
AutoModelForSemanticSegmentation.register(VPDConfig, VPDModelForSegmentation, exist_ok=True)
AutoProcessor.register(VPDConfig, VPDProcessor, exist_ok=True)
AutoImageProcessor.register(VPDConfig, image_processor_classes={"pil": VPDImageProcessor}, exist_ok=True)
# VPD has no video processor. Declaring that (an empty mapping) matters: transformers' pipelines probe for one, derive
# a remote-code reference from the image processor's `auto_map`, and without a local entry ask the user whether to
# trust remote code that does not exist. (`AutoVideoProcessor.register` itself needs torchvision, hence the mapping.)
VIDEO_PROCESSOR_MAPPING.register(VPDConfig, {}, exist_ok=True)

# Saved checkpoints also carry `auto_map` and the code, for users who load them with `trust_remote_code=True`.
VPDConfig.register_for_auto_class()
VPDModel.register_for_auto_class("AutoModel")
VPDModelForDepthEstimation.register_for_auto_class("AutoModelForDepthEstimation")
VPDModelForSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
# transformers has no Auto class for referring segmentation; remote-code users load it through AutoModel.
VPDModelForReferringSegmentation.register_for_auto_class("AutoModel")
VPDProcessor.register_for_auto_class()
VPDImageProcessor.register_for_auto_class()


class _RegisteredVPDModelFilter(_logging.Filter):
    """transformers' built-in pipelines check the model class against their static name tables only and log an
    ERROR ("not supported") for classes registered at run time, although they then work; drop that one message."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("The model 'VPDModel") and "is not supported for" in message)


_logging.getLogger("transformers.pipelines.base").addFilter(_RegisteredVPDModelFilter())
register_pipelines()

__all__ = [
    "ADE20K_CLASS_NAMES",
    "CLIP_IMAGENET_TEMPLATES",
    "NYU_SCENE_NAMES",
    "SD15_UNET_CONFIG",
    "SD15_VAE_CONFIG",
    "TASK_MODEL_CLASSES",
    "DepthMetric",
    "DepthMetricAccumulator",
    "MeanIoU",
    "MeanIoUAccumulator",
    "ReferringImageSegmentationPipeline",
    "ReferringMetricAccumulator",
    "ReferringSegmentationMetric",
    "VPDBackboneOutput",
    "VPDConfig",
    "VPDDepthEstimatorOutput",
    "VPDImageProcessor",
    "VPDModel",
    "VPDModelForDepthEstimation",
    "VPDModelForReferringSegmentation",
    "VPDModelForSegmentation",
    "VPDModelForSemanticSegmentation",
    "VPDPreTrainedModel",
    "VPDProcessor",
    "VPDReferringSegmentationOutput",
    "VPDSemanticSegmenterOutput",
    "colorize_depth",
    "compute_depth_metrics",
    "compute_mean_iou",
    "compute_referring_metrics",
    "depth_to_uint16_png",
    "encode_prompts",
    "overlay_mask",
    "overlay_segmentation",
    "segmentation_palette",
    "sliding_window_logits",
    "test_time_logits",
]
