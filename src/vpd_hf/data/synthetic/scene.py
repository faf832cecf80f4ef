"""Scene sampling of the synthetic dataset: constants, room styles, procedural textures, the objects and
:func:`sample_layout`, which draws a whole :class:`SceneLayout` from a random generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .raycast import NYU_FX, NYU_FY, NYU_HEIGHT, NYU_WIDTH, Camera, _hit_box, _hit_cone, _hit_cylinder, _hit_sphere

# --------------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------------

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
