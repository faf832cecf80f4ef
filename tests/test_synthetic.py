"""The procedural synthetic-scene dataset: geometry against closed-form answers, label consistency, determinism,
referring expressions re-checked independently, COCO RLE, parquet round trip and the command line."""

import dataclasses
import io
import json
import math
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vpd_hf.data.normals import decode_normals
from vpd_hf.data.synthetic import (
    COLOR_PALETTE,
    LARGE_OBJECT_EXTENT,
    MIN_VISIBLE_PIXELS,
    OBJECT_KINDS,
    REFERRING_DEPTH_MARGIN,
    REFERRING_X_MARGIN,
    SCENE_TYPES,
    SYNTHETIC_ID2LABEL,
    Camera,
    ObjectRecord,
    SceneObject,
    SyntheticScenes,
    camera_rays,
    cast_rays,
    generate_scene,
    main,
    make_synthetic_dataset,
    referring_expressions,
    render_layout,
    rle_decode,
    rle_encode,
    sample_layout,
    save_synthetic_dataset,
)

WALL, FLOOR, CEILING = 1, 2, 3
KIND_LABEL = {"sphere": 4, "box": 5, "cylinder": 6, "cone": 7, "capsule": 8}


def camera_axes(yaw, pitch, roll):
    """Right, down and forward unit world vectors of a camera, written out from the angles: yaw turns the level
    camera (forward +z) towards +x, pitch tilts it down, roll turns the image about the optical axis."""
    forward = np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    level_right = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    level_down = np.array([-math.sin(pitch) * math.sin(yaw), -math.cos(pitch), -math.sin(pitch) * math.cos(yaw)])
    right = math.cos(roll) * level_right + math.sin(roll) * level_down
    down = -math.sin(roll) * level_right + math.cos(roll) * level_down
    return right, down, forward


def nyu_intrinsics(height, width):
    return 518.8579 * width / 640, 519.4696 * height / 480, width / 2, height / 2


def pixel_rays(camera, height, width):
    """World rays `(H, W, 3)` through the pixel centres, scaled so that their component along the optical axis is 1
    (a point at z-depth Z along the ray is `origin + Z * ray`)."""
    fx, fy, cx, cy = nyu_intrinsics(height, width)
    x = (np.arange(width) + 0.5 - cx) / fx
    y = (np.arange(height) + 0.5 - cy) / fy
    right, down, forward = camera_axes(camera.yaw, camera.pitch, camera.roll)
    return x[None, :, None] * right + y[:, None, None] * down + forward


def empty_room(seed=0, camera=None):
    layout = sample_layout(np.random.default_rng(seed))
    return dataclasses.replace(layout, objects=(), camera=camera or layout.camera)


# --------------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_empty_room_depth_and_labels_match_plane_intersections(seed):
    layout = empty_room(seed)
    height, width = 36, 52
    scene = render_layout(layout, height, width)
    room_w, room_h, room_d = layout.room
    origin = np.asarray(layout.camera.position)
    rays = pixel_rays(layout.camera, height, width)
    with np.errstate(divide="ignore", invalid="ignore"):
        candidates = np.stack(
            [
                np.where(rays[..., 1] < 0, -origin[1] / rays[..., 1], np.inf),  # floor y = 0
                np.where(rays[..., 1] > 0, (room_h - origin[1]) / rays[..., 1], np.inf),  # ceiling
                np.where(rays[..., 0] < 0, (-room_w / 2 - origin[0]) / rays[..., 0], np.inf),
                np.where(rays[..., 0] > 0, (room_w / 2 - origin[0]) / rays[..., 0], np.inf),
                np.where(rays[..., 2] < 0, -origin[2] / rays[..., 2], np.inf),
                np.where(rays[..., 2] > 0, (room_d - origin[2]) / rays[..., 2], np.inf),
            ]
        )
    expected = candidates.min(axis=0)
    assert scene.depth.dtype == np.float32 and scene.depth.shape == (height, width)
    np.testing.assert_allclose(scene.depth, expected, rtol=2e-7)
    labels = np.array([FLOOR, CEILING, WALL, WALL, WALL, WALL])[candidates.argmin(axis=0)]
    two_smallest = np.sort(candidates, axis=0)[:2]
    clear = two_smallest[1] - two_smallest[0] > 1e-9 * two_smallest[0]  # not on an edge of the room
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(scene.semantic[clear], labels[clear])
    assert (scene.instances == 0).all()


