"""Small pure functions that turn predictions into pictures (no matplotlib)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

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


__all__ = ["COLORMAPS", "apply_colormap", "colorize_depth", "depth_to_uint16_png"]
