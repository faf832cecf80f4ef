"""Test-time procedures for dense prediction: sliding windows, multi-scale and flip averaging.

These are the official VPD/mmsegmentation test procedures, written against a plain `logits_fn` so that the model's
eval-mode forward (and therefore transformers' pipelines) and the evaluation script use the same code:

* `sliding_window_logits`: overlapping `crop_size` windows every `stride` pixels (the last window of a row/column is
  moved back to end at the border), each window's logits at the window's resolution, summed and divided by the number
  of windows covering each pixel;
* `test_time_logits`: that (or one whole-image pass) at several scales and optionally on the flipped image, with the
  softmax probabilities averaged over the views (mmsegmentation's `aug_test`);
* `shifted_window_depth`: VPD's NYUv2 depth test — square windows shifted along the long side of the image (two at
  480x640: offsets 0 and 160), each also predicted flipped, averaged where they overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .batching import valid_extent

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
# The `test_time_logits` options a segmentation config sets (`semantic_inference_{name}`).
TEST_PROCEDURE_OPTIONS = ("mode", "scales", "flip", "crop_size", "stride")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair of positive ints, got {value!r}.")
    return pair


def sliding_window_logits(
    logits_fn: LogitsFn,
    pixel_values: torch.Tensor,
    crop_size: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
) -> torch.Tensor:
    r"""
    Args:
        logits_fn: maps images `(B, 3, h, w)` to logits `(B, C, h, w)` at the same resolution.
        pixel_values: `(B, 3, H, W)`.
        crop_size, stride: window size and step, `(height, width)` or one int for both.

    Returns:
        Logits `(B, C, H, W)`: the mean over the windows covering each pixel.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride_h, stride_w = _pair(stride, "stride")
    batch, _, height, width = pixel_values.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    total, count = None, pixel_values.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            window = logits_fn(pixel_values[:, :, y1:y2, x1:x2])
            if window.shape[0] != batch or window.shape[-2:] != (y2 - y1, x2 - x1):
                raise ValueError(
                    f"`logits_fn` must return logits at the window's resolution {(batch, '*', y2 - y1, x2 - x1)}, "
                    f"got {tuple(window.shape)}."
                )
            if total is None:
                total = window.new_zeros((batch, window.shape[1], height, width), dtype=torch.float32)
            total[:, :, y1:y2, x1:x2] += window.float()
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def test_time_logits(
    logits_fn: LogitsFn,
    pixel_values: torch.Tensor,
    mode: str = "whole",
    crop_size: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    r"""
    Logits `(B, C, H, W)` for `pixel_values` `(B, 3, H, W)` under a test procedure.

    Args:
        logits_fn: maps images `(B, 3, h, w)` to logits `(B, C, h, w)` at the same resolution (one whole pass).
        mode: `"whole"` (one pass per view) or `"slide"` (:func:`sliding_window_logits` per view).
        scales: image scale factors; each view is resized bilinearly, predicted, and its logits resized back.
        flip: also predict the horizontally flipped views (and flip the logits back).

    Returns:
        With one view (scale 1, no flip): that view's logits. With several views: the log of the mean softmax
        probability over the views (a valid logit whose softmax is that mean).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"`mode` must be 'whole' or 'slide', got {mode!r}.")
    scales = list(scales)
    if not scales or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
        raise ValueError(f"`scales` must be a non-empty list of positive numbers, got {scales!r}.")
    height, width = pixel_values.shape[-2:]

    def run(images: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return logits_fn(images)
        return sliding_window_logits(logits_fn, images, crop_size, stride)

    views = [(scale, flipped) for scale in scales for flipped in ((False, True) if flip else (False,))]
    if views == [(1.0, False)]:
        return run(pixel_values)
    probabilities = None
    for scale, flipped in views:
        images = pixel_values
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flipped:
            images = images.flip(-1)
        logits = run(images).float()
        if flipped:
            logits = logits.flip(-1)
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        view_probabilities = logits.softmax(dim=1)
        probabilities = view_probabilities if probabilities is None else probabilities + view_probabilities
    return torch.log((probabilities / len(views)).clamp_min(torch.finfo(torch.float32).tiny))


def semantic_inference_options(config, **overrides) -> dict:
    """The test procedure of a segmentation `config` (`semantic_inference_{mode, scales, flip, crop_size, stride}`) as
    :func:`test_time_logits` keyword arguments; `overrides` that are not None replace the configured values."""
    options = {name: getattr(config, f"semantic_inference_{name}") for name in TEST_PROCEDURE_OPTIONS}
    unknown = set(overrides) - set(TEST_PROCEDURE_OPTIONS)
    if unknown:
        raise TypeError(f"Unknown test procedure option(s) {sorted(unknown)}: use {list(TEST_PROCEDURE_OPTIONS)}.")
    options.update({name: value for name, value in overrides.items() if value is not None})
    return options


def is_single_pass(options: dict) -> bool:
    """Whether test procedure `options` (see :func:`semantic_inference_options`) are one whole-image pass."""
    return options["mode"] == "whole" and list(options["scales"]) == [1.0] and not options["flip"]


def masked_test_time_logits(
    logits_fn: LogitsFn, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, **options
) -> torch.Tensor:
    r"""
    :func:`test_time_logits` `(B, C, H, W)` of `pixel_values` `(B, 3, H, W)` over each image's un-padded region (from
    `pixel_mask` `(B, H, W)`, 1 = image; images padded at the bottom/right); padding gets 0. Images sharing a region
    size run together.
    """
    if pixel_mask is None:
        return test_time_logits(logits_fn, pixel_values, **options)
    output = None
    sizes = [tuple(extent) for extent in valid_extent(pixel_mask).tolist()]
    for size in dict.fromkeys(sizes):
        index = [i for i, s in enumerate(sizes) if s == size]
        region = pixel_values[index][..., : size[0], : size[1]]
        logits = test_time_logits(logits_fn, region, **options)
        if output is None:
            output = logits.new_zeros((pixel_values.shape[0], logits.shape[1], *pixel_values.shape[-2:]))
        output[index, :, : size[0], : size[1]] = logits
    return output


def shifted_window_depth(
    depth_fn: Callable[[torch.Tensor], torch.Tensor],
    pixel_values: torch.Tensor,
    num_windows: int = 2,
    flip: bool = True,
) -> torch.Tensor:
    r"""
    Args:
        depth_fn: maps images `(B, 3, h, w)` to depth `(B, h, w)`.
        pixel_values: `(B, 3, H, W)`.
        num_windows: square `H x H` windows spaced evenly from the left to the right edge when `W > H` (the official
            `--shift_window_test --shift_size 2`); 1, or a portrait/square image, means one whole-image pass.
        flip: also predict each window mirrored and average (the official `--flip_test`).

    Returns:
        Depth `(B, H, W)`: the mean over the views covering each pixel.
    """
    if not isinstance(num_windows, int) or num_windows < 1:
        raise ValueError(f"`num_windows` must be a positive integer, got {num_windows!r}.")
    batch, _, height, width = pixel_values.shape
    if width > height and num_windows > 1:
        step = (width - height) // (num_windows - 1)
        spans = [(i * step, i * step + height) for i in range(num_windows)]
    else:
        spans = [(0, width)]
    windows = torch.cat([pixel_values[..., left:right] for left, right in spans])
    if flip:
        windows = torch.cat([windows, windows.flip(-1)])
    depth = depth_fn(windows).float()
    if flip:
        half = depth.shape[0] // 2
        depth = (depth[:half] + depth[half:].flip(-1)) / 2
    total = depth.new_zeros((batch, height, width))
    count = depth.new_zeros((1, height, width))
    for index, (left, right) in enumerate(spans):
        total[..., left:right] += depth[index * batch : (index + 1) * batch]
        count[..., left:right] += 1
    return total / count


__all__ = [
    "is_single_pass",
    "masked_test_time_logits",
    "semantic_inference_options",
    "shifted_window_depth",
    "sliding_window_logits",
    "test_time_logits",
]