def test_floor_depth_at_the_bottom_centre_from_height_and_pitch():
    checked = 0
    for index in range(12):
        scene = generate_scene(index, seed=3, height=48, width=64)
        row, col = 47, 32
        if scene.instances[row, col]:
            continue
        camera = scene.layout.camera
        fx, fy, cx, cy = nyu_intrinsics(48, 64)
        x, y = (col + 0.5 - cx) / fx, (row + 0.5 - cy) / fy
        # The camera-frame ray (x, y, 1): rolled into the level-less frame, its downward world component per metre
        # of z-depth is (x sin(roll) + y cos(roll)) cos(pitch) + sin(pitch); the floor is `height` metres below.
        drop = (x * math.sin(camera.roll) + y * math.cos(camera.roll)) * math.cos(camera.pitch) + math.sin(camera.pitch)
        assert scene.semantic[row, col] == FLOOR
        assert scene.depth[row, col] == pytest.approx(camera.position[1] / drop, rel=1e-6)
        checked += 1
    assert checked >= 6


def test_wall_depth_at_known_distances_for_a_level_camera():
    camera = Camera((0.3, 1.2, 0.5))
    layout = empty_room(4, camera)
    room_w, _, room_d = layout.room
    height, width = 40, 56
    scene = render_layout(layout, height, width)
    fx, _, cx, _ = nyu_intrinsics(height, width)
    x = (np.arange(width) + 0.5 - cx) / fx
    far_wall = np.zeros((height, width), dtype=bool)
    for col in range(width):
        # A level camera looking along +z: column j meets the far wall at z-depth (depth - z0) unless a side wall,
        # at z-depth (w / 2 -+ x0) / |x|, comes first; rows only decide between walls and floor / ceiling.
        side = (room_w / 2 - math.copysign(camera.position[0], x[col])) / abs(x[col])
        far = room_d - camera.position[2]
        walls = scene.semantic[:, col] == WALL
        assert walls.any()
        np.testing.assert_allclose(scene.depth[walls, col], min(side, far), rtol=2e-7)
        far_wall[walls, col] = far < side
    assert far_wall.sum() > 100
    np.testing.assert_allclose(scene.depth[far_wall], room_d - camera.position[2], rtol=2e-7)


def test_z_depth_is_ray_length_times_cosine_and_reprojects_to_the_pixel():
    scene = generate_scene(5, seed=2, height=30, width=40)
    layout, camera = scene.layout, scene.layout.camera
    rays = camera_rays(camera, 30, 40)
    np.testing.assert_allclose(np.linalg.norm(rays, axis=-1), 1.0, rtol=1e-12)
    hits = cast_rays(layout, np.asarray(camera.position), rays)
    _, _, forward = camera_axes(camera.yaw, camera.pitch, camera.roll)
    np.testing.assert_allclose(scene.depth, hits.t * (rays @ forward), rtol=2e-7)
    assert (hits.t * (rays @ forward) < hits.t).all()  # z-depth is shorter than the ray everywhere off-axis
    # The screen-space culling of the renderer and the plain reference path agree on what is seen.
    np.testing.assert_array_equal(scene.instances, hits.instance)
    points = np.asarray(camera.position) + hits.t[..., None] * rays
    right, down, _ = camera_axes(camera.yaw, camera.pitch, camera.roll)
    rel = points - np.asarray(camera.position)
    fx, fy, cx, cy = nyu_intrinsics(30, 40)
    z = rel @ forward
    np.testing.assert_allclose(fx * (rel @ right) / z + cx, np.broadcast_to(np.arange(40) + 0.5, (30, 40)), atol=1e-9)
    np.testing.assert_allclose(fy * (rel @ down) / z + cy, np.broadcast_to(np.arange(30)[:, None] + 0.5, (30, 40)))
    assert np.allclose(scene.intrinsics, [[fx, 0, cx], [0, fy, cy], [0, 0, 1]])


def test_intrinsics_keep_the_nyu_field_of_view_at_any_resolution():
    for height, width in ((480, 640), (24, 32), (64, 64)):
        scene = render_layout(empty_room(0), height, width)
        fx, fy, cx, cy = scene.intrinsics[0, 0], scene.intrinsics[1, 1], scene.intrinsics[0, 2], scene.intrinsics[1, 2]
        assert math.degrees(2 * math.atan(cx / fx)) == pytest.approx(63.3, abs=0.1)
        assert math.degrees(2 * math.atan(cy / fy)) == pytest.approx(49.6, abs=0.1)
    # The same scene at two resolutions: the centre of the picture shows the same surface at the same depth.
    small, large = render_layout(empty_room(0), 24, 32), render_layout(empty_room(0), 48, 64)
    assert np.allclose(small.depth[11:13, 15:17].mean(), large.depth[22:26, 30:34].mean(), rtol=1e-3)


