"""Offline procedural indoor scenes with exact geometry, for demos, tests and CPU benchmarks of all three VPD tasks.

Real datasets (NYUv2, ADE20K, RefCOCO) need a download; this module renders, in pure NumPy, a box-shaped room
(floor, four walls, ceiling) with procedural textures and 2 to 8 simple objects resting on the floor, seen by a
pinhole camera with the NYUv2 Kinect's field of view, and returns for every image an RGB picture, an exact metric
z-depth map, an ADE20K-style semantic label map, an instance map, a scene type and referring expressions that are
checked to be unambiguous. :func:`save_synthetic_dataset` writes it as parquet in the column layouts of the Hub's
`sayakpaul/nyu_depth_v2` / `scene_parse_150` (config `scenes`) and `lmms-lab/RefCOCO` (config `referring`).

Conventions (all lengths in metres, all angles in radians):

* **World frame**: x to the right, y up, z forward (into the room). The room spans x in [-width/2, width/2], y in
  [0, height] (y = 0 is the floor) and z in [0, depth] (z = 0 is the wall behind the camera).
* **Camera frame** (OpenCV): x right, y down, z forward along the optical axis. The world-from-camera rotation is
  ``R = R_y(yaw) @ R_x(pitch) @ diag(1, -1, 1) @ R_z(roll)``: positive pitch looks down (the optical axis is
  ``(0, -sin(pitch), cos(pitch))`` when yaw = 0), positive yaw turns right, roll turns the image about the axis.
* **Intrinsics**: the NYUv2 Kinect frame (fx = 518.86, fy = 519.47 px at 640 x 480, about 63 x 50 degrees) resampled to
  the output size: ``fx = 518.86 * W / 640``, ``fy = 519.47 * H / 480``, principal point at the image centre
  ``(W / 2, H / 2)``. The field of view is therefore the same at every resolution; like a resized NYUv2 frame, an
  output whose aspect ratio is not 4:3 has non-square pixels. Pixel (row i, column j) is sampled at its centre
  ``(u, v) = (j + 0.5, i + 0.5)``.
* **Depth** is the z-depth (distance along the optical axis, what depth sensors and NYUv2 report), not the ray length:
  ``depth = t * dot(ray, optical_axis)`` for a unit ray that travels ``t`` metres to the surface.
* **Labels** follow the ADE20K (`scene_parse_150`) layout: 0 = "other" (never used here), 1..N the classes of
  :data:`SYNTHETIC_ID2LABEL`. Instance k (1-based) is ``objects[k - 1]``; 0 = no object.

Every random choice of sample ``i`` comes from ``np.random.default_rng([seed, split_code, i])``, so a sample is the
same whichever samples are generated with it and in which order, and train / validation images never coincide.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

if TYPE_CHECKING:  # imported inside the dataset functions: rendering alone should not pay for importing datasets
    import datasets

__all__ = [
    "COLOR_PALETTE",
    "LARGE_OBJECT_EXTENT",
    "MIN_VISIBLE_PIXELS",
    "NYU_FX",
    "NYU_FY",
    "OBJECT_KINDS",
    "REFERRING_DEPTH_MARGIN",
    "REFERRING_X_MARGIN",
    "ROOM_STYLES",
    "SCENE_TYPES",
    "SPLIT_CODES",
    "SYNTHETIC_ID2LABEL",
    "SYNTHETIC_LABEL2ID",
    "Camera",
    "ObjectRecord",
    "RayHits",
    "ReferringQuery",
    "RoomStyle",
    "SceneLayout",
    "SceneObject",
    "SyntheticScene",
    "SyntheticScenes",
    "Texture",
    "camera_intrinsics",
    "camera_rays",
    "cast_rays",
    "generate_scene",
    "main",
    "make_synthetic_dataset",
    "refcoco_columns",
    "referring_expressions",
    "referring_features",
    "render_layout",
    "rle_decode",
    "rle_encode",
    "sample_layout",
    "save_synthetic_dataset",
    "scene_features",
]

# --------------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------------

NYU_WIDTH, NYU_HEIGHT = 640, 480
NYU_FX, NYU_FY = 518.8579, 519.4696  # the Kinect colour camera's focal lengths in pixels at 640 x 480

OBJECT_KINDS: tuple[str, ...] = ("sphere", "box", "cylinder", "cone", "capsule")

SYNTHETIC_ID2LABEL: dict[int, str] = {0: "other", 1: "wall", 2: "floor", 3: "ceiling"} | {
    4 + k: kind for k, kind in enumerate(OBJECT_KINDS)
}
SYNTHETIC_LABEL2ID: dict[str, int] = {label: index for index, label in SYNTHETIC_ID2LABEL.items()}

# Albedos in [0, 1] (display RGB). Saturated and far apart, so that the colour word stays right under shading.
COLOR_PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.82, 0.10, 0.09),
    "green": (0.13, 0.62, 0.18),
    "blue": (0.10, 0.26, 0.85),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.95, 0.95, 0.93),
    "black": (0.07, 0.07, 0.08),
    "orange": (0.98, 0.48, 0.05),
    "purple": (0.50, 0.15, 0.68),
}

# An object is "large" when its largest extent (diameter or side, height included) reaches this many metres. Sizes
# are drawn from two separate ranges on either side of it so that the two classes look clearly different.
LARGE_OBJECT_EXTENT = 0.45
_SMALL_EXTENTS = (0.16, 0.34)
_LARGE_EXTENTS = (0.52, 0.90)

MIN_VISIBLE_PIXELS = 30  # an object with fewer visible pixels gets no referring expression and is never a distractor
# "left"/"rightmost" need a gap of this fraction of the image width between the centroids of the referent and of every
# other candidate, "nearest"/"farthest" a gap of this many metres of centre z-depth: without a clear margin a human
# could not tell which one is meant, so such an expression would be ambiguous in practice.
REFERRING_X_MARGIN = 0.05
REFERRING_DEPTH_MARGIN = 0.3

SPLIT_CODES: dict[str, int] = {"train": 0, "validation": 1, "test": 2}

# `python -m vpd_hf.data.synthetic` runs this file as __main__ after `vpd_hf.data` has already imported it (for its
# re-exports); runpy then warns that the module is in sys.modules. Both copies are self-contained, so the warning is
# noise: silence exactly that message.
warnings.filterwarnings("ignore", message=r"'vpd_hf\.data\.synthetic' found in sys\.modules", category=RuntimeWarning)

_SURFACE_LABELS = (2, 3, 1, 1, 1, 1)  # floor, ceiling, left wall, right wall, back wall, far wall
_FLOOR, _CEILING, _WALL_LEFT, _WALL_RIGHT, _WALL_BACK, _WALL_FAR = range(6)
_T_MIN = 1e-6  # rays start on surfaces (shadow rays): ignore hits closer than this
_SHADOW_OFFSET = 1e-4  # shadow rays leave the surface along its normal by this much to avoid self-shadowing acne

RGB = tuple[float, float, float]


# --------------------------------------------------------------------------------------------------------------------
# Room styles: the scene type is informative because each style has its own room size, textures, colours and objects
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomStyle:
    """The tendencies of one scene type. Ranges are (low, high) for uniform draws; colours are display RGB in [0, 1].

    Attributes:
        width, depth, height: room size ranges in metres (x, z, y).
        num_objects: inclusive range of the number of objects (within 2..8).
        wall_textures, floor_textures: texture kinds to choose from (see :class:`Texture`).
        wall_colors, floor_colors: (primary, secondary) colour pairs to choose from.
        ceiling_color: base colour of the (plain) ceiling.
        kind_weights: relative frequency of each of :data:`OBJECT_KINDS`.
        color_weights: relative frequency of each colour of :data:`COLOR_PALETTE`, in its order.
        large_probability: probability that an object is large.
        light_tint: colour of the point light.
    """

    width: tuple[float, float]
    depth: tuple[float, float]
    height: tuple[float, float]
    num_objects: tuple[int, int]
    wall_textures: tuple[str, ...]
    wall_colors: tuple[tuple[RGB, RGB], ...]
    floor_textures: tuple[str, ...]
    floor_colors: tuple[tuple[RGB, RGB], ...]
    ceiling_color: RGB
    kind_weights: tuple[float, ...]
    color_weights: tuple[float, ...]
    large_probability: float
    light_tint: RGB


ROOM_STYLES: dict[str, RoomStyle] = {
    "bedroom": RoomStyle(
        width=(3.0, 4.5),
        depth=(3.5, 5.0),
        height=(2.4, 2.8),
        num_objects=(2, 5),
        wall_textures=("plain", "stripes"),
        wall_colors=(((0.85, 0.76, 0.62), (0.78, 0.66, 0.52)), ((0.66, 0.74, 0.84), (0.58, 0.66, 0.78))),
        floor_textures=("wood", "carpet"),
        floor_colors=(((0.55, 0.36, 0.20), (0.40, 0.25, 0.13)), ((0.62, 0.55, 0.50), (0.50, 0.44, 0.40))),
        ceiling_color=(0.93, 0.91, 0.88),
        kind_weights=(1.5, 2.0, 1.0, 0.5, 1.5),
        color_weights=(1.0, 0.6, 1.2, 0.8, 1.5, 0.6, 0.6, 1.4),
        large_probability=0.5,
        light_tint=(1.0, 0.90, 0.75),
    ),
    "kitchen": RoomStyle(
        width=(2.8, 4.0),
        depth=(3.5, 5.5),
        height=(2.4, 2.7),
        num_objects=(3, 7),
        wall_textures=("tiles", "plain"),
        wall_colors=(((0.93, 0.93, 0.90), (0.70, 0.70, 0.68)), ((0.95, 0.90, 0.75), (0.75, 0.72, 0.62))),
        floor_textures=("checker",),
        floor_colors=(((0.90, 0.90, 0.88), (0.20, 0.20, 0.22)), ((0.80, 0.60, 0.45), (0.65, 0.45, 0.32))),
        ceiling_color=(0.95, 0.95, 0.95),
        kind_weights=(0.8, 1.5, 3.0, 0.8, 1.0),
        color_weights=(1.2, 1.0, 0.6, 1.0, 1.5, 0.8, 1.2, 0.3),
        large_probability=0.35,
        light_tint=(1.0, 1.0, 0.97),
    ),
    "office": RoomStyle(
        width=(3.5, 6.0),
        depth=(4.0, 6.5),
        height=(2.6, 3.0),
        num_objects=(3, 8),
        wall_textures=("plain",),
        wall_colors=(((0.75, 0.76, 0.78), (0.68, 0.69, 0.71)), ((0.70, 0.78, 0.86), (0.62, 0.70, 0.78))),
        floor_textures=("carpet",),
        floor_colors=(((0.35, 0.38, 0.45), (0.25, 0.27, 0.33)), ((0.45, 0.45, 0.45), (0.35, 0.35, 0.36))),
        ceiling_color=(0.92, 0.93, 0.95),
        kind_weights=(0.6, 3.0, 1.5, 0.6, 0.8),
        color_weights=(0.6, 0.8, 1.5, 0.5, 1.2, 1.5, 0.5, 0.5),
        large_probability=0.5,
        light_tint=(0.93, 0.96, 1.0),
    ),
    "living_room": RoomStyle(
        width=(4.0, 6.0),
        depth=(4.5, 7.0),
        height=(2.5, 3.0),
        num_objects=(2, 6),
        wall_textures=("plain", "stripes"),
        wall_colors=(((0.88, 0.80, 0.66), (0.80, 0.70, 0.55)), ((0.72, 0.80, 0.68), (0.62, 0.70, 0.58))),
        floor_textures=("wood",),
        floor_colors=(((0.62, 0.42, 0.24), (0.48, 0.30, 0.16)), ((0.75, 0.60, 0.42), (0.60, 0.46, 0.30))),
        ceiling_color=(0.94, 0.92, 0.88),
        kind_weights=(2.0, 1.5, 1.0, 1.0, 1.0),
        color_weights=(1.2, 1.2, 1.0, 1.0, 0.8, 0.8, 1.2, 1.0),
        large_probability=0.6,
        light_tint=(1.0, 0.92, 0.80),
    ),
    "bathroom": RoomStyle(
        width=(2.4, 3.2),
        depth=(3.0, 4.0),
        height=(2.3, 2.6),
        num_objects=(2, 4),
        wall_textures=("tiles",),
        wall_colors=(((0.90, 0.94, 0.96), (0.60, 0.66, 0.70)), ((0.70, 0.85, 0.90), (0.50, 0.62, 0.66))),
        floor_textures=("tiles", "checker"),
        floor_colors=(((0.85, 0.85, 0.85), (0.55, 0.55, 0.58)), ((0.60, 0.75, 0.80), (0.40, 0.50, 0.55))),
        ceiling_color=(0.96, 0.96, 0.96),
        kind_weights=(1.0, 0.8, 2.0, 0.5, 2.5),
        color_weights=(0.6, 0.8, 1.2, 1.0, 2.0, 0.4, 0.5, 0.8),
        large_probability=0.25,
        light_tint=(0.96, 0.98, 1.0),
    ),
    "classroom": RoomStyle(
        width=(5.0, 7.0),
        depth=(5.5, 7.5),
        height=(2.8, 3.3),
        num_objects=(4, 8),
        wall_textures=("wainscot", "plain"),
        wall_colors=(((0.90, 0.86, 0.62), (0.45, 0.58, 0.40)), ((0.78, 0.86, 0.74), (0.40, 0.52, 0.60))),
        floor_textures=("checker", "carpet"),
        floor_colors=(((0.70, 0.68, 0.60), (0.55, 0.52, 0.45)), ((0.50, 0.45, 0.40), (0.42, 0.38, 0.33))),
        ceiling_color=(0.95, 0.95, 0.92),
        kind_weights=(1.0, 2.0, 1.0, 2.0, 0.8),
        color_weights=(1.2, 1.2, 1.2, 1.2, 0.8, 0.8, 1.0, 1.0),
        large_probability=0.5,
        light_tint=(1.0, 1.0, 0.95),
    ),
}
SCENE_TYPES: tuple[str, ...] = tuple(ROOM_STYLES)  # all are NYUv2 scene names (vpd_hf.prompts.NYU_SCENE_NAMES)


# --------------------------------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Texture:
    """A procedural surface colour, evaluated at surface coordinates (u, v) in metres.

    Kinds: ``plain`` (colour a with soft value-noise blotches), ``checker`` (a/b squares of side `scale`), ``stripes``
    (vertical a/b stripes of period `scale`), ``wood`` (planks `scale` wide running along u, wavy grain between a and b),
    ``tiles`` (tiles of colour a, side `scale`, with grout lines of colour b), ``carpet`` (two octaves of value noise
    between a and b), ``wainscot`` (colour b below 1 m, a above: walls only).

    Attributes:
        kind: one of the kinds above.
        color_a, color_b: display RGB in [0, 1].
        scale: pattern size in metres.
        noise: `(16, 16)` float64 lattice in [0, 1] of the tileable value noise.
        variation: per-plank / per-tile brightness factors, `(64,)` float64.
    """

    kind: str
    color_a: RGB
    color_b: RGB
    scale: float
    noise: np.ndarray
    variation: np.ndarray

    def __call__(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Albedo `(N, 3)` float64 in [0, 1] at the surface coordinates `u`, `v` (each `(N,)`, metres)."""
        a, b = np.asarray(self.color_a), np.asarray(self.color_b)
        s = self.scale
        if self.kind == "plain":
            shade = 0.95 + 0.1 * _value_noise(self.noise, u / 0.6, v / 0.6)
            return a * shade[:, None]
        if self.kind == "checker":
            parity = (np.floor(u / s) + np.floor(v / s)) % 2 == 1
            mix = parity.astype(np.float64)
        elif self.kind == "stripes":
            mix = ((u / s) % 1.0 < 0.5).astype(np.float64)
        elif self.kind == "wood":
            plank = np.floor(v / s).astype(np.int64)
            # Grain: a sine along the plank, bent by noise and shifted per plank, sharpened into dark lines.
            phase = (
                3.0 * (v / s - plank) + 2.0 * _value_noise(self.noise, u / 1.5, v / 0.4) + self.variation[plank % 64]
            )
            mix = 0.7 * np.abs(np.sin(phase * np.pi)) ** 4
            joints = (v / s) % 1.0 < 0.03
            mix = np.where(joints, 1.0, mix)
            base = a * (0.85 + 0.3 * self.variation[plank % 64] / 6.3)[:, None]
            return np.clip(base * (1.0 - mix[:, None]) + b * mix[:, None], 0.0, 1.0)
        elif self.kind == "tiles":
            fu, fv = (u / s) % 1.0, (v / s) % 1.0
            grout = (fu < 0.07) | (fv < 0.07)
            tile = (np.floor(u / s).astype(np.int64) * 7 + np.floor(v / s).astype(np.int64) * 13) % 64
            tint = 0.94 + 0.06 * self.variation[tile] / 6.3
            return np.where(grout[:, None], b, a * tint[:, None])
        elif self.kind == "carpet":
            mix = 0.65 * _value_noise(self.noise, u / 0.05, v / 0.05) + 0.35 * _value_noise(
                self.noise, u / 0.7, v / 0.7
            )
        elif self.kind == "wainscot":
            mix = (v < 1.0).astype(np.float64)
        else:  # pragma: no cover - kinds are validated when sampled
            raise ValueError(f"unknown texture kind {self.kind!r}")
        return a * (1.0 - mix[:, None]) + b * mix[:, None]


