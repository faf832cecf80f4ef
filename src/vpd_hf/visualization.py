"""Small pure functions that turn predictions into pictures (no matplotlib)."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Colour maps as evenly spaced anchor colours, linearly interpolated. "viridis" and "magma" are perceptually uniform
# (anchors sampled from the matplotlib maps); "spectral" is ColorBrewer's 11-class diverging scheme (Marigold's choice).
_COLORMAP_ANCHORS: dict[str, tuple[str, ...]] = {
    "viridis": ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"),
    "magma": ("#000004", "#1c1044", "#4f127b", "#812581", "#b5367a", "#e55064", "#fb8761", "#fec287", "#fcfdbf"),
    "spectral": (
        "#9e0142",
        "#d53e4f",
        "#f46d43",
        "#fdae61",
        "#fee08b",
        "#ffffbf",
        "#e6f598",
        "#abdda4",
        "#66c2a5",
        "#3288bd",
        "#5e4fa2",
    ),
    "gray": ("#000000", "#ffffff"),
}
COLORMAPS = tuple(_COLORMAP_ANCHORS)


def _to_numpy_2d(depth: torch.Tensor | np.ndarray, name: str = "depth") -> np.ndarray:
    if isinstance(depth, torch.Tensor):
        depth = depth.detach().float().cpu().numpy()
    depth = np.asarray(depth)
    if depth.ndim == 3 and 1 in (depth.shape[0], depth.shape[-1]):
        depth = depth.squeeze(0) if depth.shape[0] == 1 else depth.squeeze(-1)
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
        raise ValueError(
            f"`{name}` must be a 2-D numeric array (H, W), got shape {depth.shape} and dtype {depth.dtype}."
        )
    return depth.astype(np.float64)


def apply_colormap(values: np.ndarray, colormap: str = "viridis") -> np.ndarray:
    """Maps values in [0, 1] (clipped) to `uint8` RGB with one of :data:`COLORMAPS`; returns `(..., 3)`."""
    if colormap not in _COLORMAP_ANCHORS:
        raise ValueError(f"`colormap` must be one of {list(COLORMAPS)}, got {colormap!r}.")
    anchors = np.array(
        [[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in _COLORMAP_ANCHORS[colormap]], dtype=np.float64
    )
    positions = np.linspace(0.0, 1.0, len(anchors))
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    rgb = np.stack([np.interp(values, positions, anchors[:, channel]) for channel in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def colorize_depth(
    depth: torch.Tensor | np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = "viridis",
    invert: bool = True,
    invalid_color: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    r"""
    Colour picture of a depth map `(H, W)`.

    Args:
        vmin, vmax: depth range mapped onto the colour map (default: the 2nd and 98th percentiles of the valid depths,
            robust to a few outliers); values outside are clipped.
        colormap: one of :data:`COLORMAPS`.
        invert: near = bright (the convention of depth visualisations) when True.
        invalid_color: colour of non-finite or non-positive depths.
    """
    values = _to_numpy_2d(depth)
    valid = np.isfinite(values) & (values > 0)
    if vmin is None or vmax is None:
        low, high = np.percentile(values[valid], [2, 98]) if valid.any() else (0.0, 1.0)
        vmin = low if vmin is None else vmin
        vmax = high if vmax is None else vmax
    # A (nearly) constant map stays one colour instead of stretching float rounding noise over the colour map.
    min_span = 1e-4 * max(abs(vmin), abs(vmax), 1e-6)
    if vmax - vmin < min_span:
        center = (vmin + vmax) / 2
        vmin, vmax = center - min_span / 2, center + min_span / 2
    normalized = (values - vmin) / (vmax - vmin)
    if invert:
        normalized = 1.0 - normalized
    rgb = apply_colormap(normalized, colormap)
    rgb[~valid] = invalid_color
    return Image.fromarray(rgb)


def depth_to_uint16_png(depth: torch.Tensor | np.ndarray, scale: float = 1000.0) -> Image.Image:
    r"""
    16-bit grayscale image of `depth * scale`, rounded and clipped to [0, 65535] (default: millimetres, the NYUv2/BTS
    convention; 0 = no depth). Save it with `.save("depth.png")` and read metres back as `array / scale`.
    """
    values = _to_numpy_2d(depth)
    if not scale > 0:
        raise ValueError(f"`scale` must be positive, got {scale}.")
    scaled = np.where(np.isfinite(values), values * scale, 0.0)
    return Image.fromarray(np.clip(np.round(scaled), 0, 65535).astype(np.uint16))


def visualize_normals(
    normals: torch.Tensor | np.ndarray, flip_x: bool = False, flip_y: bool = False, flip_z: bool = False
) -> Image.Image:
    r"""
    RGB picture of a `(3, H, W)` normals map with diffusers' Marigold colours (`MarigoldImageProcessor.
    visualize_normals`, bit for bit): colour = `(n + 1) / 2` scaled to 255 and truncated to `uint8`, so +x (right)
    is red, +y (up) green, +z (towards the observer) blue; a wall facing the camera is (127, 127, 255). `flip_*` negate
    an axis first (for normals in another convention). Pure: the input is not modified (values are clipped to
    [-1, 1]; an all-zero "no label" vector is mid-grey).
    """
    array = (
        normals.detach().float().cpu()
        if isinstance(normals, torch.Tensor)
        else torch.from_numpy(np.asarray(normals, dtype=np.float32))
    )
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"`normals` must be a (3, height, width) map, got shape {tuple(array.shape)}.")
    flip = torch.tensor([(-1.0) ** flip_x, (-1.0) ** flip_y, (-1.0) ** flip_z])[:, None, None]
    image = (torch.nan_to_num(array).clamp(-1.0, 1.0) * flip).permute(1, 2, 0)
    image = (image + 1.0) * 0.5  # the same float32 operations as diffusers', so that the truncation agrees
    return Image.fromarray((image * 255).to(torch.uint8).numpy())


def segmentation_palette(num_labels: int) -> np.ndarray:
    """`(num_labels, 3)` uint8 colours, deterministic and well separated: hues step by the golden angle, with three
    alternating saturation/value levels so that neighbouring labels also differ in lightness."""
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"`num_labels` must be a positive integer, got {num_labels!r}.")
    levels = ((0.75, 0.95), (0.55, 0.75), (0.9, 0.6))
    colors = []
    for label in range(num_labels):
        saturation, value = levels[label % len(levels)]
        hue = (label * 0.618033988749895) % 1.0
        colors.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.array(colors, dtype=np.uint8)


def _to_rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"`image` must be a PIL image or an RGB array (H, W, 3) / (3, H, W), got shape {array.shape}.")
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return array


def overlay_segmentation(
    image: Image.Image | np.ndarray | torch.Tensor,
    segmentation: torch.Tensor | np.ndarray,
    id2label: dict[int, str] | None = None,
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    legend: bool = True,
    ignore_index: int = 255,
) -> Image.Image:
    r"""
    The image blended with a colour per label, plus (with `legend`) a panel listing the labels present, largest first.

    Args:
        image: PIL image or RGB array (uint8, or float in [0, 1]) of the same size as `segmentation`.
        segmentation: `(H, W)` integer label map; `ignore_index` pixels are left uncoloured.
        id2label: names for the legend (default: the label numbers).
        palette: `(num_labels, 3)` uint8 colours (default: :func:`segmentation_palette`).
        alpha: weight of the label colours.
    """
    rgb = _to_rgb_array(image)
    labels = segmentation.detach().cpu().numpy() if isinstance(segmentation, torch.Tensor) else np.asarray(segmentation)
    if labels.shape != rgb.shape[:2] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`segmentation` must be an integer map of the image's size {rgb.shape[:2]}, got {labels.dtype} {labels.shape}."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    valid = (labels != ignore_index) & (labels >= 0)
    num_colors = int(labels[valid].max()) + 1 if valid.any() else 1
    if palette is None:
        palette = segmentation_palette(max(num_colors, len(id2label) if id2label else 1))
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] < num_colors:
        raise ValueError(f"`palette` must be (num_labels, 3) with at least {num_colors} rows, got {palette.shape}.")
    blended = rgb.astype(np.float64)
    colors = palette[np.where(valid, labels, 0)].astype(np.float64)
    blended[valid] = (1 - alpha) * blended[valid] + alpha * colors[valid]
    overlay = Image.fromarray(np.round(blended).astype(np.uint8))
    if not legend or not valid.any():
        return overlay

    present, counts = np.unique(labels[valid], return_counts=True)
    order = present[np.argsort(-counts, kind="stable")]
    font = ImageFont.load_default()
    row = 16
    rows_fit = max(1, overlay.height // row)
    shown = order[:rows_fit] if len(order) <= rows_fit else order[: rows_fit - 1]
    names = [str(id2label.get(int(label), label)) if id2label else str(int(label)) for label in shown]
    hidden = len(order) - len(shown)
    lines = names + ([f"+{hidden} more"] if hidden else [])
    text_width = max(int(ImageDraw.Draw(overlay).textlength(line, font=font)) for line in lines)
    canvas = Image.new("RGB", (overlay.width + text_width + 34, overlay.height), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for position, line in enumerate(lines):
        top = 4 + position * row
        if position < len(shown):
            draw.rectangle(
                [overlay.width + 6, top, overlay.width + 18, top + 11],
                fill=tuple(int(c) for c in palette[shown[position]]),
            )
        draw.text((overlay.width + 24, top), line, fill=(0, 0, 0), font=font)
    return canvas


def overlay_mask(
    image: Image.Image | np.ndarray | torch.Tensor,
    mask: torch.Tensor | np.ndarray | Image.Image,
    color: tuple[int, int, int] = (255, 64, 64),
    alpha: float = 0.5,
    caption: str | None = None,
) -> Image.Image:
    r"""
    The image with a binary `mask` (non-zero = object, same size) tinted in `color`, its outline drawn, and an optional
    `caption` (e.g. the referring expression) in a band under the image.
    """
    rgb = _to_rgb_array(image)
    selected = np.asarray(mask) if isinstance(mask, Image.Image) else mask
    selected = selected.detach().cpu().numpy() if isinstance(selected, torch.Tensor) else np.asarray(selected)
    if selected.shape != rgb.shape[:2]:
        raise ValueError(f"`mask` must have the image's size {rgb.shape[:2]}, got {selected.shape}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    selected = selected != 0
    blended = rgb.astype(np.float64)
    blended[selected] = (1 - alpha) * blended[selected] + alpha * np.asarray(color, dtype=np.float64)
    # Outline: mask pixels with a 4-neighbour outside the mask.
    padded = np.pad(selected, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    blended[selected & ~interior] = color
    picture = Image.fromarray(np.round(blended).astype(np.uint8))
    if not caption:
        return picture
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (picture.width, picture.height + 18), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    ImageDraw.Draw(canvas).text((4, picture.height + 3), caption, fill=(0, 0, 0), font=font)
    return canvas


def plot_curve(
    points: list[tuple[float, float]],
    title: str = "",
    x_label: str = "step",
    y_label: str = "loss",
    size: tuple[int, int] = (480, 300),
    color: tuple[int, int, int] = (33, 145, 140),
) -> Image.Image:
    """A line chart of `(x, y)` points with labelled axes (min/max ticks), e.g. a training loss curve."""
    if len(points) < 2:
        raise ValueError(f"`points` needs at least two (x, y) pairs, got {len(points)}.")
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("`points` must be finite.")
    width, height = size
    left, right, top, bottom = 56, 12, 26, 34
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x_span = max(xs.max() - xs.min(), 1e-12)
    y_span = max(ys.max() - ys.min(), 1e-12)
    px = left + (xs - xs.min()) / x_span * (width - left - right)
    py = top + (ys.max() - ys) / y_span * (height - top - bottom)
    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    draw.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=color, width=2)
    draw.text((left, 6), title, fill=(0, 0, 0), font=font)
    for value, y in ((ys.max(), top), (ys.min(), height - bottom)):
        draw.text((4, y - 6), f"{value:.3g}", fill=(60, 60, 60), font=font)
    for value, x in ((xs.min(), left), (xs.max(), width - right)):
        label = f"{value:.0f}"
        draw.text((x - draw.textlength(label, font=font) / 2, height - bottom + 4), label, fill=(60, 60, 60), font=font)
    draw.text(((width - draw.textlength(x_label, font=font)) / 2, height - 14), x_label, fill=(0, 0, 0), font=font)
    draw.text((4, top + 14), y_label, fill=(0, 0, 0), font=font)
    return image


__all__ = [
    "COLORMAPS",
    "apply_colormap",
    "colorize_depth",
    "depth_to_uint16_png",
    "overlay_mask",
    "overlay_segmentation",
    "plot_curve",
    "segmentation_palette",
    "visualize_normals",
]