@pytest.mark.parametrize("kind", OBJECT_KINDS)
def test_each_solid_rests_on_the_floor_with_its_exact_height_and_radius(kind):
    obj = SceneObject(kind, "red", (0.2, 3.0), radius=0.3, height=0.8 if kind != "sphere" else 0.6, box_depth=0.4)
    layout = dataclasses.replace(empty_room(1), objects=(obj,))
    room_h = layout.room[1]
    # Straight down from just under the ceiling, 5 cm off the axis: the top is at the full height (a cone's side at
    # 5 cm from its axis is h (1 - 0.05 / r) high; a sphere's and a capsule's cap are lower by the cap's sag).
    offset = 0.05
    down = cast_rays(layout, np.array([obj.base[0] + offset, room_h - 0.01, obj.base[1]]), np.array([0.0, -1.0, 0.0]))
    top = {
        "sphere": 0.3 + math.sqrt(0.3**2 - offset**2),
        "box": 0.8,
        "cylinder": 0.8,
        "cone": 0.8 * (1 - offset / 0.3),
        "capsule": 0.5 + math.sqrt(0.3**2 - offset**2),
    }[kind]
    assert int(down.instance) == 1 and room_h - 0.01 - float(down.t) == pytest.approx(top, abs=1e-9)
    # Horizontally from the left wall at a quarter of the height, through the axis: meets the side at the radius.
    y = obj.height / 4
    across = cast_rays(layout, np.array([-layout.room[0] / 2 + 0.01, y, obj.base[1]]), np.array([1.0, 0.0, 0.0]))
    side = {
        "sphere": math.sqrt(0.3**2 - (y - 0.3) ** 2),
        "box": 0.3,
        "cylinder": 0.3,
        "cone": 0.3 * (1 - y / 0.8),
        "capsule": math.sqrt(0.3**2 - (y - 0.3) ** 2),
    }[kind]
    assert int(across.instance) == 1
    assert -layout.room[0] / 2 + 0.01 + float(across.t) == pytest.approx(obj.base[0] - side, abs=1e-9)
    # It stands on the floor (a ray 1 mm above the floor meets it) and is exactly `height` tall (1 mm above misses).
    start = -layout.room[0] / 2 + 0.01
    grazing = cast_rays(
        layout, np.array([[start, 1e-3, obj.base[1]], [start, obj.height + 1e-3, obj.base[1]]]), np.eye(3)[[0, 0]]
    )
    assert grazing.instance.tolist() == [1, 0]
    assert obj.center == pytest.approx((0.2, obj.height / 2, 3.0))


# --------------------------------------------------------------------------------------------------------------------
# Surface normals (Marigold's camera frame: +x right, +y up, +z towards the camera)
# --------------------------------------------------------------------------------------------------------------------


def marigold_axes(camera):
    """World vectors of Marigold's camera axes (right, up, towards the camera), from the angles."""
    right, down, forward = camera_axes(camera.yaw, camera.pitch, camera.roll)
    return right, -down, -forward


@pytest.mark.parametrize("pitch", [0.0, 0.3])
def test_room_planes_have_their_known_normals(pitch):
    # A level camera (yaw = roll = 0) pitched down by `pitch`: the floor's up vector is (0, cos p, sin p) in Marigold's
    # frame (tilted towards the camera), the ceiling's the opposite, the far wall faces the camera (0, -sin p, cos p),
    # and the left / right walls point right / left.
    layout = empty_room(2, Camera((0.1, 1.3, 0.6), 0.0, pitch, 0.0))
    scene = render_layout(layout, 40, 56)
    c, s = math.cos(pitch), math.sin(pitch)
    # Which plane each pixel shows, from the ray-plane intersections written out independently (see the depth test).
    room_w, room_h, room_d = layout.room
    origin = np.asarray(layout.camera.position)
    rays = pixel_rays(layout.camera, 40, 56)
    with np.errstate(divide="ignore", invalid="ignore"):
        candidates = np.stack(
            [
                np.where(rays[..., 1] < 0, -origin[1] / rays[..., 1], np.inf),
                np.where(rays[..., 1] > 0, (room_h - origin[1]) / rays[..., 1], np.inf),
                np.where(rays[..., 0] < 0, (-room_w / 2 - origin[0]) / rays[..., 0], np.inf),
                np.where(rays[..., 0] > 0, (room_w / 2 - origin[0]) / rays[..., 0], np.inf),
                np.where(rays[..., 2] > 0, (room_d - origin[2]) / rays[..., 2], np.inf),
            ]
        )
    expected = np.array([(0, c, s), (0, -c, -s), (1, 0, 0), (-1, 0, 0), (0, -s, c)])[candidates.argmin(axis=0)]
    two = np.sort(candidates, axis=0)[:2]
    clear = two[1] - two[0] > 1e-6 * two[0]
    assert scene.normals.shape == (40, 56, 3) and scene.normals.dtype == np.float32
    assert clear.mean() > 0.9 and {int(i) for i in np.unique(candidates.argmin(axis=0))} >= {0, 2, 3, 4}
    np.testing.assert_allclose(scene.normals[clear], expected[clear], atol=1e-6)