def _value_noise(lattice: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Tileable smooth value noise in [0, 1]: the lattice bilinearly interpolated with a smoothstep."""
    n = lattice.shape[0]
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    fx, fy = fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy)
    i0, j0 = x0.astype(np.int64) % n, y0.astype(np.int64) % n
    i1, j1 = (i0 + 1) % n, (j0 + 1) % n
    top = lattice[i0, j0] * (1.0 - fx) + lattice[i1, j0] * fx
    bottom = lattice[i0, j1] * (1.0 - fx) + lattice[i1, j1] * fx
    return top * (1.0 - fy) + bottom * fy


@dataclass(frozen=True)
class Camera:
    """A pinhole camera with the NYUv2 field of view (see the module docstring for the conventions).

    Attributes:
        position: optical centre `(x, y, z)` in world metres; `y` is the camera height above the floor.
        yaw, pitch, roll: radians; positive pitch looks down, positive yaw turns right.
    """

    position: tuple[float, float, float]
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0

    @property
    def rotation(self) -> np.ndarray:
        """World-from-camera rotation `(3, 3)` float64: its columns are the camera's right, down and forward axes."""
        cy, sy = math.cos(self.yaw), math.sin(self.yaw)
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        r_yaw = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
        r_pitch = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
        flip = np.diag([1.0, -1.0, 1.0])  # camera y points down, world y up
        r_roll = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
        return r_yaw @ r_pitch @ flip @ r_roll

    @property
    def forward(self) -> np.ndarray:
        """The optical axis, a unit `(3,)` world vector."""
        return self.rotation[:, 2]

    def world_to_camera(self, points: np.ndarray) -> np.ndarray:
        """Camera-frame coordinates `(..., 3)` of world points `(..., 3)` (metres); the z column is the z-depth."""
        return (np.asarray(points, dtype=np.float64) - np.asarray(self.position)) @ self.rotation


def camera_intrinsics(height: int, width: int) -> tuple[float, float, float, float]:
    """`(fx, fy, cx, cy)` in pixels of the NYUv2 field of view at an output of `height` x `width` pixels."""
    _check_size(height, width)
    return NYU_FX * width / NYU_WIDTH, NYU_FY * height / NYU_HEIGHT, width / 2.0, height / 2.0


def _camera_frame_rays(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column x `(W,)` and per-row y `(H,)` of the camera-frame rays `(x, y, 1)` through the pixel centres."""
    fx, fy, cx, cy = camera_intrinsics(height, width)
    return (np.arange(width) + 0.5 - cx) / fx, (np.arange(height) + 0.5 - cy) / fy


def camera_rays(camera: Camera, height: int, width: int) -> np.ndarray:
    """Unit world directions `(H, W, 3)` float64 of the rays through the pixel centres."""
    x, y = _camera_frame_rays(height, width)
    rays = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.ones((1, 1))), axis=-1)
    rays = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    return rays @ camera.rotation.T


@dataclass(frozen=True)
class SceneObject:
    """A solid resting on the floor, symmetric about its vertical axis (a box may be turned about it by `yaw`).

    Attributes:
        kind: one of :data:`OBJECT_KINDS`.
        color: a name of :data:`COLOR_PALETTE`.
        base: `(x, z)` world position of the centre of its footprint on the floor (metres).
        radius: horizontal radius in metres (sphere, cylinder, cone base, capsule); for a box half its x side.
        height: vertical extent in metres (a sphere's is `2 * radius`; a capsule's includes both caps).
        box_depth: a box's z side in metres (0 for the other kinds).
        yaw: a box's rotation about the vertical axis in radians.
    """

    kind: str
    color: str
    base: tuple[float, float]
    radius: float
    height: float
    box_depth: float = 0.0
    yaw: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in OBJECT_KINDS:
            raise ValueError(f"`kind` must be one of {OBJECT_KINDS}, got {self.kind!r}.")
        if self.color not in COLOR_PALETTE:
            raise ValueError(f"`color` must be one of {tuple(COLOR_PALETTE)}, got {self.color!r}.")
        if not (self.radius > 0 and self.height > 0):
            raise ValueError(f"`radius` and `height` must be > 0, got {self.radius} and {self.height}.")
        if self.kind == "box" and not self.box_depth > 0:
            raise ValueError(f"a box needs `box_depth` > 0, got {self.box_depth}.")
        if self.kind == "sphere" and not math.isclose(self.height, 2 * self.radius, rel_tol=1e-9):
            raise ValueError(f"a sphere's `height` must be 2 * radius = {2 * self.radius}, got {self.height}.")
        if self.kind == "capsule" and self.height < 2 * self.radius:
            raise ValueError(f"a capsule's `height` must be >= 2 * radius = {2 * self.radius}, got {self.height}.")

    @property
    def extent(self) -> float:
        """Largest dimension in metres (what the size class is computed from)."""
        if self.kind == "box":
            return max(2.0 * self.radius, self.height, self.box_depth)
        return max(2.0 * self.radius, self.height)

    @property
    def size(self) -> str:
        """Size class: "large" when :attr:`extent` >= :data:`LARGE_OBJECT_EXTENT`, else "small"."""
        return "large" if self.extent >= LARGE_OBJECT_EXTENT else "small"

    @property
    def footprint_radius(self) -> float:
        """Radius in metres of a vertical cylinder about the base point that contains the object."""
        if self.kind == "box":
            return math.hypot(self.radius, self.box_depth / 2.0)
        return self.radius

    @property
    def center(self) -> tuple[float, float, float]:
        """World centre `(x, y, z)` of the object's bounding box (metres)."""
        return (self.base[0], self.height / 2.0, self.base[1])

    def intersect(self, origin: Sequence[Any], direction: Sequence[np.ndarray]) -> np.ndarray:
        """Distance along unit rays to the first hit beyond a tiny minimum, `inf` where the ray misses.

        Args:
            origin: `(ox, oy, oz)`, scalars or arrays broadcastable with the directions.
            direction: `(dx, dy, dz)` arrays of one shape, unit length.
        """
        ox, oy, oz = (np.asarray(c, dtype=np.float64) for c in origin)
        dx, dy, dz = direction
        # Relative to the footprint centre; every solid's local frame has y = 0 on the floor.
        ox, oz = ox - self.base[0], oz - self.base[1]
        if self.kind == "sphere":
            return _hit_sphere(ox, oy - self.radius, oz, dx, dy, dz, self.radius)
        if self.kind == "box":
            c, s = math.cos(self.yaw), math.sin(self.yaw)
            # Into the box's frame (inverse of the rotation about y by yaw).
            lx, lz = c * ox - s * oz, s * ox + c * oz
            ldx, ldz = c * dx - s * dz, s * dx + c * dz
            half = (self.radius, self.height / 2.0, self.box_depth / 2.0)
            return _hit_box(lx, oy - half[1], lz, ldx, dy, ldz, half)
        if self.kind == "cylinder":
            return _hit_cylinder(ox, oy, oz, dx, dy, dz, self.radius, 0.0, self.height, cap=True)
        if self.kind == "cone":
            return _hit_cone(ox, oy, oz, dx, dy, dz, self.radius, self.height)
        if self.kind == "capsule":
            r, top = self.radius, self.height - self.radius
            t = _hit_cylinder(ox, oy, oz, dx, dy, dz, r, r, top, cap=False)
            t = np.minimum(t, _hit_sphere(ox, oy - r, oz, dx, dy, dz, r))
            return np.minimum(t, _hit_sphere(ox, oy - top, oz, dx, dy, dz, r))
        raise ValueError(f"`kind` must be one of {OBJECT_KINDS}, got {self.kind!r}.")

    def normal(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Outward unit normal `(nx, ny, nz)` at surface points given by world coordinates `x, y, z` (each `(N,)`)."""
        lx, lz = x - self.base[0], z - self.base[1]
        r, h = self.radius, self.height
        if self.kind == "sphere":
            nx, ny, nz = lx, y - r, lz
        elif self.kind == "box":
            c, s = math.cos(self.yaw), math.sin(self.yaw)
            bx, bz = c * lx - s * lz, s * lx + c * lz
            half = np.array([r, h / 2.0, self.box_depth / 2.0])
            scaled = np.abs(np.stack([bx, y - h / 2.0, bz])) / half[:, None]
            axis = np.argmax(scaled, axis=0)
            sign = np.sign(np.stack([bx, y - h / 2.0, bz])[axis, np.arange(axis.size)])
            local = np.zeros((3, axis.size))
            local[axis, np.arange(axis.size)] = sign
            # Back to the world frame (rotation about y by yaw).
            nx, ny, nz = c * local[0] + s * local[2], local[1], -s * local[0] + c * local[2]
        elif self.kind == "cylinder":
            top = np.abs(y - h) < 1e-7
            nx, ny, nz = np.where(top, 0.0, lx), np.where(top, 1.0, 0.0), np.where(top, 0.0, lz)
        elif self.kind == "cone":
            # Gradient of x^2 + z^2 - (r / h)^2 (h - y)^2.
            nx, ny, nz = lx, (r / h) ** 2 * (h - y), lz
        else:  # capsule: away from the nearest point of its axis segment
            nx, ny, nz = lx, y - np.clip(y, r, h - r), lz
        norm = np.sqrt(nx * nx + ny * ny + nz * nz)
        norm = np.where(norm > 0, norm, 1.0)
        return nx / norm, ny / norm, nz / norm


def _quadratic_roots(a: np.ndarray, b_half: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Roots `(t_small, t_large, real)` of `a t^2 + 2 b_half t + c = 0`, computed stably (no cancellation)."""
    disc = b_half * b_half - a * c
    real = disc >= 0.0
    root = np.sqrt(np.where(real, disc, 0.0))
    q = -(b_half + np.where(b_half >= 0.0, root, -root))
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(a != 0.0, q / a, np.inf)
        t2 = np.where(q != 0.0, c / q, np.inf)
    return np.minimum(t1, t2), np.maximum(t1, t2), real


def _hit_sphere(ox, oy, oz, dx, dy, dz, r: float) -> np.ndarray:
    """Sphere of radius `r` at the origin (rays start outside it)."""
    b = ox * dx + oy * dy + oz * dz
    c = ox * ox + oy * oy + oz * oz - r * r
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    return np.where((disc >= 0.0) & (t > _T_MIN), t, np.inf)


def _hit_box(ox, oy, oz, dx, dy, dz, half: tuple[float, float, float]) -> np.ndarray:
    """Axis-aligned box centred at the origin with half sides `half` (slab method)."""
    t_near, t_far = None, None
    with np.errstate(divide="ignore", invalid="ignore"):
        for o, d, h in ((ox, dx, half[0]), (oy, dy, half[1]), (oz, dz, half[2])):
            inv = 1.0 / d
            t1, t2 = (-h - o) * inv, (h - o) * inv
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            t_near = lo if t_near is None else np.maximum(t_near, lo)
            t_far = hi if t_far is None else np.minimum(t_far, hi)
    return np.where((t_near <= t_far) & (t_near > _T_MIN), t_near, np.inf)


def _hit_cylinder(ox, oy, oz, dx, dy, dz, r: float, y0: float, y1: float, cap: bool) -> np.ndarray:
    """Vertical cylinder about the y axis between heights `y0` and `y1`; with `cap`, closed on top."""
    t_lo, t_hi, real = _quadratic_roots(dx * dx + dz * dz, ox * dx + oz * dz, ox * ox + oz * oz - r * r)
    best = np.full(np.broadcast(ox, dx).shape, np.inf)
    for t in (t_hi, t_lo):  # the nearer valid root wins
        y = oy + t * dy
        best = np.where(real & (t > _T_MIN) & (y >= y0) & (y <= y1), t, best)
    if cap:
        with np.errstate(divide="ignore", invalid="ignore"):  # horizontal rays never meet the cap: inf / nan
            t = (y1 - oy) / dy
            px, pz = ox + t * dx, oz + t * dz
        inside = (dy < 0.0) & (t > _T_MIN) & (px * px + pz * pz <= r * r)
        best = np.where(inside, np.minimum(best, t), best)
    return best


def _hit_cone(ox, oy, oz, dx, dy, dz, r: float, h: float) -> np.ndarray:
    """Upright cone with its base disc (radius `r`) on the floor and its apex at height `h` (the base is never seen)."""
    k2 = (r / h) ** 2
    above = h - oy
    a = dx * dx + dz * dz - k2 * dy * dy
    b_half = ox * dx + oz * dz + k2 * above * dy
    c = ox * ox + oz * oz - k2 * above * above
    t_lo, t_hi, real = _quadratic_roots(a, b_half, c)
    best = np.full(np.broadcast(ox, dx).shape, np.inf)
    for t in (t_hi, t_lo):
        y = oy + t * dy  # y within [0, h] keeps the lower nappe of the double cone only
        best = np.where(real & (t > _T_MIN) & (y >= 0.0) & (y <= h), t, best)
    return best


@dataclass(frozen=True, eq=False)
class SceneLayout:
    """Everything that defines one scene, independent of the output resolution.

    Attributes:
        scene: scene type, a key of :data:`ROOM_STYLES`.
        room: `(width, height, depth)` of the room in metres (x, y, z extents).
        camera: the camera.
        light: world position `(x, y, z)` of the point light (metres).
        light_color: RGB multiplier of the light.
        ambient: ambient light level in [0, 1].
        floor, ceiling, wall: surface textures.
        objects: the objects; object k has instance id k + 1.
    """

    scene: str
    room: tuple[float, float, float]
    camera: Camera
    light: tuple[float, float, float]
    light_color: RGB
    ambient: float
    floor: Texture
    ceiling: Texture
    wall: Texture
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RayHits:
    """First hits of a bundle of rays (all arrays share the rays' shape).

    Attributes:
        t: distance along the unit ray in metres, float64.
        surface: room surface hit (0 floor, 1 ceiling, 2 left wall (x = -w/2), 3 right wall, 4 back wall (z = 0),
            5 far wall (z = depth)) or -1 where an object is hit first, int64.
        instance: 1-based index of the object hit, 0 where a room surface is hit, int64.
    """

    t: np.ndarray
    surface: np.ndarray
    instance: np.ndarray


def _hit_room(room: tuple[float, float, float], origin, direction) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance and surface index of rays starting inside the room box (it is convex, so that is the hit)."""
    width, height, depth = room
    ox, oy, oz = origin
    dx, dy, dz = direction
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(dx > 0, (width / 2 - ox) / dx, (-width / 2 - ox) / dx)
        ty = np.where(dy > 0, (height - oy) / dy, -oy / dy)
        tz = np.where(dz > 0, (depth - oz) / dz, -oz / dz)
    tx, ty, tz = (np.where(np.isnan(t) | (t < 0), np.inf, t) for t in (tx, ty, tz))
    surface = np.where(dy > 0, _CEILING, _FLOOR)
    surface = np.where(tx < ty, np.where(dx > 0, _WALL_RIGHT, _WALL_LEFT), surface)
    t = np.minimum(tx, ty)
    surface = np.where(tz < t, np.where(dz > 0, _WALL_FAR, _WALL_BACK), surface)
    return np.minimum(t, tz), surface


def cast_rays(layout: SceneLayout, origins: np.ndarray, directions: np.ndarray) -> RayHits:
    """First hits of arbitrary rays in the scene (a reference path: no screen-space culling).

    Args:
        layout: the scene.
        origins: `(3,)` or `(..., 3)` world points inside the room (metres).
        directions: `(..., 3)` unit world directions.
    """
    origins, directions = np.asarray(origins, dtype=np.float64), np.asarray(directions, dtype=np.float64)
    if directions.ndim < 1 or directions.shape[-1] != 3:
        raise ValueError(f"`directions` must have the shape (..., 3), got {directions.shape}.")
    if origins.shape[-1:] != (3,):
        raise ValueError(f"`origins` must have the shape (3,) or (..., 3), got {origins.shape}.")
    origin, direction = np.moveaxis(origins, -1, 0), np.moveaxis(directions, -1, 0)
    t, surface = _hit_room(layout.room, origin, direction)
    instance = np.zeros(t.shape, dtype=np.int64)
    for k, obj in enumerate(layout.objects, start=1):
        tk = obj.intersect(origin, direction)
        closer = tk < t
        t = np.where(closer, tk, t)
        instance[closer] = k
    return RayHits(t=t, surface=np.where(instance > 0, -1, surface), instance=instance)


# --------------------------------------------------------------------------------------------------------------------
# Sampling a layout
# --------------------------------------------------------------------------------------------------------------------


_TEXTURE_SCALES: dict[str, tuple[float, float]] = {  # pattern size ranges in metres
    "plain": (1.0, 1.0),
    "checker": (0.3, 0.6),
    "stripes": (0.15, 0.4),
    "wood": (0.12, 0.22),
    "tiles": (0.2, 0.35),
    "carpet": (1.0, 1.0),
    "wainscot": (1.0, 1.0),
}


def _make_texture(rng: np.random.Generator, kind: str, colors: tuple[RGB, RGB]) -> Texture:
    scale = rng.uniform(*_TEXTURE_SCALES[kind])
    jitter = rng.uniform(0.93, 1.07, size=3)  # the same style still varies a little in hue and brightness
    a = tuple(float(x) for x in np.clip(np.asarray(colors[0]) * jitter, 0, 1))
    b = tuple(float(x) for x in np.clip(np.asarray(colors[1]) * jitter, 0, 1))
    return Texture(kind, a, b, float(scale), rng.random((16, 16)), rng.uniform(0.0, 6.3, 64))


def _sample_object(rng: np.random.Generator, style: RoomStyle) -> tuple[str, str, float, float, float, float]:
    """Kind, colour, radius, height, box depth and yaw of a new object (its position is drawn separately)."""
    weights = np.asarray(style.kind_weights)
    kind = OBJECT_KINDS[rng.choice(len(OBJECT_KINDS), p=weights / weights.sum())]
    colors = np.asarray(style.color_weights)
    color = tuple(COLOR_PALETTE)[rng.choice(len(COLOR_PALETTE), p=colors / colors.sum())]
    low, high = _LARGE_EXTENTS if rng.random() < style.large_probability else _SMALL_EXTENTS
    extent = rng.uniform(low, high)  # the largest dimension; the others are drawn below it
    box_depth, yaw = 0.0, 0.0
    if kind == "sphere":
        radius, height = extent / 2.0, extent
    elif kind == "box":
        sides = extent * np.array([1.0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)])
        rng.shuffle(sides)
        radius, height, box_depth = sides[0] / 2.0, sides[1], sides[2]
        yaw = rng.uniform(-math.pi / 4, math.pi / 4)
    elif kind == "capsule":
        radius = extent * rng.uniform(0.2, 0.35)
        height = extent
    else:  # cylinder, cone: either tall or squat
        if rng.random() < 0.5:
            height, radius = extent, extent * rng.uniform(0.2, 0.5)
        else:
            height, radius = extent * rng.uniform(0.5, 1.0), extent / 2.0
    return kind, color, float(radius), float(height), float(box_depth), float(yaw)


def sample_layout(rng: np.random.Generator, scene: str | None = None) -> SceneLayout:
    """Draws a random scene from `rng`.

    Args:
        rng: the source of every random choice (the layout is a pure function of its state).
        scene: force a scene type (a key of :data:`ROOM_STYLES`); drawn uniformly when None.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"`rng` must be a numpy.random.Generator, got {type(rng).__name__}.")
    if scene is None:
        scene = SCENE_TYPES[rng.integers(len(SCENE_TYPES))]
    elif scene not in ROOM_STYLES:
        raise ValueError(f"`scene` must be one of {SCENE_TYPES} or None, got {scene!r}.")
    style = ROOM_STYLES[scene]
    width, depth, height = (rng.uniform(*r) for r in (style.width, style.depth, style.height))
    room = (float(width), float(height), float(depth))

    # A hand-held Kinect: near the back wall, roughly level, slightly downwards.
    cam_height = rng.uniform(0.9, 1.6)
    cam_x = rng.uniform(-0.25, 0.25) * width
    cam_z = rng.uniform(0.25, 0.7)
    yaw = math.radians(rng.uniform(-12.0, 12.0))
    pitch = math.radians(rng.uniform(3.0, 20.0))
    roll = math.radians(rng.uniform(-3.0, 3.0))
    camera = Camera((float(cam_x), float(cam_height), float(cam_z)), yaw, pitch, roll)

    wall = _make_texture(
        rng, style.wall_textures[rng.integers(len(style.wall_textures))], _pick(rng, style.wall_colors)
    )
    floor = _make_texture(
        rng, style.floor_textures[rng.integers(len(style.floor_textures))], _pick(rng, style.floor_colors)
    )
    ceiling = _make_texture(rng, "plain", (style.ceiling_color, style.ceiling_color))
    light = (
        float(rng.uniform(-0.3, 0.3) * width),
        float(height - 0.25),
        float(rng.uniform(0.3, 0.7) * depth),
    )
    light_color = tuple(float(c) * rng.uniform(0.9, 1.1) for c in style.light_tint)
    ambient = float(rng.uniform(0.28, 0.4))

    # Objects go where the camera sees the floor: between the nearest visible floor distance and the far wall, within
    # the horizontal field of view (the vertical half-angle plus the pitch gives the nearest visible floor point).
    half_vfov = math.atan(NYU_HEIGHT / 2 / NYU_FY)
    tan_half_hfov = NYU_WIDTH / 2 / NYU_FX
    near_floor = cam_height / math.tan(half_vfov + pitch)
    forward = np.array([math.sin(yaw), math.cos(yaw)])  # (x, z) on the floor
    right = np.array([math.cos(yaw), -math.sin(yaw)])
    count = int(rng.integers(style.num_objects[0], style.num_objects[1] + 1))
    objects: list[SceneObject] = []
    for _ in range(60 * count):  # rejection sampling; a full room leaves fewer objects than drawn, never fewer than 2
        if len(objects) == count:
            break
        kind, color, radius, obj_height, box_depth, obj_yaw = _sample_object(rng, style)
        distance = rng.uniform(max(0.9, 0.75 * near_floor), depth - cam_z - 0.2)
        lateral = rng.uniform(-0.9, 0.9) * distance * tan_half_hfov
        x, z = np.array([cam_x, cam_z]) + distance * forward + lateral * right
        candidate = SceneObject(kind, color, (float(x), float(z)), radius, obj_height, box_depth, obj_yaw)
        reach = candidate.footprint_radius
        inside = (abs(x) + reach < width / 2 - 0.03) and (reach + 0.03 < z < depth - reach - 0.03)
        clear_of_camera = math.hypot(x - cam_x, z - cam_z) > reach + 0.5
        apart = all(math.hypot(x - o.base[0], z - o.base[1]) > reach + o.footprint_radius + 0.05 for o in objects)
        if inside and clear_of_camera and apart:
            objects.append(candidate)
    if len(objects) < 2:  # pragma: no cover - the smallest room holds two objects easily
        raise RuntimeError("could not place two objects; the room styles are too small")
    return SceneLayout(scene, room, camera, light, light_color, ambient, floor, ceiling, wall, tuple(objects))


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[rng.integers(len(options))]


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRecord:
    """What an image shows of one object.

    Attributes:
        instance_id: 1-based id, the value of its pixels in `instances`.
        kind, color, size: attributes (see :data:`OBJECT_KINDS`, :data:`COLOR_PALETTE`, :attr:`SceneObject.size`).
        center: world centre `(x, y, z)` of its bounding box in metres.
        center_camera: the same point in the camera frame; its z is the centre's z-depth.
        extent: largest dimension in metres.
        pixel_count: number of visible pixels.
        bbox: COCO box `(x, y, w, h)` in pixels of the visible pixels (x, y: top-left corner; w, h: size), None if
            the object is not visible.
        centroid: mean `(x, y)` pixel coordinates (pixel centres) of the visible pixels, None if not visible.
    """

    instance_id: int
    kind: str
    color: str
    size: str
    center: tuple[float, float, float]
    center_camera: tuple[float, float, float]
    extent: float
    pixel_count: int
    bbox: tuple[float, float, float, float] | None
    centroid: tuple[float, float] | None

    @property
    def depth(self) -> float:
        """z-depth of the object's centre in metres (what "nearest"/"farthest" compare)."""
        return self.center_camera[2]

    @property
    def visible(self) -> bool:
        """True when at least :data:`MIN_VISIBLE_PIXELS` pixels show the object."""
        return self.pixel_count >= MIN_VISIBLE_PIXELS


@dataclass(frozen=True, eq=False)
class SyntheticScene:
    """One rendered sample.

    Attributes:
        image: `(H, W, 3)` uint8 RGB.
        depth: `(H, W)` float32 z-depth in metres, > 0 everywhere.
        semantic: `(H, W)` uint8 labels of :data:`SYNTHETIC_ID2LABEL` (never 0).
        instances: `(H, W)` uint16, k where object k (1-based) is seen, 0 elsewhere.
        scene: scene type (a key of :data:`ROOM_STYLES`).
        objects: one record per object of the layout, in instance order (including objects out of view).
        referring: for each visible object's instance id, its unambiguous referring expressions, shortest first
            (possibly none).
        layout: the scene description it was rendered from.
    """

    image: np.ndarray
    depth: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray
    scene: str
    objects: tuple[ObjectRecord, ...]
    referring: dict[int, tuple[str, ...]]
    layout: SceneLayout

    @property
    def height(self) -> int:
        return int(self.depth.shape[0])

    @property
    def width(self) -> int:
        return int(self.depth.shape[1])

    @property
    def intrinsics(self) -> np.ndarray:
        """Camera matrix `K` `(3, 3)` float64 in pixels."""
        fx, fy, cx, cy = camera_intrinsics(self.height, self.width)
        return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])

    def mask(self, instance_id: int) -> np.ndarray:
        """Visible pixels `(H, W)` bool of object `instance_id` (1-based)."""
        if not 1 <= instance_id <= len(self.objects):
            raise ValueError(f"`instance_id` must be in [1, {len(self.objects)}], got {instance_id}.")
        return self.instances == instance_id


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}.")


