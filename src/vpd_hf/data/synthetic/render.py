"""Shading and labels of the synthetic scenes: :func:`render_layout` casts one ray per pixel and returns the picture,
z-depth, exact surface normals, semantic and instance labels and the per-object records."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .raycast import (
    _CEILING,
    _FLOOR,
    _WALL_BACK,
    _WALL_FAR,
    _WALL_LEFT,
    _WALL_RIGHT,
    _camera_frame_rays,
    _check_size,
    _hit_room,
    _screen_rect,
    camera_intrinsics,
)
from .referring import referring_expressions
from .scene import COLOR_PALETTE, MIN_VISIBLE_PIXELS, SYNTHETIC_LABEL2ID, SceneLayout

_SURFACE_LABELS = (2, 3, 1, 1, 1, 1)  # floor, ceiling, left wall, right wall, back wall, far wall
_SHADOW_OFFSET = 1e-4  # shadow rays leave the surface along its normal by this much to avoid self-shadowing acne


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
        normals: `(H, W, 3)` float32 unit surface normals in Marigold's camera frame (+x right, +y up, +z towards the
            camera, see :func:`camera_normals`): the exact normal of the surface each pixel's ray hits (closed form
            per primitive at the hit point, not differences of depth), facing the camera.
    """

    image: np.ndarray
    depth: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray
    scene: str
    objects: tuple[ObjectRecord, ...]
    referring: dict[int, tuple[str, ...]]
    layout: SceneLayout
    normals: np.ndarray

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
    world_normals = _world_normals(layout, px, py, pz, surface, instances)
    image = _shade(layout, px, py, pz, surface, instances, world_normals)
    normals = camera_normals(world_normals, rotation)

    labels = np.asarray(_SURFACE_LABELS, dtype=np.uint8)[surface]
    kind_labels = np.array([0] + [SYNTHETIC_LABEL2ID[o.kind] for o in layout.objects], dtype=np.uint8)
    semantic = np.where(instances > 0, kind_labels[instances], labels)

    records = _object_records(layout, instances)
    referring = referring_expressions(records, width)
    return SyntheticScene(image, depth, semantic, instances, layout.scene, records, referring, layout, normals)


# Inward normals of the room surfaces in the world frame, in the order of `RayHits.surface` (the camera is inside).
_ROOM_NORMALS = np.array([(0, 1, 0), (0, -1, 0), (1, 0, 0), (-1, 0, 0), (0, 0, 1), (0, 0, -1)], dtype=np.float64)


def _world_normals(layout: SceneLayout, px, py, pz, surface: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """Exact unit normals `(3, H, W)` float64 (world frame) of the surfaces the rays hit at the points `px, py, pz`:
    the room's inward normals, the objects' outward normals (:meth:`SceneObject.normal`, closed form per solid)."""
    normal = np.moveaxis(_ROOM_NORMALS[surface], -1, 0).copy()
    for k, obj in enumerate(layout.objects, start=1):
        mask = instances == k
        if mask.any():
            normal[:, mask] = np.stack(obj.normal(px[mask], py[mask], pz[mask]))
    return normal


def camera_normals(world_normals: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """World-frame normals `(3, ...)` -> `(..., 3)` float32 in Marigold's camera frame: +x right, +y up, +z towards
    the camera (diffusers' `MarigoldNormalsPipeline`). `rotation` is the world-from-camera rotation `(3, 3)` of
    :attr:`Camera.rotation`, whose columns are the OpenCV camera axes (right, down, forward): the OpenCV components
    are `rotation.T @ n`, and Marigold's frame is OpenCV's with y and z negated."""
    opencv = np.tensordot(rotation.T, world_normals, axes=1)
    marigold = np.stack([opencv[0], -opencv[1], -opencv[2]], axis=-1)
    return marigold.astype(np.float32)


def _shade(
    layout: SceneLayout, px, py, pz, surface: np.ndarray, instances: np.ndarray, normal: np.ndarray
) -> np.ndarray:
    """Lambertian shading with ambient light and a point light with hard shadows; returns `(H, W, 3)` uint8.
    `normal`: the world normals `(3, H, W)` of :func:`_world_normals`."""
    shape = px.shape
    albedo = np.empty((*shape, 3))
    width = layout.room[0]
    surfaces = np.where(instances > 0, -1, surface)
    # Room surfaces: texture coordinates in metres along the surface.
    for index, texture, coords in (
        (_FLOOR, layout.floor, (px, pz)),
        (_CEILING, layout.ceiling, (px, pz)),
        (_WALL_LEFT, layout.wall, (pz, py)),
        (_WALL_RIGHT, layout.wall, (pz, py)),
        (_WALL_BACK, layout.wall, (px + width / 2, py)),
        (_WALL_FAR, layout.wall, (px + width / 2, py)),
    ):
        mask = surfaces == index
        if mask.any():
            albedo[mask] = texture(coords[0][mask], coords[1][mask])
    for k, obj in enumerate(layout.objects, start=1):
        mask = instances == k
        if mask.any():
            # A faint band pattern keeps curved objects readable without changing their colour name.
            grain = 0.94 + 0.06 * np.cos(18.0 * py[mask])
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