def test_a_turned_box_face_and_a_sphere_have_their_exact_normals():
    box = SceneObject("box", "red", (-0.4, 2.5), radius=0.3, height=0.6, box_depth=0.5, yaw=0.4)
    ball = SceneObject("sphere", "blue", (0.6, 2.8), radius=0.35, height=0.7)
    layout = dataclasses.replace(empty_room(3, Camera((0.0, 1.1, 0.4), 0.1, 0.25, 0.05)), objects=(box, ball))
    scene = render_layout(layout, 72, 96)
    right, up, towards = marigold_axes(layout.camera)
    to_camera = np.stack([right, up, towards])  # rows: world -> Marigold components
    # The box's faces are its frame's axes turned by yaw about the vertical. From the left of the room's middle the
    # camera sees the face towards it (world normal -(sin yaw, 0, cos yaw)), the top and the +x side face.
    faces = np.array([[-math.sin(0.4), 0.0, -math.cos(0.4)], [0.0, 1.0, 0.0], [math.cos(0.4), 0.0, -math.sin(0.4)]])
    normals = scene.normals[scene.instances == 1]
    agreement = normals @ (faces @ to_camera.T).T  # cosine to each face's normal, Marigold components
    closest = agreement.argmax(axis=1)
    np.testing.assert_allclose(agreement.max(axis=1), 1.0, atol=1e-6)
    assert np.bincount(closest, minlength=3).min() > 10
    # A sphere's normal at a point is the direction from its centre: from depth, back-project the pixels into
    # camera-frame points and compare.
    record = scene.objects[1]
    fx, fy, cx, cy = nyu_intrinsics(72, 96)
    rows, cols = np.nonzero(scene.instances == 2)
    z = scene.depth[rows, cols].astype(np.float64)
    points = np.stack([(cols + 0.5 - cx) / fx * z, (rows + 0.5 - cy) / fy * z, z], axis=-1)  # OpenCV frame
    radial = points - np.asarray(record.center_camera)
    radial = radial / np.linalg.norm(radial, axis=-1, keepdims=True) * np.array([1.0, -1.0, -1.0])  # -> Marigold
    assert len(rows) > 50
    np.testing.assert_allclose(scene.normals[rows, cols], radial, atol=2e-5)  # float32 depth rounding


def test_normals_are_unit_face_the_camera_and_agree_with_depth_on_planes():
    for index in range(4):
        scene = generate_scene(index, seed=5, split="validation", height=48, width=64)
        n = scene.normals.astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-6)
        fx, fy, cx, cy = nyu_intrinsics(48, 64)
        cols, rows = np.meshgrid(np.arange(64), np.arange(48))
        z = scene.depth.astype(np.float64)
        # Camera-frame points (Marigold axes) from the z-depth: the viewing ray of a pixel is the point itself.
        points = np.stack([(cols + 0.5 - cx) / fx * z, -(rows + 0.5 - cy) / fy * z, -z], axis=-1)
        facing = np.einsum("hwc,hwc->hw", n, points / np.linalg.norm(points, axis=-1, keepdims=True))
        assert (facing < 0).all()  # every normal points back towards the camera
        # On the floor every 3-D difference between its points is orthogonal to its (single) normal.
        floor = (scene.semantic == 2) & (scene.instances == 0)
        assert floor.sum() > 100
        floor_normal = n[floor][0]
        np.testing.assert_allclose(n[floor], np.broadcast_to(floor_normal, n[floor].shape), atol=1e-6)
        differences = points[floor] - points[floor][::-1]
        scale = np.linalg.norm(differences, axis=-1) + 1e-9
        assert np.abs(differences @ floor_normal / scale).max() < 1e-5


def test_cast_shadows_only_darken_the_floor():
    layout = empty_room(2)
    room_h = layout.room[1]
    lx, _, lz = layout.light
    # A sphere between the light and the floor in front of the camera throws its shadow towards the camera.
    ball = SceneObject("sphere", "white", (lx * 0.5, min(lz, 3.0)), radius=0.35, height=0.7)
    light = (lx, room_h - 0.25, ball.base[1] + 1.0)
    base = dataclasses.replace(layout, light=light)
    without = render_layout(base, 48, 64)
    with_ball = render_layout(dataclasses.replace(base, objects=(ball,)), 48, 64)
    floor = (with_ball.instances == 0) & (with_ball.semantic == FLOOR)
    darker = with_ball.image[floor].astype(int) - without.image[floor].astype(int)
    assert (darker <= 0).all()
    assert (darker.sum(axis=-1) < -30).sum() >= 10


