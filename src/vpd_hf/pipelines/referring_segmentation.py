"""The `referring-image-segmentation` pipeline: an image and referring expressions in, one mask per expression out."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline

from .vision import load_pipeline_image, pack_images, unpack_images, use_fast_memory_format


class ReferringImageSegmentationPipeline(Pipeline):
    r"""
    Segments the object each referring expression describes.

    Example:

        >>> import vpd_hf
        >>> from transformers import pipeline
        >>> segmenter = pipeline("referring-image-segmentation", model="path/to/vpd-refcoco")
        >>> segmenter("street.jpg", text="the man in the red shirt")
        {'mask': <PIL.Image.Image mode=L>, 'score': 0.93, 'text': 'the man in the red shirt'}
        >>> segmenter("street.jpg", text=["the man in the red shirt", "the bus"])  # one result per expression
        >>> segmenter([{"image": "a.jpg", "text": "left dog"}, {"image": "b.jpg", "text": ["cat", "sofa"]}])

    Each result has the binary `mask` (PIL "L", 0/255, at the image's size), the `text`, and a `score`: the mean
    foreground probability over the mask (the largest foreground probability when the mask is empty). Several
    expressions about one image share one image encoding. Expressions longer than the model's token length are
    truncated (with a warning); empty ones are an error.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_fast_memory_format(self.model)

    def _sanitize_parameters(
        self, text: Any = None, threshold: float | None = None, timeout: float | None = None, **kwargs: Any
    ):
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)}; expected `text`, `threshold` or `timeout`.")
        preprocess = {}
        if text is not None:
            preprocess["text"] = text
        if timeout is not None:
            preprocess["timeout"] = timeout
        postprocess = {} if threshold is None else {"threshold": threshold}
        return preprocess, {}, postprocess

    def __call__(self, inputs: Any, text: Any = None, **kwargs: Any) -> Any:
        """`inputs`: an image (PIL, path or URL), a `{"image", "text"}` dict, or a list of them; `text`: an expression
        or a list of expressions, applied to every image given without its own text."""
        return super().__call__(inputs, text=text, **kwargs)

    def preprocess(self, inputs: Any, text: Any = None, timeout: float | None = None) -> dict[str, Any]:
        if isinstance(inputs, dict):
            image, text = inputs.get("image"), inputs.get("text", text)
        else:
            image = inputs
        if text is None:
            raise ValueError("`text` is required: the expression (or expressions) describing what to segment.")
        if not isinstance(text, str) and not (
            isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text)
        ):
            raise TypeError(f"`text` must be an expression (str) or a non-empty list of expressions, got {text!r}.")
        texts = [text] if isinstance(text, str) else list(text)
        image = load_pipeline_image(image, timeout)
        model_inputs = self.processor(images=image, text=texts, return_tensors="pt").to(self.dtype)
        del model_inputs["image_indices"]  # rebuilt in `_forward` for the images of the batch
        model_inputs["target_size"] = (image.height, image.width)
        model_inputs["texts"] = texts
        model_inputs["single"] = isinstance(text, str)
        return pack_images(model_inputs)

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        # One image (batch_size 1) or a collated batch of images, each with its own list of expressions (the
        # expressions' input_ids are concatenated by the collate).
        batched = not isinstance(model_inputs["single"], bool)
        meta = {key: model_inputs.pop(key) for key in ("target_size", "texts", "single")}
        if not batched:
            meta = {key: [value] for key, value in meta.items()}
        counts = torch.tensor([len(texts) for texts in meta["texts"]])
        model_inputs = unpack_images(model_inputs)
        model_inputs["image_indices"] = torch.arange(len(counts)).repeat_interleave(counts).to(self.device)
        outputs = self.model(**model_inputs)
        # One entry per image, so that the pipeline's un-batching hands each image its own expressions' outputs.
        bounds = [0, *counts.cumsum(0).tolist()]
        items = []
        for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
            item = {"logits": outputs.logits[start:stop], "pixel_mask": outputs.pixel_mask[start:stop]}
            items.append({**item, **{key: value[index] for key, value in meta.items()}})
        return {"items": items}

    def postprocess(self, model_outputs: Any, threshold: float = 0.5) -> dict[str, Any] | list[dict[str, Any]]:
        item = model_outputs["items"]
        item = item[0] if isinstance(item, list) else item  # un-batched by the pipeline, or one image
        texts = item["texts"]
        sizes = [item["target_size"]] * len(texts)
        predictions = self.processor.post_process_referring_segmentation(item, sizes, threshold=threshold)
        results = []
        for text, prediction in zip(texts, predictions, strict=True):
            mask, probabilities = prediction["mask"], prediction["probabilities"]
            score = probabilities[mask].mean() if bool(mask.any()) else probabilities.max()
            picture = Image.fromarray(mask.numpy().astype(np.uint8) * 255)
            results.append({"mask": picture, "score": float(score), "text": text})
        return results[0] if item["single"] else results


def register_referring_pipeline() -> None:
    """Registers the `referring-image-segmentation` task with transformers' pipeline registry."""
    from transformers.pipelines import PIPELINE_REGISTRY

    from ..modeling_vpd import VPDModelForReferringSegmentation

    if "referring-image-segmentation" in PIPELINE_REGISTRY.supported_tasks:
        return
    PIPELINE_REGISTRY.register_pipeline(
        "referring-image-segmentation",
        pipeline_class=ReferringImageSegmentationPipeline,
        pt_model=VPDModelForReferringSegmentation,
        type="multimodal",
    )


__all__ = ["ReferringImageSegmentationPipeline", "register_referring_pipeline"]
