"""Surface-normal labels: the 8-bit PNG encoding shared by the NYUv2 normals ground truth and the synthetic scenes.

Convention (diffusers' Marigold normals, what `VPDModelForNormalEstimation` predicts): unit vectors in the camera frame
with +x to the right, +y up and +z towards the camera; an invalid pixel is the all-zero vector.

Encoding (`normal_map` columns, `datasets.Image`, mode "RGB"): `rgb = round((n + 1) / 2 * 255)` per component, the
usual image encoding of normal maps (GeoNet's NYUv2 normals, the DSINE / Bae et al. evaluation sets); `(0, 0, 0)` marks
an invalid pixel (no unit vector encodes to it: it would decode to `(-1, -1, -1)`). Decoding renormalises to unit length;
the 8-bit quantisation moves a normal by at most about 0.4 degrees, far below the 11.25 degree threshold of the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["NORMAL_CONVENTIONS", "convert_normal_convention", "decode_normals", "encode_normals"]

# Sign of each axis of a source convention relative to Marigold's (x right, y up, z towards the camera).
NORMAL_CONVENTIONS: dict[str, tuple[int, int, int]] = {
    "marigold": (1, 1, 1),  # x right, y up, z towards the camera (diffusers, OpenGL camera)
    "opencv": (1, -1, -1),  # x right, y down, z away from the camera (OpenCV / Kinect camera frame)
}


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals `(H, W, 3)` (invalid pixels all-zero) -> `(H, W, 3)` uint8 RGB (see the module docstring)."""
    normals = np.asarray(normals, dtype=np.float64)
    if normals.ndim != 3 or normals.shape[-1] != 3:
        raise ValueError(f"`normals` must have the shape (H, W, 3), got {normals.shape}.")
    if not np.isfinite(normals).all():
        raise ValueError("`normals` holds NaN or infinite values.")
    valid = np.any(normals != 0, axis=-1)
    encoded = np.round((np.clip(normals, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    encoded[~valid] = 0
    return encoded


def decode_normals(encoded: np.ndarray, convention: str = "marigold") -> np.ndarray:
    """`(H, W, 3)` uint8 RGB normal map -> float32 `(H, W, 3)` unit normals in Marigold's frame, all-zero where the
    pixel is `(0, 0, 0)` (invalid). `convention` names the frame the file was written in (:data:`NORMAL_CONVENTIONS`)."""
    encoded = np.asarray(encoded)
    if encoded.ndim != 3 or encoded.shape[-1] != 3 or encoded.dtype != np.uint8:
        raise ValueError(f"`encoded` must be a uint8 array (H, W, 3), got {encoded.dtype} {encoded.shape}.")
    valid = np.any(encoded != 0, axis=-1)
    normals = encoded.astype(np.float64) / 127.5 - 1.0
    normals = convert_normal_convention(normals, convention)
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    valid &= norm[..., 0] > 0.5  # a valid encoding is close to unit length; a near-zero vector has no direction
    normals = np.where(valid[..., None], normals / np.maximum(norm, 1e-12), 0.0)
    return normals.astype(np.float32)


def convert_normal_convention(normals: np.ndarray, convention: str | Sequence[int]) -> np.ndarray:
    """Normals `(..., 3)` given in `convention` (a name of :data:`NORMAL_CONVENTIONS` or three signs) -> Marigold's
    frame. The conversions are axis sign flips, so the same call converts back."""
    signs = NORMAL_CONVENTIONS.get(convention) if isinstance(convention, str) else tuple(convention)
    if signs is None or len(signs) != 3 or any(s not in (1, -1) for s in signs):
        raise ValueError(
            f"`convention` must be one of {tuple(NORMAL_CONVENTIONS)} or three signs ±1, got {convention!r}."
        )
    return np.asarray(normals) * np.asarray(signs, dtype=np.float64)