def test_objects_are_placed_on_the_floor_apart_and_inside_the_room():
    scene_types = set()
    for index in range(40):
        layout = sample_layout(np.random.default_rng([9, index]))
        scene_types.add(layout.scene)
        room_w, _, room_d = layout.room
        assert 2 <= len(layout.objects) <= 8
        for i, a in enumerate(layout.objects):
            assert a.kind in OBJECT_KINDS and a.color in COLOR_PALETTE
            assert a.size == ("large" if a.extent >= LARGE_OBJECT_EXTENT else "small")
            x, z = a.base
            assert abs(x) + a.footprint_radius < room_w / 2 and a.footprint_radius < z < room_d - a.footprint_radius
            for b in layout.objects[i + 1 :]:
                assert math.dist(a.base, b.base) > a.footprint_radius + b.footprint_radius
    assert len(scene_types) >= 5


# --------------------------------------------------------------------------------------------------------------------
# Labels and records
# --------------------------------------------------------------------------------------------------------------------


def test_semantic_instances_and_records_agree():
    seen_kinds = set()
    for index in range(10):
        scene = generate_scene(index, seed=4, height=40, width=48)
        assert scene.image.dtype == np.uint8 and scene.image.shape == (40, 48, 3)
        assert scene.semantic.dtype == np.uint8 and scene.instances.dtype == np.uint16
        assert np.isfinite(scene.depth).all() and (scene.depth > 0).all()
        assert set(np.unique(scene.semantic)) <= set(SYNTHETIC_ID2LABEL) - {0}
        assert scene.scene in SCENE_TYPES
        room = scene.instances == 0
        assert np.isin(scene.semantic[room], [WALL, FLOOR, CEILING]).all()
        counts = np.bincount(scene.instances.ravel(), minlength=len(scene.objects) + 1)
        assert len(counts) == len(scene.objects) + 1
        for k, record in enumerate(scene.objects, start=1):
            mask = scene.instances == k
            assert record.instance_id == k and record.pixel_count == counts[k]
            assert (scene.semantic[mask] == KIND_LABEL[record.kind]).all()
            if record.pixel_count:
                seen_kinds.add(record.kind)
                rows, cols = np.nonzero(mask)
                assert record.bbox == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
            else:
                assert record.bbox is None
            obj = scene.layout.objects[k - 1]
            assert (record.kind, record.color, record.size) == (obj.kind, obj.color, obj.size)
    assert len(seen_kinds) >= 4


def test_labels_follow_the_ade20k_convention():
    assert SYNTHETIC_ID2LABEL[0] == "other"
    assert list(SYNTHETIC_ID2LABEL) == list(range(len(SYNTHETIC_ID2LABEL)))
    assert {"wall", "floor", "ceiling", *OBJECT_KINDS} == set(SYNTHETIC_ID2LABEL.values()) - {"other"}
    assert {SYNTHETIC_ID2LABEL[v] for v in KIND_LABEL.values()} == set(KIND_LABEL)


# --------------------------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------------------------


