"""Processor for referring segmentation: VPD's image processor and a CLIP tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import ProcessorMixin
from transformers.image_processing_utils import BatchFeature
from transformers.utils import logging

logger = logging.get_logger(__name__)


class VPDProcessor(ProcessorMixin):
    r"""
    Turns images, referring expressions and (for training/evaluation) their masks into `VPDModelForReferringSegmentation`
    inputs, and its outputs into masks.

    Expressions are tokenized to exactly `token_length` (= `tokenizer.model_max_length`) tokens: padded with the end
    token, and **truncated** when longer (the model was trained at that length; a warning names the expressions cut).
    Several expressions can refer to one image: the image is processed (and later encoded) once, and `image_indices`
    tells the model which image each expression belongs to.

    Args:
        image_processor ([`VPDImageProcessor`]): see `VPDImageProcessor.for_task("referring")` (plain 512x512 resize).
        tokenizer ([`CLIPTokenizer`]): the tokenizer of the model's CLIP text encoder.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def token_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @staticmethod
    def _texts_per_image(text: Any, num_images: int | None) -> tuple[list[str], list[int] | None]:
        """Flattens `text` to a list of expressions and, with images, the image index of each."""
        if isinstance(text, str):
            groups = [[text]]
        elif isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text):
            groups = [list(text)] if num_images in (None, 1) or num_images != len(text) else [[t] for t in text]
        elif (
            isinstance(text, Sequence)
            and text
            and all(isinstance(t, Sequence) and not isinstance(t, str) for t in text)
        ):
            groups = [list(group) for group in text]
        elif isinstance(text, Sequence) and text:
            raise ValueError(
                "`text` must be an expression, a list of expressions, or one list of expressions per image, not a "
                f"mix of strings and lists; got {text!r}."
            )
        elif isinstance(text, Sequence):
            raise ValueError("`text` is empty: pass at least one expression.")
        else:
            raise TypeError(
                "`text` must be an expression (str), a list of expressions, or one list of expressions per image; "
                f"got {type(text).__name__}: {text!r}."
            )
        empty = [index for index, group in enumerate(groups) if not group]
        if empty:
            raise ValueError(
                f"`text[{empty[0]}]` is an empty list of expressions: every image needs at least one expression."
            )
        if num_images is not None and len(groups) not in (1, num_images):
            raise ValueError(f"Got expressions for {len(groups)} images but {num_images} images.")
        if num_images is not None and len(groups) == 1 and num_images > 1:
            raise ValueError(
                f"Got {num_images} images and {len(groups[0])} expressions: give one expression per image or one list "
                "of expressions per image."
            )
        texts, indices = [], []
        for image_index, group in enumerate(groups):
            for expression in group:
                if not isinstance(expression, str) or not expression.strip():
                    raise ValueError(f"`text` contains an empty or non-string expression: {expression!r}.")
                texts.append(expression)
                indices.append(image_index)
        return texts, (indices if num_images is not None else None)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        masks: Any = None,
        return_tensors: str | None = "pt",
        **images_kwargs: Any,
    ) -> BatchFeature:
        r"""
        Args:
            images: one image or a list (any input `VPDImageProcessor` takes).
            text: an expression, a list of expressions (about the single image, or one per image), or one list of
                expressions per image.
            masks: optional binary masks of the referred objects, one per expression (in the order of the flattened
                `text`), each of its image's size; non-zero = object. Returned as `labels` (0/1, 255 on padding).
            return_tensors: `"pt"` (default), `"np"` or None.
            images_kwargs: overrides for the image processor (`size`, `do_pad`, ...).

        Returns:
            `BatchFeature` with `pixel_values`, `pixel_mask` (images), `input_ids`, `attention_mask` (text),
            `image_indices` (both), and `labels` (masks).
        """
        if images is None and text is None:
            raise ValueError("Pass `images`, `text`, or both.")
        num_images = None
        if images is not None:
            # the image processor's own reading of `images` (one image, a list, a batch array): one count for both
            images = self.image_processor._prepare_images_structure(images)
            num_images = len(images)
        data: dict[str, Any] = {}
        texts, indices = ([], None) if text is None else self._texts_per_image(text, num_images)
        if masks is not None:
            if images is None or text is None:
                raise ValueError("`masks` need both `images` and `text` (one mask per expression).")
            mask_list = masks if isinstance(masks, (list, tuple)) else [masks]
            if len(mask_list) != len(texts):
                raise ValueError(f"Got {len(mask_list)} `masks` for {len(texts)} expressions.")
            binary = [self._binary_mask(mask, i) for i, mask in enumerate(mask_list)]
            data.update(
                self.image_processor(
                    images,
                    segmentation_maps=binary,
                    segmentation_map_indices=indices,
                    do_reduce_labels=False,
                    return_tensors=return_tensors,
                    **images_kwargs,
                )
            )
        elif images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **images_kwargs))
        if text is not None:
            self._warn_truncation(texts)
            tokens = self.tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                max_length=self.token_length,
                return_tensors=return_tensors,
            )
            data["input_ids"], data["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
            if indices is not None:
                data["image_indices"] = torch.tensor(indices) if return_tensors == "pt" else np.asarray(indices)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _binary_mask(mask: Any, index: int) -> np.ndarray:
        if isinstance(mask, Image.Image):
            mask = np.asarray(mask)
        elif isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"`masks[{index}]` must be a 2-D (H, W) mask, got shape {mask.shape}.")
        return (mask != 0).astype(np.uint8)

    def _warn_truncation(self, texts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]
        cut = [t for t, n in zip(texts, lengths, strict=True) if n > self.token_length]
        if cut:
            logger.warning(
                f"{len(cut)} expression(s) are longer than {self.token_length} tokens and were truncated, "
                f"e.g. {cut[0]!r}."
            )

    def post_process_referring_segmentation(
        self, outputs: Any, target_sizes: Any = None, threshold: float = 0.5
    ) -> list[dict[str, torch.Tensor]]:
        """Masks at `target_sizes`; see `VPDImageProcessor.post_process_referring_segmentation`."""
        return self.image_processor.post_process_referring_segmentation(outputs, target_sizes, threshold=threshold)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        r"""
        Loads a saved processor. `AutoProcessor` sends every VPD folder here (they share `model_type` "vpd"): a depth
        or segmentation folder holds an image processor and no tokenizer, and then its `VPDImageProcessor` is
        returned, as `AutoProcessor` returns the image processor of a DPT or SegFormer folder.
        """
        from transformers.utils import cached_file

        hub_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs
        }
        tokenizer_config = cached_file(
            pretrained_model_name_or_path,
            "tokenizer_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        if tokenizer_config is None:
            from .image_processing_vpd import VPDImageProcessor

            return VPDImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_stable_diffusion(
        cls, pretrained_model_name_or_path: str, token_length: int = 40, **hub_kwargs: Any
    ) -> VPDProcessor:
        """The referring processor of a Stable Diffusion checkpoint: its `tokenizer/` at `token_length` tokens and the
        official 512x512 image pre-processing."""
        from transformers import CLIPTokenizer

        from .image_processing_vpd import VPDImageProcessor

        tokenizer = CLIPTokenizer.from_pretrained(
            pretrained_model_name_or_path, subfolder="tokenizer", model_max_length=token_length, **hub_kwargs
        )
        return cls(image_processor=VPDImageProcessor.for_task("referring"), tokenizer=tokenizer)


__all__ = ["VPDProcessor"]
