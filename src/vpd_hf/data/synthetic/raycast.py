"""Ray casting of the synthetic scenes: the pinhole camera, its rays, and exact ray-surface intersections of the room
box and the object primitives (see :mod:`vpd_hf.data.synthetic` for the frames and units)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .scene import SceneLayout, SceneObject

NYU_WIDTH, NYU_HEIGHT = 640, 480
NYU_FX, NYU_FY = 518.8579, 519.4696  # the Kinect colour camera's focal lengths in pixels at 640 x 480

# Room surfaces, in the order of :attr:`RayHits.surface`.
_FLOOR, _CEILING, _WALL_LEFT, _WALL_RIGHT, _WALL_BACK, _WALL_FAR = range(6)
_T_MIN = 1e-6  # rays start on surfaces (shadow rays): ignore hits closer than this


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}.")


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