def assert_same(a, b):
    for name in ("image", "depth", "semantic", "instances"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.scene == b.scene and a.objects == b.objects and a.referring == b.referring


def test_same_seed_same_sample_whatever_else_is_generated():
    alone = generate_scene(4, seed=11, height=32, width=40)
    assert_same(alone, generate_scene(4, seed=11, height=32, width=40))
    batch = SyntheticScenes(6, seed=11, height=32, width=40)
    assert len(batch) == 6
    assert_same(alone, list(batch)[4])
    assert_same(alone, [batch[i] for i in reversed(range(6))][1])
    assert_same(alone, batch[-2])
    with pytest.raises(IndexError):
        batch[6]
    other_seed = generate_scene(4, seed=12, height=32, width=40)
    validation = generate_scene(4, seed=11, split="validation", height=32, width=40)
    neighbour = generate_scene(5, seed=11, height=32, width=40)
    for other in (other_seed, validation, neighbour):
        assert not np.array_equal(alone.depth, other.depth) and not np.array_equal(alone.image, other.image)
    # The layout does not depend on the resolution.
    larger = generate_scene(4, seed=11, height=64, width=80)
    assert [(o.kind, o.color, o.center) for o in larger.objects] == [(o.kind, o.color, o.center) for o in alone.objects]


def test_bad_arguments_are_rejected_with_their_names():
    with pytest.raises(ValueError, match="`height`"):
        generate_scene(0, height=0)
    with pytest.raises(TypeError, match="`width`"):
        generate_scene(0, width=12.5)
    with pytest.raises(ValueError, match="`seed`"):
        generate_scene(0, seed=-1)
    with pytest.raises(ValueError, match="`split`"):
        generate_scene(0, split="dev")
    with pytest.raises(ValueError, match="`scene`"):
        sample_layout(np.random.default_rng(0), scene="garage")
    with pytest.raises(TypeError, match="`rng`"):
        sample_layout(0)
    with pytest.raises(ValueError, match="`shard_size`"):
        save_synthetic_dataset("/nonexistent", shard_size=0)
    with pytest.raises(ValueError, match="`mask`"):
        rle_encode(np.zeros(4))
    with pytest.raises(ValueError, match="`kind`"):
        SceneObject("torus", "red", (0.0, 1.0), radius=0.2, height=0.1)
    with pytest.raises(ValueError, match="`color`"):
        SceneObject("box", "teal", (0.0, 1.0), radius=0.2, height=0.1, box_depth=0.3)
    with pytest.raises(ValueError, match="sphere"):
        SceneObject("sphere", "red", (0.0, 1.0), radius=0.2, height=0.3)


# --------------------------------------------------------------------------------------------------------------------
# Referring expressions, checked by parsing them back
# --------------------------------------------------------------------------------------------------------------------

EXPRESSION = re.compile(
    r"^the (?:(?P<most>leftmost|rightmost|nearest|farthest) )?(?:(?P<size>small|large) )?"
    r"(?:(?P<color>red|green|blue|yellow|white|black|orange|purple) )?"
    r"(?P<noun>sphere|box|cylinder|cone|capsule|object)(?: on the (?P<side>left|right))?$"
)


def visible_objects(scene):
    """Independent per-object facts: visible pixel count, centroid x, and the centre's z-depth from the layout."""
    camera = scene.layout.camera
    _, _, forward = camera_axes(camera.yaw, camera.pitch, camera.roll)
    facts = []
    for k, obj in enumerate(scene.layout.objects, start=1):
        cols = np.nonzero(scene.instances == k)[1]
        if len(cols) >= MIN_VISIBLE_PIXELS:
            centre = np.array([obj.base[0], obj.height / 2, obj.base[1]])
            depth = float((centre - np.asarray(camera.position)) @ forward)
            facts.append(
                {"id": k, "kind": obj.kind, "color": obj.color, "size": obj.size, "x": cols.mean() + 0.5, "z": depth}
            )
    return facts


def selects(expression, objects, width):
    """Ids of the visible objects that the expression describes (parsed with the regex above)."""
    match = EXPRESSION.match(expression)
    assert match, f"unparsable expression {expression!r}"
    g = match.groupdict()
    relation = g["side"] or g["most"]
    relation = {"leftmost": "left", "rightmost": "right"}.get(relation, relation)
    assert g["size"] or g["color"] or g["noun"] != "object" or relation, expression

    def has(o):
        return (
            (g["size"] is None or o["size"] == g["size"])
            and (g["color"] is None or o["color"] == g["color"])
            and (g["noun"] == "object" or o["kind"] == g["noun"])
        )

    pool = [o for o in objects if has(o)]
    if relation is not None:
        assert len(pool) >= 2, f"{expression!r}: a relation among fewer than two candidates"
        # "on the left" for a pair, "leftmost" among three or more.
        assert (g["side"] is not None) == (relation in ("left", "right") and len(pool) == 2), expression
    if relation == "left":
        return [o["id"] for o in pool if all(p["x"] - o["x"] >= REFERRING_X_MARGIN * width for p in pool if p is not o)]
    if relation == "right":
        return [o["id"] for o in pool if all(o["x"] - p["x"] >= REFERRING_X_MARGIN * width for p in pool if p is not o)]
    if relation == "nearest":
        return [o["id"] for o in pool if all(p["z"] - o["z"] >= REFERRING_DEPTH_MARGIN for p in pool if p is not o)]
    if relation == "farthest":
        return [o["id"] for o in pool if all(o["z"] - p["z"] >= REFERRING_DEPTH_MARGIN for p in pool if p is not o)]
    return [o["id"] for o in pool]


def test_every_expression_selects_exactly_its_object():
    total, visible, described = 0, 0, 0
    for index in range(25):
        scene = generate_scene(index, seed=6, height=48, width=64)
        objects = visible_objects(scene)
        assert set(scene.referring) == {o["id"] for o in objects}
        visible += len(objects)
        for instance_id, expressions in scene.referring.items():
            assert len(set(expressions)) == len(expressions)
            described += bool(expressions)
            for expression in expressions:
                assert selects(expression, objects, 64) == [instance_id], expression
                total += 1
    assert total > 150 and described >= 0.9 * visible > 40


def make_record(instance_id, kind, color, size, x, depth):
    return ObjectRecord(instance_id, kind, color, size, (0, 0, depth), (0, 0, depth), 0.3, 100, (x, 0, 1, 1), (x, 5))


def test_relations_need_a_clear_margin():
    width = 100
    close = [make_record(1, "sphere", "red", "small", 50, 2.0), make_record(2, "sphere", "red", "small", 53, 2.2)]
    assert referring_expressions(close, width) == {1: (), 2: ()}  # identical twins, side by side: nothing is safe
    apart = [make_record(1, "sphere", "red", "small", 20, 2.0), make_record(2, "sphere", "red", "small", 80, 3.0)]
    got = referring_expressions(apart, width)
    assert set(got[1]) == {
        "the sphere on the left",
        "the nearest sphere",
        "the object on the left",
        "the nearest object",
    }
    assert set(got[2]) == {
        "the sphere on the right",
        "the farthest sphere",
        "the object on the right",
        "the farthest object",
    }
    three = [*apart, make_record(3, "box", "blue", "large", 50, 2.5)]
    got = referring_expressions(three, width)
    assert "the leftmost object" in got[1] and "the sphere on the left" in got[1] and "the box" in got[3]
    assert "the small sphere" not in got[3] and "the large blue box" not in got[3]  # padded forms are dropped
    hidden = [
        *apart,
        dataclasses.replace(make_record(3, "sphere", "red", "small", 50, 2.5), pixel_count=MIN_VISIBLE_PIXELS - 1),
    ]
    assert referring_expressions(hidden, width) == referring_expressions(apart, width)  # too small to matter


# --------------------------------------------------------------------------------------------------------------------
# COCO run-length encoding
# --------------------------------------------------------------------------------------------------------------------


def test_rle_matches_the_coco_convention_on_hand_checked_masks():
    # Column-major: [[0, 1], [1, 1]] reads 0, 1, 1, 1 -> one 0, then three 1s.
    assert rle_encode(np.array([[0, 1], [1, 1]])) == {"size": [2, 2], "counts": [1, 3]}
    # Starts with foreground: a leading zero-length background run. Reads 1, 1 | 0, 1 | 0, 0.
    assert rle_encode(np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)) == {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}
    assert rle_encode(np.zeros((3, 4))) == {"size": [3, 4], "counts": [12]}
    assert rle_encode(np.ones((3, 4))) == {"size": [3, 4], "counts": [0, 12]}
    assert rle_encode(np.zeros((0, 5))) == {"size": [0, 5], "counts": []}


