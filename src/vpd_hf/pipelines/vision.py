"""transformers' `depth-estimation` and `image-segmentation` pipelines, able to batch VPD inputs of different sizes.

transformers' collate concatenates `pixel_values` as they are, so `pipeline(..., batch_size=2)` fails on two images of
different sizes. For VPD models these subclasses hand each image to the collate as a one-element list (which it keeps as
a list), pad the batch themselves with its `pixel_mask`, and let the model run each image at its own padded size
(`vpd_hf.batching`): a prediction is the same whatever the batch. For other models they behave as transformers' own
pipelines, except that a constant depth map gets a black `depth` picture instead of a division by zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_utils import load_image
from transformers.pipelines.depth_estimation import DepthEstimationPipeline
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline

from ..batching import pad_batch

_PACKED = ("pixel_values", "pixel_mask")


def load_pipeline_image(image: Any, timeout: float | None = None) -> Image.Image:
    """`load_image`, except that a float ("F") PIL image is kept as it is: `VPDImageProcessor` reads it without the
    8-bit rounding and clipping of an RGB conversion, as it does when called directly."""
    if isinstance(image, Image.Image) and image.mode == "F":
        return ImageOps.exif_transpose(image)
    return load_image(image, timeout=timeout)


def pack_images(model_inputs: dict[str, Any]) -> dict[str, Any]:
    """Per-image `pixel_values` `(1, 3, h, w)` and `pixel_mask` `(1, h, w)` as one-element lists, which transformers'
    collate gathers into lists instead of concatenating."""
    for key in _PACKED:
        model_inputs[key] = list(model_inputs[key])
    return model_inputs


def unpack_images(model_inputs: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`pack_images` for one image or a collated batch: padded `pixel_values` and `pixel_mask`."""

    def flat(value: Any) -> list[torch.Tensor]:
        return [value] if isinstance(value, torch.Tensor) else [t for item in value for t in flat(item)]

    model_inputs["pixel_values"], model_inputs["pixel_mask"] = pad_batch(
        flat(model_inputs["pixel_values"]), flat(model_inputs["pixel_mask"])
    )
    return model_inputs


def depth_picture(depth: torch.Tensor) -> Image.Image:
    """The pipeline's grey `depth` picture: depth scaled to 0-255 over its range; black for a constant map."""
    values = depth.detach().float().cpu().numpy()
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray((scaled * 255).astype(np.uint8))


def _is_vpd(pipeline: Any) -> bool:
    from ..image_processing_vpd import VPDImageProcessor

    return isinstance(pipeline.image_processor, VPDImageProcessor)


def use_fast_memory_format(model: Any) -> None:
    """`VPDPreTrainedModel.use_fast_memory_format` for VPD models (channels_last on the CPU); others are left alone."""
    from ..modeling_vpd import VPDPreTrainedModel

    if isinstance(model, VPDPreTrainedModel):
        model.use_fast_memory_format()


class VPDDepthEstimationPipeline(DepthEstimationPipeline):
    """transformers' `depth-estimation` pipeline with mixed-size batches for VPD models (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_fast_memory_format(self.model)

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        if not _is_vpd(self):
            return super().preprocess(image, timeout=timeout)
        image = load_pipeline_image(image, timeout)
        model_inputs = self.image_processor(images=image, return_tensors="pt").to(self.dtype)
        model_inputs["target_size"] = image.size[::-1]
        return pack_images(model_inputs)

    def _forward(self, model_inputs: dict[str, Any]) -> Any:
        return super()._forward(unpack_images(model_inputs) if _is_vpd(self) else model_inputs)

    def postprocess(self, model_outputs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        outputs = self.image_processor.post_process_depth_estimation(model_outputs, [model_outputs["target_size"]])
        results = [
            {"predicted_depth": o["predicted_depth"], "depth": depth_picture(o["predicted_depth"])} for o in outputs
        ]
        return results[0] if len(results) == 1 else results


class VPDImageSegmentationPipeline(ImageSegmentationPipeline):
    """transformers' `image-segmentation` pipeline with mixed-size batches for VPD models (semantic segmentation)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_fast_memory_format(self.model)

    def preprocess(self, image: Any, subtask: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        if not _is_vpd(self):
            return super().preprocess(image, subtask=subtask, timeout=timeout)
        image = load_pipeline_image(image, timeout)
        model_inputs = self.image_processor(images=[image], return_tensors="pt").to(self.dtype)
        model_inputs["target_size"] = [(image.height, image.width)]
        return pack_images(model_inputs)

    def _forward(self, model_inputs: dict[str, Any]) -> Any:
        return super()._forward(unpack_images(model_inputs) if _is_vpd(self) else model_inputs)


def register_vision_pipelines() -> None:
    """Makes these classes the implementations of the `depth-estimation` and `image-segmentation` tasks, keeping each
    task's default model and model classes."""
    from transformers.pipelines import PIPELINE_REGISTRY

    for task, pipeline_class in (
        ("depth-estimation", VPDDepthEstimationPipeline),
        ("image-segmentation", VPDImageSegmentationPipeline),
    ):
        entry = PIPELINE_REGISTRY.supported_tasks[task]
        # Replacing only "impl" keeps the task's default model and model classes (and skips the registry's
        # "overwriting" warning, which would be printed on every `import vpd_hf`).
        PIPELINE_REGISTRY.supported_tasks[task] = {**entry, "impl": pipeline_class}


__all__ = [
    "VPDDepthEstimationPipeline",
    "VPDImageSegmentationPipeline",
    "depth_picture",
    "load_pipeline_image",
    "register_vision_pipelines",
]
