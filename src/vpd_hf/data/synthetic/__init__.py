"""Offline procedural indoor scenes with exact geometry, for demos, tests and CPU benchmarks of all three VPD tasks.

Real datasets (NYUv2, ADE20K, RefCOCO) need a download; this module renders, in pure NumPy, a box-shaped room
(floor, four walls, ceiling) with procedural textures and 2 to 8 simple objects resting on the floor, seen by a
pinhole camera with the NYUv2 Kinect's field of view, and returns for every image an RGB picture, an exact metric
z-depth map, exact surface normals, an ADE20K-style semantic label map, an instance map, a scene type and referring
expressions that are checked to be unambiguous. :func:`save_synthetic_dataset` writes it as parquet in the column layouts of the Hub's
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
* **Normals** are in diffusers' Marigold camera frame (+x right, +y up, +z towards the camera; OpenCV's frame with y
  and z negated): for each pixel the exact normal of the surface its ray hits, in closed form at the hit point (planes,
  box faces, sphere / cylinder / cone / capsule gradients), not differences of depth; they all face the camera.
* **Labels** follow the ADE20K (`scene_parse_150`) layout: 0 = "other" (never used here), 1..N the classes of
  :data:`SYNTHETIC_ID2LABEL`. Instance k (1-based) is ``objects[k - 1]``; 0 = no object.

Every random choice of sample ``i`` comes from ``np.random.default_rng([seed, split_code, i])``, so a sample is the
same whichever samples are generated with it and in which order, and train / validation images never coincide.

Modules, by concern: :mod:`.scene` (constants, room styles, textures, objects, :func:`sample_layout`),
:mod:`.raycast` (camera, rays, exact intersections), :mod:`.render` (shading, depth, normals and labels),
:mod:`.referring` (referring expressions) and :mod:`.dataset` (samples, parquet layouts, command line); every public
name is importable from here.
"""

from __future__ import annotations

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
    "camera_normals",
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

from .dataset import (
    SPLIT_CODES,
    SyntheticScenes,
    generate_scene,
    main,
    make_synthetic_dataset,
    refcoco_columns,
    referring_features,
    rle_decode,
    rle_encode,
    save_synthetic_dataset,
    scene_features,
)
from .raycast import NYU_FX, NYU_FY, Camera, RayHits, camera_intrinsics, camera_rays, cast_rays
from .referring import ReferringQuery, referring_expressions
from .render import ObjectRecord, SyntheticScene, camera_normals, render_layout
from .scene import (
    COLOR_PALETTE,
    LARGE_OBJECT_EXTENT,
    MIN_VISIBLE_PIXELS,
    OBJECT_KINDS,
    REFERRING_DEPTH_MARGIN,
    REFERRING_X_MARGIN,
    ROOM_STYLES,
    SCENE_TYPES,
    SYNTHETIC_ID2LABEL,
    SYNTHETIC_LABEL2ID,
    RoomStyle,
    SceneLayout,
    SceneObject,
    Texture,
    sample_layout,
)