def test_rle_round_trips():
    rng = np.random.default_rng(0)
    masks = [np.zeros((3, 4), bool), np.ones((3, 4), bool), np.zeros((0, 5), bool), np.ones((1, 1), bool)]
    masks += [rng.random(shape) < p for shape in ((1, 9), (9, 1), (7, 5), (32, 48)) for p in (0.1, 0.5, 0.9)]
    for mask in masks:
        rle = rle_encode(mask)
        assert sum(rle["counts"]) == mask.size and all(c > 0 for c in rle["counts"][1:])
        decoded = rle_decode(rle)
        assert decoded.dtype == bool and decoded.shape == mask.shape
        np.testing.assert_array_equal(decoded, mask)
    with pytest.raises(ValueError, match="summing to H \\* W"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError, match="compressed"):
        rle_decode({"size": [2, 2], "counts": "04"})
    with pytest.raises(TypeError, match="`rle`"):
        rle_decode([1, 3])


# --------------------------------------------------------------------------------------------------------------------
# Parquet and the command line
# --------------------------------------------------------------------------------------------------------------------


def test_parquet_round_trip_is_exact(tmp_path):
    import datasets

    out = save_synthetic_dataset(
        tmp_path / "synthetic", num_train=3, num_validation=2, height=48, width=64, seed=7, shard_size=2, progress=False
    )
    assert sorted(p.name for p in (out / "scenes").iterdir()) == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "validation-00000-of-00001.parquet",
    ]
    assert json.loads((out / "id2label.json").read_text()) == {str(k): v for k, v in SYNTHETIC_ID2LABEL.items()}
    scenes = datasets.load_dataset(
        "parquet", data_files={s: str(out / "scenes" / f"{s}-*.parquet") for s in ("train", "validation")}
    )
    referring = datasets.load_dataset("parquet", data_dir=str(out / "referring"))
    for split, count in (("train", 3), ("validation", 2)):
        assert scenes[split].num_rows == count
        ref_rows = list(referring[split])
        expected_refs = 0
        for index in range(count):
            sample = generate_scene(index, seed=7, split=split, height=48, width=64)
            row = scenes[split][index]
            assert (
                row["depth_map"].mode == "F" and row["annotation"].mode == "L" and row["instance_mask"].mode == "I;16"
            )
            np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), sample.image)
            depth = np.asarray(row["depth_map"])
            assert depth.dtype == np.float32
            np.testing.assert_array_equal(depth, sample.depth)
            np.testing.assert_array_equal(np.asarray(row["annotation"]), sample.semantic)
            np.testing.assert_array_equal(np.asarray(row["instance_mask"]), sample.instances)
            assert row["scene"] == sample.scene
            # 8-bit normals: within the quantisation (half a step per component, about 0.4 degrees) of the exact ones.
            normals = decode_normals(np.asarray(row["normal_map"]))
            cosine = np.clip(np.sum(normals * sample.normals, axis=-1), -1, 1)
            assert row["normal_map"].mode == "RGB" and np.degrees(np.arccos(cosine)).max() < 0.5
            assert [o["kind"] for o in row["objects"]] == [o.kind for o in sample.objects]
            for ref in (r for r in ref_rows if r["image_id"] == index):
                k = ref["instance_id"]
                np.testing.assert_array_equal(rle_decode(ref["segmentation"]), sample.instances == k)
                assert ref["answer"] == list(sample.referring[k]) and ref["category"] == sample.objects[k - 1].kind
                assert ref["bbox"] == list(sample.objects[k - 1].bbox) and ref["scene"] == sample.scene
                np.testing.assert_array_equal(np.asarray(ref["image"]), sample.image)
                expected_refs += 1
            assert sum(r["image_id"] == index for r in ref_rows) == sum(bool(v) for v in sample.referring.values())
        assert expected_refs == len(ref_rows) > 0
        assert [r["ref_id"] for r in ref_rows] == list(range(len(ref_rows)))
    # Train and validation images differ.
    train_images = {np.asarray(r["image"]).tobytes() for r in scenes["train"]}
    assert not train_images & {np.asarray(r["image"]).tobytes() for r in scenes["validation"]}
    # The README's `configs` header makes the folder loadable by name, and the in-memory builder agrees.
    by_name = datasets.load_dataset(str(out), "referring")
    assert by_name["validation"].num_rows == referring["validation"].num_rows
    memory = make_synthetic_dataset(num_train=1, num_validation=1, height=48, width=64, seed=7)
    assert set(memory) == {"scenes", "referring"} and set(memory["scenes"]) == {"train", "validation"}
    np.testing.assert_array_equal(
        np.asarray(memory["scenes"]["validation"][0]["depth_map"]), np.asarray(scenes["validation"][0]["depth_map"])
    )
    assert memory["scenes"]["train"].features == scenes["train"].features