def _screen_rect(obj: SceneObject, camera: Camera, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Pixel rectangle `(row0, row1, col0, col1)` (exclusive ends) that contains the object's image, or None when
    it lies entirely outside the picture. Projects the 8 corners of a box around the object: when they are all in
    front of the camera the projection of the object lies in their 2-D bounding box (perspective maps the convex hull
    to the convex hull), otherwise the whole image is returned."""
    reach = obj.footprint_radius
    xs = obj.base[0] + np.array([-reach, reach])
    zs = obj.base[1] + np.array([-reach, reach])
    corners = np.array(np.meshgrid(xs, [0.0, obj.height], zs, indexing="ij")).reshape(3, -1).T
    cam = camera.world_to_camera(corners)
    if np.any(cam[:, 2] <= 1e-3):
        return 0, height, 0, width
    fx, fy, cx, cy = camera_intrinsics(height, width)
    u = fx * cam[:, 0] / cam[:, 2] + cx
    v = fy * cam[:, 1] / cam[:, 2] + cy
    # Pixel j is sampled at u = j + 0.5; one pixel of slack covers rounding.
    col0, col1 = max(math.floor(u.min() - 0.5) - 1, 0), min(math.ceil(u.max() - 0.5) + 2, width)
    row0, row1 = max(math.floor(v.min() - 0.5) - 1, 0), min(math.ceil(v.max() - 0.5) + 2, height)
    if col0 >= col1 or row0 >= row1:
        return None
    return row0, row1, col0, col1


def render_layout(layout: SceneLayout, height: int, width: int) -> SyntheticScene:
    """Renders `layout` at `height` x `width` pixels: image, z-depth, labels, object records and referring
    expressions (see :class:`SyntheticScene`)."""
    _check_size(height, width)
    camera = layout.camera
    rotation = camera.rotation
    # Camera-frame rays (x, y, 1): their world directions are rotation @ (x, y, 1) and their length 1 / cos(angle to
    # the optical axis), so that a unit ray's distance t converts to z-depth as t / length.
    x_cam, y_cam = _camera_frame_rays(height, width)
    x2, y2 = x_cam[None, :], y_cam[:, None]
    length = np.sqrt(1.0 + x2 * x2 + y2 * y2)
    dx = (rotation[0, 0] * x2 + rotation[0, 1] * y2 + rotation[0, 2]) / length
    dy = (rotation[1, 0] * x2 + rotation[1, 1] * y2 + rotation[1, 2]) / length
    dz = (rotation[2, 0] * x2 + rotation[2, 1] * y2 + rotation[2, 2]) / length
    origin = camera.position

    t, surface = _hit_room(layout.room, origin, (dx, dy, dz))
    instances = np.zeros((height, width), dtype=np.uint16)
    for k, obj in enumerate(layout.objects, start=1):
        rect = _screen_rect(obj, camera, height, width)
        if rect is None:
            continue
        rows, cols = slice(rect[0], rect[1]), slice(rect[2], rect[3])
        tk = obj.intersect(origin, (dx[rows, cols], dy[rows, cols], dz[rows, cols]))
        closer = tk < t[rows, cols]
        t[rows, cols] = np.where(closer, tk, t[rows, cols])  # views: writes go into the full arrays
        instances[rows, cols][closer] = k

    depth = (t / length).astype(np.float32)
    px, py, pz = origin[0] + t * dx, origin[1] + t * dy, origin[2] + t * dz
    image = _shade(layout, px, py, pz, surface, instances)

    labels = np.asarray(_SURFACE_LABELS, dtype=np.uint8)[surface]
    kind_labels = np.array([0] + [SYNTHETIC_LABEL2ID[o.kind] for o in layout.objects], dtype=np.uint8)
    semantic = np.where(instances > 0, kind_labels[instances], labels)

    records = _object_records(layout, instances)
    referring = referring_expressions(records, width)
    return SyntheticScene(image, depth, semantic, instances, layout.scene, records, referring, layout)


def _shade(layout: SceneLayout, px, py, pz, surface: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """Lambertian shading with ambient light and a point light with hard shadows; returns `(H, W, 3)` uint8."""
    shape = px.shape
    albedo = np.empty((*shape, 3))
    normal = np.zeros((3, *shape))
    width = layout.room[0]
    surfaces = np.where(instances > 0, -1, surface)
    # Room surfaces: texture coordinates in metres along the surface, inward normals.
    for index, texture, coords, n in (
        (_FLOOR, layout.floor, (px, pz), (0, 1, 0)),
        (_CEILING, layout.ceiling, (px, pz), (0, -1, 0)),
        (_WALL_LEFT, layout.wall, (pz, py), (1, 0, 0)),
        (_WALL_RIGHT, layout.wall, (pz, py), (-1, 0, 0)),
        (_WALL_BACK, layout.wall, (px + width / 2, py), (0, 0, 1)),
        (_WALL_FAR, layout.wall, (px + width / 2, py), (0, 0, -1)),
    ):
        mask = surfaces == index
        if mask.any():
            albedo[mask] = texture(coords[0][mask], coords[1][mask])
            normal[:, mask] = np.asarray(n, dtype=np.float64)[:, None]
    for k, obj in enumerate(layout.objects, start=1):
        mask = instances == k
        if mask.any():
            x, y, z = px[mask], py[mask], pz[mask]
            normal[:, mask] = np.stack(obj.normal(x, y, z))
            # A faint band pattern keeps curved objects readable without changing their colour name.
            grain = 0.94 + 0.06 * np.cos(18.0 * y)
            albedo[mask] = np.asarray(COLOR_PALETTE[obj.color])[None, :] * grain[:, None]

    lx, ly, lz = (layout.light[i] - p for i, p in enumerate((px, py, pz)))
    distance = np.sqrt(lx * lx + ly * ly + lz * lz)
    lx, ly, lz = lx / distance, ly / distance, lz / distance
    cosine = np.maximum(normal[0] * lx + normal[1] * ly + normal[2] * lz, 0.0)
    lit = cosine > 0.0
    if layout.objects and lit.any():
        # Shadow rays, only for pixels that face the light: blocked when an object lies between point and light.
        start = tuple((p + _SHADOW_OFFSET * normal[i])[lit] for i, p in enumerate((px, py, pz)))
        direction = (lx[lit], ly[lit], lz[lit])
        limit = distance[lit]
        blocked = np.zeros(limit.shape, dtype=bool)
        for obj in layout.objects:
            blocked |= obj.intersect(start, direction) < limit
        visible = np.ones(shape)
        visible[lit] = np.where(blocked, 0.0, 1.0)
        cosine = cosine * visible
    falloff = 1.0 / (1.0 + (distance / 4.5) ** 2)
    light = 1.25 * cosine * falloff
    shading = layout.ambient + light[..., None] * np.asarray(layout.light_color)
    rgb = albedo * shading
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def _object_records(layout: SceneLayout, instances: np.ndarray) -> tuple[ObjectRecord, ...]:
    counts = np.bincount(instances.ravel(), minlength=len(layout.objects) + 1)
    records = []
    for k, obj in enumerate(layout.objects, start=1):
        bbox = centroid = None
        if counts[k]:
            rows, cols = np.nonzero(instances == k)
            bbox = (
                float(cols.min()),
                float(rows.min()),
                float(cols.max() - cols.min() + 1),
                float(rows.max() - rows.min() + 1),
            )
            centroid = (float(cols.mean() + 0.5), float(rows.mean() + 0.5))
        center_camera = layout.camera.world_to_camera(np.asarray(obj.center))
        records.append(
            ObjectRecord(
                instance_id=k,
                kind=obj.kind,
                color=obj.color,
                size=obj.size,
                center=tuple(float(c) for c in obj.center),
                center_camera=tuple(float(c) for c in center_camera),
                extent=float(obj.extent),
                pixel_count=int(counts[k]),
                bbox=bbox,
                centroid=centroid,
            )
        )
    return tuple(records)


# --------------------------------------------------------------------------------------------------------------------
# Referring expressions
# --------------------------------------------------------------------------------------------------------------------

_RELATIONS = (None, "left", "right", "nearest", "farthest")


@dataclass(frozen=True)
class ReferringQuery:
    """A referring expression as a predicate: attribute filters plus an optional spatial relation.

    An object satisfies it when it has every given attribute and, with a relation, beats every *other* visible object
    with those attributes by the margin: for "left" its centroid x is smaller by at least
    :data:`REFERRING_X_MARGIN` x image width ("right" larger), for "nearest" its centre z-depth smaller by at least
    :data:`REFERRING_DEPTH_MARGIN` metres ("farthest" larger). At most one object can satisfy a relation.
    """

    size: str | None = None
    color: str | None = None
    kind: str | None = None
    relation: str | None = None

    def matches_attributes(self, record: ObjectRecord) -> bool:
        return (
            (self.size is None or record.size == self.size)
            and (self.color is None or record.color == self.color)
            and (self.kind is None or record.kind == self.kind)
        )

    def satisfied_by(self, record: ObjectRecord, candidates: Sequence[ObjectRecord], image_width: int) -> bool:
        """Whether `record` satisfies the query among the visible objects `candidates`."""
        if not self.matches_attributes(record):
            return False
        if self.relation is None:
            return True
        others = [c for c in candidates if c.instance_id != record.instance_id and self.matches_attributes(c)]
        if self.relation in ("left", "right"):
            margin = REFERRING_X_MARGIN * image_width
            sign = 1.0 if self.relation == "left" else -1.0
            return all(sign * (o.centroid[0] - record.centroid[0]) >= margin for o in others)
        sign = 1.0 if self.relation == "nearest" else -1.0
        return all(sign * (o.depth - record.depth) >= REFERRING_DEPTH_MARGIN for o in others)

    def text(self, num_matching: int) -> str:
        """The English expression; `num_matching` (objects with the attributes) picks "on the left" (2) or
        "leftmost" (3 or more)."""
        noun = " ".join(w for w in (self.size, self.color, self.kind or "object") if w)
        if self.relation in ("left", "right"):
            return f"the {noun} on the {self.relation}" if num_matching == 2 else f"the {self.relation}most {noun}"
        if self.relation in ("nearest", "farthest"):
            return f"the {self.relation} {noun}"
        return f"the {noun}"


def referring_expressions(records: Sequence[ObjectRecord], image_width: int) -> dict[int, tuple[str, ...]]:
    """Unambiguous referring expressions of every visible object.

    Each candidate expression (any subset of size / colour / kind, with or without a relation) is kept for an object
    only when exactly one visible object -- that one -- satisfies its :class:`ReferringQuery`. A relation is only used
    when at least two visible objects share the attributes (otherwise it would add nothing), an expression needs at
    least one attribute or a relation ("the object" alone says nothing), and an expression is dropped when a kept one
    for the same object is it with some size / colour / relation words removed ("the small red box" goes when "the
    red box" is kept).

    Returns:
        `{instance_id: expressions}` for every visible object, expressions ordered from the shortest.
    """
    visible = [r for r in records if r.visible]
    # Only attribute values that some visible object has can select anything; skipping the rest changes nothing.
    sizes, colors, kinds = ({getattr(r, name) for r in visible} | {None} for name in ("size", "color", "kind"))
    queries = [q for q in _ALL_QUERIES if q.size in sizes and q.color in colors and q.kind in kinds]
    kept: dict[int, list[ReferringQuery]] = {r.instance_id: [] for r in visible}
    for query in queries:
        matching = [r for r in visible if query.matches_attributes(r)]
        if not matching or (query.relation is not None and len(matching) < 2):
            continue
        winners = [r for r in matching if query.satisfied_by(r, visible, image_width)]
        if len(winners) != 1:
            continue
        # Drop padded forms: "the small red box" when "the red box" already works. The noun is exempt ("the red
        # box" stays next to "the red object"), as people name the kind even when the colour alone would do.
        if not any(_is_reduction(shorter, query) for shorter in kept[winners[0].instance_id]):
            kept[winners[0].instance_id].append(query)
    texts: dict[int, tuple[str, ...]] = {}
    for instance_id, instance_queries in kept.items():
        texts[instance_id] = tuple(q.text(sum(q.matches_attributes(r) for r in visible)) for q in instance_queries)
    return texts


def _query_words(query: ReferringQuery) -> int:
    return sum(x is not None for x in (query.size, query.color, query.kind, query.relation))


# Every candidate expression, shortest first so that the redundancy check sees the shorter forms before the longer
# ones (the sort is stable, so the order is fixed). The bare "the object" is left out: it says nothing.
_ALL_QUERIES: tuple[ReferringQuery, ...] = tuple(
    sorted(
        (
            ReferringQuery(size, color, kind, relation)
            for size in (None, "small", "large")
            for color in (None, *COLOR_PALETTE)
            for kind in (None, *OBJECT_KINDS)
            for relation in _RELATIONS
            if not (size is None and color is None and kind is None and relation is None)
        ),
        key=_query_words,
    )
)


def _is_reduction(shorter: ReferringQuery, longer: ReferringQuery) -> bool:
    """Whether `shorter` is `longer` with some of its size / colour / relation dropped (same noun)."""
    return (
        shorter != longer
        and shorter.kind == longer.kind
        and shorter.size in (None, longer.size)
        and shorter.color in (None, longer.color)
        and shorter.relation in (None, longer.relation)
    )


# --------------------------------------------------------------------------------------------------------------------
# Samples and datasets
# --------------------------------------------------------------------------------------------------------------------


def _check_seed(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")


def generate_scene(
    index: int, *, seed: int = 0, split: str = "train", height: int = 128, width: int = 128
) -> SyntheticScene:
    """Sample `index` of split `split` of the dataset with base seed `seed`, rendered at `height` x `width`.

    The sample depends only on `(seed, split, index)` (its generator is `np.random.default_rng([seed, split code,
    index])`), not on which other samples are generated or in which order; the layout (room, camera, objects) is the
    same at every resolution, only the sampling of the picture changes.
    """
    _check_seed("index", index)
    _check_seed("seed", seed)
    if split not in SPLIT_CODES:
        raise ValueError(f"`split` must be one of {tuple(SPLIT_CODES)}, got {split!r}.")
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    return render_layout(sample_layout(rng), height, width)


class SyntheticScenes(Sequence[SyntheticScene]):
    """A lazy, indexable dataset of `num_samples` scenes: `scenes[i] == generate_scene(i, seed=..., split=...)`."""

    def __init__(
        self, num_samples: int, *, seed: int = 0, split: str = "train", height: int = 128, width: int = 128
    ) -> None:
        _check_seed("num_samples", num_samples)
        _check_seed("seed", seed)
        _check_size(height, width)
        if split not in SPLIT_CODES:
            raise ValueError(f"`split` must be one of {tuple(SPLIT_CODES)}, got {split!r}.")
        self.num_samples, self.seed, self.split, self.height, self.width = num_samples, seed, split, height, width

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> SyntheticScene:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("`SyntheticScenes` takes integer indices, not slices.")
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return generate_scene(
            index % self.num_samples, seed=self.seed, split=self.split, height=self.height, width=self.width
        )

    def __iter__(self) -> Iterator[SyntheticScene]:
        return (self[i] for i in range(self.num_samples))


def rle_encode(mask: np.ndarray) -> dict[str, list[int]]:
    """Uncompressed COCO run-length encoding of a binary mask.

    The mask `(H, W)` (any dtype; non-zero = foreground) is read in column-major (Fortran) order -- down the first
    column, then the second... -- and cut into runs of equal values; `counts` lists the run lengths, alternating
    background and foreground and always starting with background (a leading 0 when the first pixel is foreground).
    This is the `{"size": [H, W], "counts": [...]}` form that `pycocotools.mask.frPyObjects` accepts.

    Example: `[[0, 1], [1, 1]]` reads 0, 1, 1, 1 and encodes as `{"size": [2, 2], "counts": [1, 3]}`.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be a 2-D array (H, W), got shape {mask.shape}.")
    flat = mask.ravel(order="F") != 0
    if flat.size == 0:
        counts: list[int] = []
    else:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(np.concatenate(([0], change, [flat.size])))
        counts = ([0] if flat[0] else []) + runs.tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: the `(H, W)` bool mask of an uncompressed COCO RLE dict."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise TypeError(f"`rle` must be a dict with 'size' and 'counts', got {type(rle).__name__}.")
    if isinstance(rle["counts"], str | bytes):
        raise ValueError("`rle['counts']` is compressed (a string); only uncompressed run lengths are supported.")
    size = [int(s) for s in rle["size"]]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if len(size) != 2 or min(size) < 0:
        raise ValueError(f"`rle['size']` must be [H, W] with H, W >= 0, got {rle['size']}.")
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != size[0] * size[1]:
        raise ValueError(f"`rle['counts']` must be non-negative run lengths summing to H * W = {size[0] * size[1]}.")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(size, order="F")


def scene_features() -> datasets.Features:
    """Columns of the `scenes` configuration: `image` (RGB), `depth_map` (mode "F", z-depth in metres),
    `annotation` (mode "L", :data:`SYNTHETIC_ID2LABEL`), `scene`, `instance_mask` (mode "I;16") and `objects` (one
    struct per object; `bbox` is [] for an object out of view, `center_camera` in metres)."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "depth_map": datasets.Image(),
            "annotation": datasets.Image(),
            "scene": datasets.Value("string"),
            "instance_mask": datasets.Image(),
            "objects": datasets.List(
                {
                    "instance_id": datasets.Value("int32"),
                    "kind": datasets.Value("string"),
                    "color": datasets.Value("string"),
                    "size": datasets.Value("string"),
                    "pixel_count": datasets.Value("int32"),
                    "bbox": datasets.List(datasets.Value("float32")),
                    "center_camera": datasets.List(datasets.Value("float32")),
                }
            ),
        }
    )


def refcoco_columns() -> dict[str, Any]:
    """The columns every referring dataset here shares (the RefCOCO layout): `image`, `answer` (the expressions),
    `segmentation` (uncompressed COCO RLE, see :func:`rle_encode`), `bbox` (COCO [x, y, w, h]), `image_id`, `ref_id`."""
    import datasets

    return {
        "image": datasets.Image(),
        "answer": datasets.List(datasets.Value("string")),
        "segmentation": {
            "size": datasets.List(datasets.Value("int32")),
            "counts": datasets.List(datasets.Value("int64")),
        },
        "bbox": datasets.List(datasets.Value("float32")),
        "image_id": datasets.Value("int64"),
        "ref_id": datasets.Value("int64"),
    }


def referring_features() -> datasets.Features:
    """Columns of the `referring` configuration: those of :func:`refcoco_columns` (`image_id` is the row of the image
    in the same split of `scenes`), then `scene`, `instance_id` (its value in `instance_mask`) and `category` (its
    kind)."""
    import datasets

    extra = {"scene": datasets.Value("string"), "instance_id": datasets.Value("int32"),
             "category": datasets.Value("string")}  # fmt: skip
    return datasets.Features({**refcoco_columns(), **extra})


def _scene_row(sample: SyntheticScene) -> dict[str, Any]:
    return {
        "image": Image.fromarray(sample.image),
        "depth_map": Image.fromarray(sample.depth),  # mode "F"; datasets stores it as a float32 TIFF
        "annotation": Image.fromarray(sample.semantic),  # mode "L"
        "scene": sample.scene,
        # Mode "I;16". Encoded here as a 16-bit PNG: datasets would pick an uncompressed TIFF, ~50x larger.
        "instance_mask": {"bytes": _png_bytes(Image.fromarray(sample.instances)), "path": None},
        "objects": [
            {
                "instance_id": r.instance_id,
                "kind": r.kind,
                "color": r.color,
                "size": r.size,
                "pixel_count": r.pixel_count,
                "bbox": [] if r.bbox is None else list(r.bbox),
                "center_camera": list(r.center_camera),
            }
            for r in sample.objects
        ],
    }


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _referring_rows(sample: SyntheticScene, image_id: int, first_ref_id: int) -> list[dict[str, Any]]:
    rows = []
    image = Image.fromarray(sample.image)
    for record in sample.objects:
        expressions = sample.referring.get(record.instance_id, ())
        if not expressions:
            continue
        rows.append(
            {
                "image": image,
                "answer": list(expressions),
                "segmentation": rle_encode(sample.instances == record.instance_id),
                "bbox": list(record.bbox),
                "image_id": image_id,
                "ref_id": first_ref_id + len(rows),
                "scene": sample.scene,
                "instance_id": record.instance_id,
                "category": record.kind,
            }
        )
    return rows


def _check_counts(num_train: int, num_validation: int) -> None:
    _check_seed("num_train", num_train)
    _check_seed("num_validation", num_validation)


def _iter_split_rows(
    split: str, num_samples: int, seed: int, height: int, width: int, progress: bool
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """`(scene row, referring rows)` for every sample of a split; `image_id` is the sample index."""
    ref_id = 0
    samples = range(num_samples)
    for index in tqdm(samples, desc=f"synthetic {split}", unit="img", disable=not progress):
        sample = generate_scene(index, seed=seed, split=split, height=height, width=width)
        refs = _referring_rows(sample, index, ref_id)
        ref_id += len(refs)
        yield _scene_row(sample), refs


def _rows_to_dataset(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    import datasets

    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def make_synthetic_dataset(
    num_train: int = 100,
    num_validation: int = 20,
    height: int = 128,
    width: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, datasets.DatasetDict]:
    """The synthetic dataset in memory: `{"scenes": DatasetDict, "referring": DatasetDict}`, each with the splits
    `train` and `validation` (columns: see :func:`scene_features`, :func:`referring_features` and the README written
    by :func:`save_synthetic_dataset`)."""
    import datasets

    _check_counts(num_train, num_validation)
    _check_seed("seed", seed)
    _check_size(height, width)
    scenes, referring = {}, {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        scene_rows, ref_rows = [], []
        for scene_row, refs in _iter_split_rows(split, count, seed, height, width, progress):
            scene_rows.append(scene_row)
            ref_rows.extend(refs)
        scenes[split] = _rows_to_dataset(scene_rows, scene_features())
        referring[split] = _rows_to_dataset(ref_rows, referring_features())
    return {"scenes": datasets.DatasetDict(scenes), "referring": datasets.DatasetDict(referring)}


_README = """---
configs:
- config_name: scenes
  data_files:
  - split: train
    path: scenes/train-*.parquet
  - split: validation
    path: scenes/validation-*.parquet
- config_name: referring
  data_files:
  - split: train
    path: referring/train-*.parquet
  - split: validation
    path: referring/validation-*.parquet
---
# vpd_hf synthetic indoor scenes

Procedural box rooms with 2 to 8 objects on the floor, rendered by `vpd_hf.data.synthetic` (NumPy ray casting)
at {height} x {width} pixels with seed {seed}: {num_train} training and {num_validation} validation images;
{refs_train} training and {refs_validation} validation referring rows. Regenerate with

    python -m vpd_hf.data.synthetic --output DIR --num-train {num_train} --num-validation {num_validation} \\
        --height {height} --width {width} --seed {seed}

Load with `datasets.load_dataset("parquet", data_dir=DIR + "/scenes")` (or `/referring`), or, once uploaded,
`datasets.load_dataset(REPO, "scenes")`. (`load_dataset(DIR, "scenes")` also works, but datasets caches local folders
of that form by folder name: two local copies with the same name would share one cache.)

## `scenes`: one row per image (NYUv2 `sayakpaul/nyu_depth_v2` + ADE20K `scene_parse_150` layouts)

| column | type | content |
|---|---|---|
| `image` | Image (RGB) | the picture |
| `depth_map` | Image (mode "F", float32 TIFF) | z-depth in metres (along the optical axis), > 0 everywhere |
| `annotation` | Image (mode "L") | semantic labels, see `id2label.json`; 0 = other (unused) |
| `scene` | string | room type: {scene_types} |
| `instance_mask` | Image (mode "I;16", 16-bit PNG) | k = object k (1-based), 0 = no object |
| `objects` | list of structs | per object: `instance_id`, `kind`, `color`, `size` (small/large), `pixel_count`, `bbox` ([x, y, w, h] pixels, [] if not visible), `center_camera` ([x, y, z] metres in the camera frame: x right, y down, z forward) |

Camera: NYUv2 Kinect field of view, fx = 518.8579 * W / 640, fy = 519.4696 * H / 480, principal point (W / 2, H / 2).

## `referring`: one row per object with at least one unambiguous expression (`lmms-lab/RefCOCO` layout)

| column | type | content |
|---|---|---|
| `image` | Image (RGB) | the picture |
| `answer` | list of strings | referring expressions, each satisfied by exactly this one visible object |
| `segmentation` | {{"size": [H, W], "counts": [...]}} | the object's visible mask as uncompressed COCO RLE: run lengths over the mask in column-major (Fortran) order, alternating background / foreground, starting with background |
| `bbox` | list of float32 | COCO box [x, y, w, h] in pixels |
| `image_id` | int64 | index of the image in the same split of `scenes` |
| `ref_id` | int64 | index of the referent within the split |
| `scene` | string | room type |
| `instance_id` | int32 | the object's value in that image's `instance_mask` |
| `category` | string | the object's kind |
"""


def save_synthetic_dataset(
    output_dir: str | Path,
    num_train: int = 100,
    num_validation: int = 20,
    height: int = 128,
    width: int = 128,
    seed: int = 0,
    shard_size: int = 1000,
    progress: bool = True,
) -> Path:
    """Writes the synthetic dataset as parquet under `output_dir`, in shards of `shard_size` images:

    * `scenes/{train,validation}-XXXXX-of-YYYYY.parquet` (columns: :func:`scene_features`),
    * `referring/{train,validation}-XXXXX-of-YYYYY.parquet` (columns: :func:`referring_features`; shard k holds the
      referents of the images of scenes shard k),
    * `id2label.json` (the semantic classes) and `README.md` (the columns, plus a `configs` header so that
      `datasets.load_dataset(output_dir, "scenes")` works).

    Returns:
        `output_dir` as a Path.
    """
    _check_counts(num_train, num_validation)
    _check_seed("seed", seed)
    _check_size(height, width)
    _check_seed("shard_size", shard_size)
    if shard_size < 1:
        raise ValueError(f"`shard_size` must be >= 1, got {shard_size}.")
    output_dir = Path(output_dir)
    for config in ("scenes", "referring"):
        (output_dir / config).mkdir(parents=True, exist_ok=True)
        for stale in (output_dir / config).glob("*.parquet"):  # a smaller rerun must not leave old shards behind
            stale.unlink()
    ref_counts = {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        num_shards = max(1, math.ceil(count / shard_size))
        rows = _iter_split_rows(split, count, seed, height, width, progress)
        ref_counts[split] = 0
        for shard in range(num_shards):
            scene_rows, ref_rows = [], []
            for _ in range(min(shard_size, count - shard * shard_size)):
                scene_row, refs = next(rows)
                scene_rows.append(scene_row)
                ref_rows.extend(refs)
            name = f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
            _rows_to_dataset(scene_rows, scene_features()).to_parquet(str(output_dir / "scenes" / name))
            _rows_to_dataset(ref_rows, referring_features()).to_parquet(str(output_dir / "referring" / name))
            ref_counts[split] += len(ref_rows)
    (output_dir / "id2label.json").write_text(
        json.dumps({str(k): v for k, v in SYNTHETIC_ID2LABEL.items()}, indent=2) + "\n"
    )
    readme = _README.format(
        height=height,
        width=width,
        seed=seed,
        num_train=num_train,
        num_validation=num_validation,
        refs_train=ref_counts["train"],
        refs_validation=ref_counts["validation"],
        scene_types=", ".join(SCENE_TYPES),
    )
    (output_dir / "README.md").write_text(readme)
    return output_dir


def main(argv: Sequence[str] | None = None, prog: str = "python -m vpd_hf.data.synthetic") -> Path:
    """Command line: `python -m vpd_hf.data.synthetic --output DIR ...` (see `--help`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Render the offline synthetic indoor-scene dataset (depth, semantic and referring segmentation) "
        "and write it as parquet.",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write scenes/, referring/ and README.md")
    parser.add_argument("--num-train", type=int, default=100, help="number of training images (default: 100)")
    parser.add_argument("--num-validation", type=int, default=20, help="number of validation images (default: 20)")
    parser.add_argument("--height", type=int, default=128, help="image height in pixels (default: 128)")
    parser.add_argument("--width", type=int, default=128, help="image width in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample i uses (seed, split, i) (default: 0)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per parquet file (default: 1000)")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    args = parser.parse_args(argv)
    try:
        return save_synthetic_dataset(
            args.output,
            num_train=args.num_train,
            num_validation=args.num_validation,
            height=args.height,
            width=args.width,
            seed=args.seed,
            shard_size=args.shard_size,
            progress=not args.no_progress,
        )
    except (TypeError, ValueError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
