"""Image processor for VPD (PIL/NumPy backend: no torchvision needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, infer_channel_dimension_format
from transformers.processing_utils import ImagesKwargs, Unpack

from .visualization import colorize_depth, depth_to_uint16_png, overlay_segmentation, visualize_normals

IGNORE_INDEX = 255  # label of ignored pixels: padding, reduced "other" class


class VPDImageProcessorKwargs(ImagesKwargs, total=False):
    """
    size_divisor (`int`, *optional*, defaults to 64):
        With `do_pad`, images are zero-padded at the bottom and right to a common size that is a multiple of this value
        (64 keeps every UNet level of Stable Diffusion integer-sized).
    do_reduce_labels (`bool`, *optional*, defaults to `False`):
        For segmentation maps whose 0 means "other" (ADE20K): 0 becomes 255 (ignored) and every other label k
        becomes k - 1.
    """

    size_divisor: int
    do_reduce_labels: bool


def _resize_plane(plane: np.ndarray, size: tuple[int, int], resample: PILImageResampling) -> np.ndarray:
    """Resizes one float32 `(H, W)` plane with PIL (mode "F": no 8-bit rounding, antialiased when shrinking)."""
    height, width = size
    return np.asarray(Image.fromarray(plane.astype(np.float32)).resize((width, height), resample=resample))


def _target_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    if size.height and size.width:
        return int(size.height), int(size.width)
    if size.max_height and size.max_width:
        scale = min(size.max_height / height, size.max_width / width)
    elif size.shortest_edge:
        scale = size.shortest_edge / min(height, width)
        if size.longest_edge:
            scale = min(scale, size.longest_edge / max(height, width))
    elif size.longest_edge:
        scale = size.longest_edge / max(height, width)
    else:
        raise ValueError(
            "`size` must have 'height' and 'width', 'shortest_edge' (optionally with 'longest_edge'), 'longest_edge', "
            f"or 'max_height' and 'max_width'; got {dict(size)}."
        )
    return max(1, round(height * scale)), max(1, round(width * scale))


def _pixel_mask_of(outputs: Any) -> torch.Tensor | None:
    """The `pixel_mask` a model returned with its output (a ModelOutput, a dict or any object), if any."""
    return outputs.get("pixel_mask") if hasattr(outputs, "get") else getattr(outputs, "pixel_mask", None)


class VPDImageProcessor(PilBackend):
    r"""
    Prepares images for VPD and turns its outputs back into per-image results.

    Pre-processing: conversion to RGB (any PIL mode; NumPy/torch arrays `(H, W)`, `(H, W, C)` or `(C, H, W)`, `uint8`
    in [0, 255] or float in [0, 1]), resizing (default: shorter side 480 and longer side at most 640, the NYUv2
    framing), normalisation to [-1, 1] (Stable Diffusion's input range), and zero-padding at the bottom/right to a
    common size that is a multiple of `size_divisor` (64). Returns `pixel_values` `(B, 3, H, W)` and, with padding,
    `pixel_mask` `(B, H, W)` (1 = image, 0 = padding) which the model passes through to post-processing.

    Post-processing: :meth:`post_process_depth_estimation` removes each image's padding and resizes to the requested
    sizes (the contract of transformers' `depth-estimation` pipeline); :meth:`visualize_depth` and
    :meth:`export_depth_to_16bit_png` make pictures.
    """

    valid_kwargs = VPDImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_mask"]

    do_convert_rgb = True
    do_resize = True
    size = {"shortest_edge": 480, "longest_edge": 640}
    default_to_square = False
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_pad = True
    size_divisor = 64
    do_reduce_labels = False

    def __init__(self, **kwargs: Unpack[VPDImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)

    # The official pre-processing of each task's data.
    TASK_PRESETS: dict[str, dict[str, Any]] = {
        # NYUv2 frames are 480x640; any photo is brought to that framing.
        "depth": {"size": {"shortest_edge": 480, "longest_edge": 640}},
        # ADE20K test resize: img_scale (2048, 512) with keep_ratio; annotations use 0 for "other".
        "segmentation": {"size": {"shortest_edge": 512, "longest_edge": 2048}, "do_reduce_labels": True},
        # RefCOCO (LAVT protocol): a plain 512x512 resize, aspect ratio not kept.
        "referring": {"size": {"height": 512, "width": 512}},
    }

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> VPDImageProcessor:
        """The processor with the official pre-processing of `task` (see `TASK_PRESETS`), plus `overrides`."""
        if task not in cls.TASK_PRESETS:
            raise ValueError(f"`task` must be one of {sorted(cls.TASK_PRESETS)}, got {task!r}.")
        return cls(**{**cls.TASK_PRESETS[task], **overrides})

    # -- pre-processing -------------------------------------------------------------------------------------------------

    def preprocess(
        self, images: Any, segmentation_maps: Any = None, segmentation_map_indices: Any = None, **kwargs: Any
    ) -> BatchFeature:
        r"""
        Args:
            images: one image or a list (PIL, NumPy or torch; see the class docstring).
            segmentation_maps: optional label maps (PIL "L"/"P"/"I" images or integer arrays `(H, W)`), one per image
                and of its size; they are resized with nearest-neighbour sampling to the image's processed size,
                padded with 255 and returned as `labels` `(N, H, W)` int64.
            segmentation_map_indices: optional image index of each map, when there are several maps per image (e.g.
                one mask per referring expression); default: map `i` belongs to image `i`.
            kwargs: per-call overrides of the processor's attributes (`size`, `do_pad`, `do_reduce_labels`, ...).
        """
        return super().preprocess(images, segmentation_maps, segmentation_map_indices, **kwargs)

    def _preprocess_image_like_inputs(
        self, images: Any, segmentation_maps: Any = None, segmentation_map_indices: Any = None, **kwargs: Any
    ) -> BatchFeature:
        prepared = self._prepare_image_like_inputs(images, **kwargs)
        batch = self._preprocess(prepared, **kwargs)
        if segmentation_maps is not None:
            maps = segmentation_maps if isinstance(segmentation_maps, (list, tuple)) else [segmentation_maps]
            if segmentation_map_indices is None:
                if len(maps) != len(prepared):
                    raise ValueError(f"Got {len(maps)} `segmentation_maps` for {len(prepared)} images.")
                segmentation_map_indices = range(len(maps))
            indices = [int(i) for i in segmentation_map_indices]
            if len(indices) != len(maps) or any(not 0 <= i < len(prepared) for i in indices):
                raise ValueError(
                    f"`segmentation_map_indices` must give an image index in [0, {len(prepared) - 1}] for each of the "
                    f"{len(maps)} maps, got {indices}."
                )
            labels = [
                self._process_label_map(label_map, prepared[image].shape[-2:], index, **kwargs)
                for index, (label_map, image) in enumerate(zip(maps, indices, strict=True))
            ]
            if kwargs.get("do_pad"):
                height, width = batch["pixel_values"][0].shape[-2:]
                labels = [
                    np.pad(
                        label, ((0, height - label.shape[0]), (0, width - label.shape[1])), constant_values=IGNORE_INDEX
                    )
                    for label in labels
                ]
            batch["labels"] = labels
            batch.convert_to_tensors(tensor_type=kwargs.get("return_tensors"))
        return batch

    def _process_label_map(
        self,
        label_map: Any,
        image_size: tuple[int, int],
        index: int,
        do_resize: bool = True,
        size: SizeDict | None = None,
        do_reduce_labels: bool = False,
        **kwargs: Any,
    ) -> np.ndarray:
        """One label map -> int64 `(H, W)` at the processed size of its image (before padding)."""
        if isinstance(label_map, Image.Image):
            label_map = np.asarray(label_map)
        elif isinstance(label_map, torch.Tensor):
            label_map = label_map.detach().cpu().numpy()
        if not isinstance(label_map, np.ndarray):
            raise TypeError(
                f"`segmentation_maps[{index}]` must be a PIL image, NumPy array or torch tensor, "
                f"got {type(label_map).__name__}."
            )
        if label_map.ndim == 3 and 1 in (label_map.shape[0], label_map.shape[-1]):
            label_map = label_map.reshape(label_map.shape[-2:] if label_map.shape[0] == 1 else label_map.shape[:2])
        if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
            raise ValueError(
                f"`segmentation_maps[{index}]` must be an integer (H, W) label map, got dtype {label_map.dtype} and "
                f"shape {label_map.shape}."
            )
        if tuple(label_map.shape) != tuple(image_size):
            raise ValueError(
                f"`segmentation_maps[{index}]` has size {tuple(label_map.shape)} but its image has {tuple(image_size)}."
            )
        if label_map.min() < 0:
            raise ValueError(f"`segmentation_maps[{index}]` has negative labels.")
        label_map = label_map.astype(np.int64)
        if do_reduce_labels:
            label_map = np.where(label_map == 0, IGNORE_INDEX, label_map - 1)
            label_map[label_map == IGNORE_INDEX - 1] = IGNORE_INDEX
        if do_resize:
            new_size = _target_size(label_map.shape[0], label_map.shape[1], size)
            if new_size != label_map.shape:
                resized = Image.fromarray(label_map.astype(np.int32)).resize(new_size[::-1], Image.Resampling.NEAREST)
                label_map = np.asarray(resized).astype(np.int64)
        return label_map

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list:
        """A flat list of images from one image, a list (or list of lists) of images, or a `(B, ...)` batch array.
        Unlike transformers' default, `(H, W)` grayscale arrays are single images, as documented."""
        flat: list[Any] = []
        expected = "`images` must be one image or a list of images (PIL, or arrays/tensors of shape (H, W), (H, W, C) or (C, H, W))"

        def add(item: Any, depth: int) -> None:
            if isinstance(item, str):  # a local path or URL
                try:
                    flat.append(self.fetch_images(item))
                except (ValueError, OSError) as error:
                    raise ValueError(f"{expected}; {error}") from error
            elif isinstance(item, Image.Image) or (
                isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3)
            ):
                flat.append(item)
            elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
                flat.extend(item)
            elif isinstance(item, (list, tuple)) and depth < 2:
                for element in item:
                    add(element, depth + 1)
            elif isinstance(item, (np.ndarray, torch.Tensor)):
                raise ValueError(f"{expected}; got an array of shape {tuple(item.shape)}.")
            else:
                raise TypeError(f"{expected}; got {type(item).__name__}.")

        add(images, 0)
        if not flat:
            raise ValueError("`images` is empty: pass at least one image.")
        return flat

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """One input image -> `(3, H, W)` array, `uint8` (0-255) or `float32` (0-1)."""
        if isinstance(image, Image.Image):
            return self._pil_to_array(image)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"`images` must be PIL images, NumPy arrays or torch tensors (or lists of them), got {type(image).__name__}."
            )
        if image.dtype == np.bool_ or not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
            raise TypeError(f"Image arrays must be uint8 (0-255) or float (0-1), got dtype {image.dtype}.")
        if image.ndim == 2:
            image = image[None]
            input_data_format = ChannelDimension.FIRST
        if image.ndim != 3:
            raise ValueError(f"Image arrays must be (H, W), (H, W, C) or (C, H, W), got shape {image.shape}.")
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        if ChannelDimension(input_data_format) == ChannelDimension.LAST:
            image = np.moveaxis(image, -1, 0)
        channels = image.shape[0]
        if channels == 1:
            image = np.repeat(image, 3, axis=0)
        elif channels == 4:
            image = image[:3]  # RGBA: alpha dropped
        elif channels != 3:
            raise ValueError(f"Image arrays must have 1, 3 or 4 channels, got {channels} (shape {image.shape}).")
        return image.astype(np.float32) if image.dtype != np.uint8 else image

    @staticmethod
    def _pil_to_array(image: Image.Image) -> np.ndarray:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale (e.g. a PNG): keep the precision instead of PIL's 8-bit clipping conversion.
            plane = np.asarray(image, dtype=np.float32) / 65535.0
            return np.repeat(np.clip(plane, 0.0, 1.0)[None], 3, axis=0)
        if image.mode == "F":
            # PIL's scale for float images is 0-255 (its own conversions and transformers' `load_image` read them so):
            # kept as float, without the 8-bit rounding of a conversion, and out-of-range values are an error.
            plane = np.asarray(image, dtype=np.float32)
            if plane.size and not (np.isfinite(plane).all() and plane.min() >= 0.0 and plane.max() <= 255.0):
                raise ValueError(
                    '`images`: a float (mode "F") PIL image is read on PIL\'s 0-255 scale; got values in '
                    f"[{plane.min():.4g}, {plane.max():.4g}]. Pass a float array in [0, 1] for other data."
                )
            return np.repeat(plane[None] / 255.0, 3, axis=0)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float] | None,
        image_std: float | Sequence[float] | None,
        do_pad: bool | None,
        return_tensors: str | None,
        size_divisor: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        size_divisor = self.size_divisor if size_divisor is None else size_divisor
        if do_pad and (not isinstance(size_divisor, int) or size_divisor < 1):
            raise ValueError(f"`size_divisor` must be a positive integer, got {size_divisor!r}.")
        resample = PILImageResampling.BILINEAR if resample is None else resample
        processed = []
        for index, image in enumerate(images):
            if image.shape[1] == 0 or image.shape[2] == 0:
                raise ValueError(
                    f"`images[{index}]` is empty ({image.shape[1]}x{image.shape[2]} pixels, height x width): every "
                    "image needs at least one pixel."
                )
            if image.dtype == np.uint8:
                image = image.astype(np.float32) * (rescale_factor if do_rescale else 1.0)
            elif not np.isfinite(image).all():
                raise ValueError("Float images must hold values in [0, 1]; got NaN or infinite values.")
            elif image.min() < 0.0 or image.max() > 1.0:
                raise ValueError(
                    "Float images must hold values in [0, 1] (pass uint8 arrays for 0-255 data); got range "
                    f"[{image.min():.4g}, {image.max():.4g}]."
                )
            if do_resize:
                new_size = _target_size(image.shape[1], image.shape[2], size)
                if new_size != tuple(image.shape[1:]):
                    image = np.stack([_resize_plane(plane, new_size, resample) for plane in image])
            if do_normalize:
                mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
                std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
                image = (image - mean) / std
            processed.append(image.astype(np.float32))

        data: dict[str, Any] = {}
        if do_pad:
            height = math.ceil(max(image.shape[1] for image in processed) / size_divisor) * size_divisor
            width = math.ceil(max(image.shape[2] for image in processed) / size_divisor) * size_divisor
            padded, masks = [], []
            for image in processed:
                canvas = np.zeros((image.shape[0], height, width), dtype=np.float32)
                canvas[:, : image.shape[1], : image.shape[2]] = image
                mask = np.zeros((height, width), dtype=np.int64)
                mask[: image.shape[1], : image.shape[2]] = 1
                padded.append(canvas)
                masks.append(mask)
            data["pixel_values"], data["pixel_mask"] = padded, masks
        else:
            shapes = {image.shape for image in processed}
            if len(shapes) > 1 and return_tensors is not None:
                raise ValueError(
                    f"Images of different sizes {sorted(s[1:] for s in shapes)} cannot be batched without padding; "
                    "set `do_pad=True` or resize them to one `size`."
                )
            data["pixel_values"] = processed
        return BatchFeature(data=data, tensor_type=return_tensors)

    # -- post-processing ------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_target_sizes(target_sizes: Any, batch_size: int) -> list[tuple[int, int] | None]:
        if target_sizes is None:
            return [None] * batch_size
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        sizes = list(target_sizes)
        if len(sizes) != batch_size:
            raise ValueError(f"`target_sizes` has {len(sizes)} entries for a batch of {batch_size} predictions.")
        checked = []
        for size in sizes:
            if size is None:
                checked.append(None)
                continue
            pair = tuple(size)
            if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
                raise ValueError(
                    f"Each entry of `target_sizes` must be a (height, width) pair of positive ints, got {size!r}."
                )
            checked.append((int(pair[0]), int(pair[1])))
        return checked

    @staticmethod
    def _unpad(prediction: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return prediction
        height = int(mask.any(dim=1).sum())
        width = int(mask.any(dim=0).sum())
        return prediction[..., :height, :width]

    def _own_grid(self, pixel_mask: torch.Tensor) -> tuple[int, int]:
        """The input grid `(H, W)` the image of `pixel_mask` `(H_batch, W_batch)` has when processed alone: its size
        padded to `size_divisor` (never beyond the batch grid)."""
        height = int(pixel_mask.any(dim=1).sum())
        width = int(pixel_mask.any(dim=0).sum())
        divisor = self.size_divisor if isinstance(self.size_divisor, int) and self.size_divisor > 0 else 1
        return (
            min(pixel_mask.shape[-2], math.ceil(height / divisor) * divisor),
            min(pixel_mask.shape[-1], math.ceil(width / divisor) * divisor),
        )

    def _scores_to_target(
        self,
        scores: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        target_size: tuple[int, int] | None,
        align_corners: bool = False,
    ) -> torch.Tensor:
        """`(1, C, h, w)` scores -> the image's own grid (the cells it has when processed alone, upsampled when coarser
        than `pixel_mask`), the image region of `pixel_mask`, then `target_size`; all bilinear.

        Cropping to the image's own grid first makes the result independent of the other images of the batch: with
        `align_corners=True` the sampling positions depend on the size of the grid that is upsampled, and with
        `align_corners=False` the last rows and columns would read the padding cells of a larger batch grid."""
        scores = scores.float()
        if pixel_mask is not None:
            factor = max(1, round(pixel_mask.shape[-2] / scores.shape[-2]))
            own_height, own_width = self._own_grid(pixel_mask)
            scores = scores[..., : math.ceil(own_height / factor), : math.ceil(own_width / factor)]
            if factor > 1:
                size = (scores.shape[-2] * factor, scores.shape[-1] * factor)
                scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=align_corners)
            scores = self._unpad(scores, pixel_mask)
        if target_size is not None and tuple(scores.shape[-2:]) != target_size:
            scores = F.interpolate(scores, size=target_size, mode="bilinear", align_corners=align_corners)
        return scores

    def post_process_depth_estimation(
        self,
        outputs: Any,
        target_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        r"""
        Removes the padding of each prediction (using `outputs.pixel_mask` when present) and resizes it bilinearly to
        `target_sizes[i] = (height, width)` (e.g. the original image size).

        Returns:
            One `{"predicted_depth": (H, W) float32 tensor}` per image, whatever the model's dtype.
        """
        predicted_depth = outputs["predicted_depth"] if isinstance(outputs, dict) else outputs.predicted_depth
        if predicted_depth is None or predicted_depth.ndim != 3:
            raise ValueError("`outputs.predicted_depth` must be a (batch, height, width) tensor.")
        pixel_mask = _pixel_mask_of(outputs)
        sizes = self._check_target_sizes(target_sizes, predicted_depth.shape[0])
        return [
            {"predicted_depth": self._full_resolution_to_target(depth[None], pixel_mask, index, size)[0]}
            for index, (depth, size) in enumerate(zip(predicted_depth, sizes, strict=True))
        ]

    def _full_resolution_to_target(
        self, prediction: torch.Tensor, pixel_mask: torch.Tensor | None, index: int, size: tuple[int, int] | None
    ) -> torch.Tensor:
        """A `(C, H, W)` prediction at the input resolution -> float32, image `index`'s padding removed, resized
        bilinearly (antialiased when shrinking) to `size`."""
        image = self._unpad(prediction, None if pixel_mask is None else pixel_mask[index]).float()
        if size is None or tuple(image.shape[-2:]) == size:
            return image
        antialias = size[0] < image.shape[-2] or size[1] < image.shape[-1]
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]

    def post_process_normal_estimation(
        self,
        outputs: Any,
        target_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        r"""
        Removes the padding of each image's normals (its own extent in `outputs.pixel_mask` when present), resizes
        them bilinearly to `target_sizes[i] = (height, width)` (e.g. the original image size) and renormalises every
        vector to unit length (interpolation shortens them). Vectors that resize to zero (no information) stay zero.

        Returns:
            One `{"predicted_normals": (3, H, W) float32 tensor}` per image (camera frame, Marigold's convention).
        """
        normals = outputs["predicted_normals"] if isinstance(outputs, dict) else outputs.predicted_normals
        if normals is None or normals.ndim != 4 or normals.shape[1] != 3:
            raise ValueError("`outputs.predicted_normals` must be a (batch, 3, height, width) tensor.")
        pixel_mask = _pixel_mask_of(outputs)
        sizes = self._check_target_sizes(target_sizes, normals.shape[0])
        return [
            {
                "predicted_normals": F.normalize(
                    self._full_resolution_to_target(image, pixel_mask, index, size), dim=0, eps=1e-6
                )
            }
            for index, (image, size) in enumerate(zip(normals, sizes, strict=True))
        ]

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    ) -> list[torch.Tensor]:
        r"""
        Per-image label maps from `outputs.logits` (transformers' contract): logits are brought to the input grid
        (x8 for single-pass logits), the padding of each image removed (using `outputs.pixel_mask`), resized
        bilinearly to `target_sizes[i]` when given, and arg-maxed.

        Returns:
            One `(H, W)` int64 tensor of class indices per image.
        """
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if logits is None or logits.ndim != 4:
            raise ValueError("`outputs.logits` must be a (batch, num_labels, height, width) tensor.")
        pixel_mask = _pixel_mask_of(outputs)
        sizes = self._check_target_sizes(target_sizes, logits.shape[0])
        results = []
        for index, size in enumerate(sizes):
            mask = None if pixel_mask is None else pixel_mask[index]
            results.append(self._scores_to_target(logits[index : index + 1], mask, size)[0].argmax(dim=0))
        return results

    def post_process_referring_segmentation(
        self,
        outputs: Any,
        target_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
        threshold: float = 0.5,
    ) -> list[dict[str, torch.Tensor]]:
        r"""
        Per-expression masks from referring logits `(N, 2, h, w)`: upsampled to the input grid (bilinear,
        align_corners=True as the official evaluation), un-padded with `outputs.pixel_mask`, resized to
        `target_sizes[i]`, and thresholded on the foreground probability (0.5 is the official arg-max).

        Returns:
            One `{"mask": (H, W) bool, "probabilities": (H, W) float32}` per expression.
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1], got {threshold}.")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if logits is None or logits.ndim != 4 or logits.shape[1] != 2:
            raise ValueError("`outputs.logits` must be a (num_texts, 2, height, width) tensor.")
        pixel_mask = _pixel_mask_of(outputs)
        sizes = self._check_target_sizes(target_sizes, logits.shape[0])
        results = []
        for index, size in enumerate(sizes):
            mask = None if pixel_mask is None else pixel_mask[index]
            scores = self._scores_to_target(logits[index : index + 1], mask, size, align_corners=True)
            probabilities = scores.softmax(dim=1)[0, 1]
            results.append({"mask": probabilities > threshold, "probabilities": probabilities})
        return results

    # -- visualisation ------------------------------------------------------------------------------------------------

    @staticmethod
    def visualize_segmentation(
        image: Any,
        segmentation: torch.Tensor | np.ndarray,
        id2label: dict[int, str] | None = None,
        alpha: float = 0.5,
        legend: bool = True,
    ) -> Image.Image:
        """The image with a colour label overlay and a legend; see :func:`vpd_hf.visualization.overlay_segmentation`."""
        return overlay_segmentation(image, segmentation, id2label=id2label, alpha=alpha, legend=legend)

    @staticmethod
    def visualize_depth(
        depth: torch.Tensor | np.ndarray,
        vmin: float | None = None,
        vmax: float | None = None,
        colormap: str = "viridis",
    ) -> Image.Image:
        """Colour picture of a depth map; see :func:`vpd_hf.visualization.colorize_depth`."""
        return colorize_depth(depth, vmin=vmin, vmax=vmax, colormap=colormap)

    @staticmethod
    def visualize_normals(
        normals: torch.Tensor | np.ndarray, flip_x: bool = False, flip_y: bool = False, flip_z: bool = False
    ) -> Image.Image:
        """Marigold-coloured picture of a `(3, H, W)` normals map; see :func:`vpd_hf.visualization.visualize_normals`."""
        return visualize_normals(normals, flip_x=flip_x, flip_y=flip_y, flip_z=flip_z)

    @staticmethod
    def export_depth_to_16bit_png(depth: torch.Tensor | np.ndarray, scale: float = 1000.0) -> Image.Image:
        """16-bit PNG image of the depth in millimetres; see :func:`vpd_hf.visualization.depth_to_uint16_png`."""
        return depth_to_uint16_png(depth, scale=scale)


__all__ = ["VPDImageProcessor"]