def test_command_line_writes_the_dataset(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "vpd_hf.data.synthetic", "--output", str(out), "--num-train", "2"]
    command += ["--num-validation", "1", "--height", "16", "--width", "20", "--seed", "3", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    scenes = pq.read_table(out / "scenes" / "train-00000-of-00001.parquet")
    assert scenes.num_rows == 2 and set(scenes.column_names) >= {
        "image",
        "depth_map",
        "annotation",
        "scene",
        "instance_mask",
    }
    row = scenes.slice(1, 1).to_pylist()[0]
    depth = np.asarray(Image.open(io.BytesIO(row["depth_map"]["bytes"])))
    np.testing.assert_array_equal(depth, generate_scene(1, seed=3, height=16, width=20).depth)
    assert pq.read_table(out / "scenes" / "validation-00000-of-00001.parquet").num_rows == 1
    assert (out / "README.md").read_text().startswith("---\nconfigs:")
    with pytest.raises(SystemExit) as error:
        main(["--output", str(out), "--height", "0"])
    assert error.value.code == 2


def test_load_splits_keeps_local_folders_with_the_same_name_apart(tmp_path):
    """datasets caches `load_dataset(folder, config)` by the folder's name; load_splits must not mix two `data/`."""
    from vpd_hf.data.loading import load_splits

    first = save_synthetic_dataset(tmp_path / "a" / "data", num_train=1, num_validation=2, height=32, width=32,
                                   progress=False)  # fmt: skip
    assert len(load_splits(first, "scenes")["validation"]) == 2
    second = save_synthetic_dataset(tmp_path / "b" / "data", num_train=1, num_validation=3, height=32, width=32,
                                    progress=False)  # fmt: skip
    assert len(load_splits(second, "scenes")["validation"]) == 3
    referring = load_splits(second, "referring")["validation"]
    assert len(referring) > 0 and max(referring["image_id"]) == 2  # the referents of the second folder's 3 images
    save_synthetic_dataset(first, num_train=1, num_validation=4, height=32, width=32, progress=False)
    assert len(load_splits(first, "scenes")["validation"]) == 4  # rewritten in place: the new files
