"""Converters of the raw releases (ADE20K, NYUv2, RefCOCO) on tiny fake folders, round-tripped through parquet."""

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vpd_hf.data import convert_ade20k, convert_nyu, convert_refcoco, decode_mask, polygons_to_mask
from vpd_hf.data.converters import read_nyu_train_list

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rgb(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def load(path):
    return datasets.load_dataset("parquet", data_dir=str(path))


def shard_files(output, split):
    return sorted((output / "data").glob(f"{split}-*.parquet"))


# -- ADE20K ---------------------------------------------------------------------------------------------------------


def fake_ade20k(root, counts=(("training", "train", 3), ("validation", "val", 2))):
    for folder, prefix, count in counts:
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i in range(count):
            name = f"ADE_{prefix}_{i + 1:08d}"
            Image.fromarray(rgb(24, 32 + i, i)).save(root / "images" / folder / f"{name}.jpg")
            label = (np.arange(24 * (32 + i)).reshape(24, 32 + i) % 151).astype(np.uint8)
            Image.fromarray(label).save(root / "annotations" / folder / f"{name}.png")
    return root


def test_ade20k_round_trip_and_idempotence(tmp_path):
    root = fake_ade20k(tmp_path / "ADEChallengeData2016")
    output = convert_ade20k(root, tmp_path / "out", shard_size=2, progress=False)
    dataset = load(output)
    assert set(dataset) == {"train", "validation"}
    assert dataset["train"].num_rows == 3 and dataset["validation"].num_rows == 2
    assert isinstance(dataset["train"].features["image"], datasets.Image)
    row = dataset["train"][1]
    np.testing.assert_array_equal(
        np.asarray(row["image"]), np.asarray(Image.open(root / "images/training/ADE_train_00000002.jpg"))
    )
    assert row["annotation"].mode == "L"
    np.testing.assert_array_equal(
        np.asarray(row["annotation"]), np.asarray(Image.open(root / "annotations/training/ADE_train_00000002.png"))
    )
    assert len(shard_files(output, "train")) == 2 and "split: validation" in (output / "README.md").read_text()
    assert datasets.load_dataset(str(output))["validation"].num_rows == 2  # via the README configs

    # rerun: existing shards are kept untouched; --overwrite rewrites them; a new shard size replaces the old shards
    times = {p: p.stat().st_mtime_ns for p in shard_files(output, "train")}
    convert_ade20k(root, output, shard_size=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in shard_files(output, "train")} == times
    (output / "data" / "train-00001-of-00002.parquet").unlink()  # an interrupted run: resumes the missing shard
    convert_ade20k(root, output, shard_size=2, progress=False)
    assert load(output)["train"].num_rows == 3
    convert_ade20k(root, output, shard_size=5, progress=False)
    assert [p.name for p in shard_files(output, "train")] == ["train-00000-of-00001.parquet"]
    assert load(output)["train"].num_rows == 3


def test_ade20k_errors(tmp_path):
    root = fake_ade20k(tmp_path / "ADE")
    (root / "annotations/validation/ADE_val_00000001.png").unlink()
    with pytest.raises(ValueError, match="no annotation"):
        convert_ade20k(root, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="splits"):
        convert_ade20k(root, tmp_path / "out", splits=["test"], progress=False)
    with pytest.raises(ValueError, match="ADEChallengeData2016"):
        convert_ade20k(tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_ade20k_script_and_segmentation_adapter(tmp_path, capsys):
    from vpd_hf.data import segmentation_dataset

    script = load_script("prepare_ade20k")
    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert "example:" in capsys.readouterr().out
    root = fake_ade20k(tmp_path / "ADE")
    output = script.main(
        ["--root", str(root), "--output", str(tmp_path / "out"), "--splits", "validation", "--no-progress"]
    )
    dataset = segmentation_dataset(load(output)["validation"], "eval")
    item = dataset[0]
    assert item["labels"].shape == (24, 32) and item["pixel_values"].shape == (3, 512, 683)
    assert item["labels"][0, 0] == 255 and item["labels"][0, 1] == 0  # 0 -> ignore, 1 -> class 0


# -- NYUv2 ----------------------------------------------------------------------------------------------------------


def fake_sync(root):
    lines = []
    for scene in ("study_room_0001", "kitchen_0028b"):
        (root / scene).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rgb(12, 16, i)).save(root / scene / f"rgb_{i:05d}.jpg")
            millimetres = (np.arange(12 * 16).reshape(12, 16) * 50 + i).astype(np.uint16)
            Image.fromarray(millimetres).save(root / scene / f"sync_depth_{i:05d}.png")
            lines.append(f"/{scene}/rgb_{i:05d}.jpg /{scene}/sync_depth_{i:05d}.png 518.8579")
    (root.parent / "train_list.txt").write_text("\n".join(lines) + "\n")
    return root, root.parent / "train_list.txt"


def test_nyu_sync_round_trip(tmp_path):
    sync, list_file = fake_sync(tmp_path / "sync")
    assert [e[2] for e in read_nyu_train_list(list_file, sync)] == ["study_room_0001"] * 2 + ["kitchen_0028b"] * 2
    output = convert_nyu(tmp_path / "out", sync_root=sync, train_list=list_file, shard_size=3, progress=False)
    train = load(output)["train"]
    assert train.num_rows == 4 and train["scene"] == ["study_room_0001"] * 2 + ["kitchen_0028b"] * 2
    row = train[3]
    assert row["depth_map"].mode == "F"
    millimetres = np.arange(12 * 16).reshape(12, 16) * 50 + 1
    expected = millimetres / 1000.0
    np.testing.assert_allclose(np.asarray(row["depth_map"]), expected, rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(row["image"]), np.asarray(Image.open(sync / "kitchen_0028b/rgb_00001.jpg"))
    )

    uint16 = convert_nyu(
        tmp_path / "out16", sync_root=sync, train_list=list_file, depth_format="uint16", progress=False
    )
    depth16 = load(uint16)["train"][3]["depth_map"]
    assert depth16.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(depth16), millimetres)

    from vpd_hf.data import depth_dataset
    from vpd_hf.prompts import NYU_SCENE_NAMES

    for path in (output, uint16):
        item = depth_dataset(load(path)["train"], "eval", scene_column="scene")[1]  # study_room_0001, frame 1
        np.testing.assert_allclose(item["labels"][1:].numpy(), expected[1:] * (expected[1:] < 10), rtol=1e-6)
        assert NYU_SCENE_NAMES[item["scene_ids"].item()] == "study"


def test_nyu_argument_errors(tmp_path):
    sync, list_file = fake_sync(tmp_path / "sync")
    with pytest.raises(ValueError, match="Nothing to convert"):
        convert_nyu(tmp_path / "out")
    with pytest.raises(ValueError, match="go together"):
        convert_nyu(tmp_path / "out", sync_root=sync)
    with pytest.raises(ValueError, match="depth_format"):
        convert_nyu(tmp_path / "out", sync_root=sync, train_list=list_file, depth_format="float16")
    (sync / "kitchen_0028b/rgb_00001.jpg").unlink()
    with pytest.raises(ValueError, match="missing"):
        convert_nyu(tmp_path / "out", sync_root=sync, train_list=list_file)


def write_labeled_mat(path, count=4, height=12, width=16):
    """A tiny nyu_depth_v2_labeled.mat: MATLAB v7.3 arrays as h5py sees them (transposed), cell strings as refs."""
    h5py = pytest.importorskip("h5py", reason="h5py is needed to write/read the HDF5 (v7.3) labeled .mat")
    images = np.stack([rgb(height, width, 10 + i) for i in range(count)])  # (N, H, W, 3)
    raw = np.stack([np.full((height, width), 1.0 + i, np.float32) for i in range(count)])
    raw[:, 0, 0] = 0.0
    filled = raw + 0.5
    scene_types = ["bathroom", "study_room", "kitchen", "office"]
    with h5py.File(path, "w") as handle:
        handle["images"] = images.transpose(0, 3, 2, 1)  # (N, 3, W, H)
        handle["rawDepths"] = raw.transpose(0, 2, 1)  # (N, W, H)
        handle["depths"] = filled.transpose(0, 2, 1)
        refs = []
        for i in range(count):
            chars = handle.create_dataset(f"#refs#/s{i}", data=np.array([[ord(c)] for c in scene_types[i]], np.uint16))
            refs.append(chars.ref)
        handle.create_dataset("sceneTypes", data=np.array([refs], dtype=h5py.ref_dtype))
    return images, raw, filled, scene_types


def test_nyu_labeled_mat_test_split(tmp_path):
    images, raw, filled, scene_types = write_labeled_mat(tmp_path / "labeled.mat")
    scipy_io = pytest.importorskip("scipy.io", reason="scipy writes the MATLAB v5 splits.mat")
    scipy_io.savemat(tmp_path / "splits.mat", {"testNdxs": np.array([[2], [4]]), "trainNdxs": np.array([[1], [3]])})
    script = load_script("prepare_nyu")
    output = script.main(
        ["--output", str(tmp_path / "out"), "--labeled-mat", str(tmp_path / "labeled.mat"), "--splits-mat",
         str(tmp_path / "splits.mat"), "--no-progress"]
    )  # fmt: skip
    test = load(output)["validation"]
    assert test.num_rows == 2 and test["scene"] == [scene_types[1], scene_types[3]]
    row = test[1]
    expected = images[3].copy()
    expected[:7] = 0
    expected[:, :7] = 0  # the BTS black border (rows 7:474, columns 7:632; only the top/left reach a 12x16 image)
    np.testing.assert_array_equal(np.asarray(row["image"]), expected)
    np.testing.assert_allclose(np.asarray(row["depth_map"]), raw[3])  # rawDepths, as BTS / VPD
    full = convert_nyu(
        tmp_path / "full", labeled_mat=tmp_path / "labeled.mat", test_indices=[1], depth_key="depths",
        black_boundary=False, test_split="test", progress=False,
    )  # fmt: skip
    row = load(full)["test"][0]
    np.testing.assert_array_equal(np.asarray(row["image"]), images[0])
    np.testing.assert_allclose(np.asarray(row["depth_map"]), filled[0])
    with pytest.raises(ValueError, match="1-based"):
        convert_nyu(tmp_path / "bad", labeled_mat=tmp_path / "labeled.mat", test_indices=[0], progress=False)
    # a later run adding the training split to the same folder keeps the test split and lists both
    sync, list_file = fake_sync(tmp_path / "sync")
    convert_nyu(output, sync_root=sync, train_list=list_file, progress=False)
    both = load(output)
    assert both["train"].num_rows == 4 and both["validation"].num_rows == 2
    assert "| validation | 2 |" in (output / "README.md").read_text()


def test_nyu_normals_are_added_to_the_test_split_and_read_by_the_adapter(tmp_path):
    from vpd_hf.data import encode_normals, normals_dataset

    write_labeled_mat(tmp_path / "labeled.mat")
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(12, 16, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[0, :4] = 0.0  # no ground truth there
    folder = tmp_path / "normals"
    folder.mkdir()
    # Stored in OpenCV's frame (y down, z away from the camera): the converter negates y and z.
    Image.fromarray(encode_normals(normals * [1, -1, -1])).save(folder / "000000_normal.png")
    output = load_script("prepare_nyu").main(
        ["--output", str(tmp_path / "out"), "--labeled-mat", str(tmp_path / "labeled.mat"), "--no-progress",
         "--normals-dir", str(folder), "--normals-convention", "opencv", "--splits-mat", str(write_splits(tmp_path))]
    )  # fmt: skip
    test = load(output)["validation"]
    assert test.num_rows == 2 and test[1]["normal_map"] is None  # the second test image has no file
    np.testing.assert_array_equal(np.asarray(test[0]["normal_map"]), encode_normals(normals))
    items = normals_dataset(test, "eval")
    label = items[0]["labels"].numpy().transpose(1, 2, 0)
    assert (label[0, :4] == 0).all() and (items[1]["labels"] == 0).all()
    cosine = np.clip(np.sum(label[1:] * normals[1:], axis=-1), -1, 1)
    assert np.degrees(np.arccos(cosine)).max() < 0.5
    with pytest.raises(ValueError, match="needs `labeled_mat`"):
        convert_nyu(tmp_path / "bad", sync_root=tmp_path, train_list=tmp_path / "x.txt", normals_dir=folder)
    Image.fromarray(encode_normals(normals[:10])).save(folder / "000000_normal.png")
    with pytest.raises(ValueError, match="differ in size"):
        convert_nyu(tmp_path / "bad", labeled_mat=tmp_path / "labeled.mat", test_indices=[1], normals_dir=folder,
                    progress=False)  # fmt: skip


def write_splits(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy writes the MATLAB v5 splits.mat")
    scipy_io.savemat(tmp_path / "splits.mat", {"testNdxs": np.array([[2], [4]]), "trainNdxs": np.array([[1], [3]])})
    return tmp_path / "splits.mat"


# -- RefCOCO --------------------------------------------------------------------------------------------------------

POLYGONS = {7: [[2, 2, 12, 2, 12, 10, 2, 10]], 8: [[14, 4, 20, 4, 17, 11]], 9: [[0, 0, 5, 0, 5, 5, 0, 5]]}


def fake_coco(root):
    root.mkdir(parents=True)
    for image_id in (42, 43):
        Image.fromarray(rgb(16, 24, image_id)).save(root / f"COCO_train2014_{image_id:012d}.jpg")
    return root


def refs_records():
    return [
        {"ref_id": 3, "ann_id": 8, "image_id": 42, "split": "val", "sentences": [{"sent": "the triangle"}]},
        {"ref_id": 1, "ann_id": 7, "image_id": 42, "split": "train",
         "sentences": [{"raw": "The Box!", "sent": "the box"}, {"sent": "left box"}]},
        {"ref_id": 2, "ann_id": 9, "image_id": 43, "split": "train", "sentences": [{"sent": "corner"}]},
    ]  # fmt: skip


def annotation(ann_id, image_id):
    polygon = POLYGONS[ann_id]
    xs, ys = polygon[0][0::2], polygon[0][1::2]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"id": ann_id, "image_id": image_id, "segmentation": polygon, "bbox": bbox, "category_id": 1, "iscrowd": 0}


def check_refcoco_output(output):
    dataset = load(output)
    assert set(dataset) == {"train", "val"}
    train = dataset["train"]
    assert train["ref_id"] == [1, 2] and train["answer"] == [["the box", "left box"], ["corner"]]
    assert train["split"] == ["train", "train"] and train["image_id"] == [42, 43]
    row = train[0]
    np.testing.assert_array_equal(
        np.asarray(row["image"]),
        np.asarray(Image.open(output.parent / "train2014" / "COCO_train2014_000000000042.jpg")),
    )
    np.testing.assert_array_equal(decode_mask(row["segmentation"], 16, 24), polygons_to_mask(POLYGONS[7], 16, 24))
    assert row["bbox"] == [2.0, 2.0, 10.0, 8.0]
    assert dataset["val"][0]["answer"] == ["the triangle"]
    return dataset


def test_refcoco_from_instances_and_refs(tmp_path):
    image_root = fake_coco(tmp_path / "train2014")
    instances = {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 16, "width": 24} for i in (42, 43)],
        "annotations": [annotation(7, 42), annotation(8, 42), annotation(9, 43)],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs.json").write_text(json.dumps(refs_records()))
    output = convert_refcoco(
        tmp_path / "out", image_root=image_root, instances_json=tmp_path / "instances.json",
        refs=tmp_path / "refs.json", progress=False,
    )  # fmt: skip
    check_refcoco_output(output)
    only_val = convert_refcoco(
        tmp_path / "val", image_root=image_root, instances_json=tmp_path / "instances.json",
        refs=tmp_path / "refs.json", splits=["val"], progress=False,
    )  # fmt: skip
    assert set(load(only_val)) == {"val"}
    with pytest.raises(ValueError, match="not found"):
        convert_refcoco(tmp_path / "x", image_root=image_root, instances_json=tmp_path / "instances.json",
                        refs=tmp_path / "refs.json", splits=["testA"], progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="either"):
        convert_refcoco(tmp_path / "x", image_root=image_root, progress=False)


def test_refcoco_from_jxu124_parquet_and_referring_adapter(tmp_path, capsys):
    image_root = fake_coco(tmp_path / "train2014")
    rows = []
    for ref in refs_records():
        rows.append(
            {
                "ref_id": ref["ref_id"],
                "ann_id": ref["ann_id"],
                "image_id": ref["image_id"],
                "split": ref["split"],
                "sentences": [
                    {"raw": s.get("raw", s["sent"]), "sent": s["sent"], "sent_id": 0, "tokens": []}
                    for s in ref["sentences"]
                ],
                "raw_anns": json.dumps(annotation(ref["ann_id"], ref["image_id"])),
                "raw_image_info": json.dumps({"file_name": f"COCO_train2014_{ref['image_id']:012d}.jpg"}),
                "image_path": f"coco/train2014/COCO_train2014_{ref['image_id']:012d}.jpg",
                "file_name": f"COCO_train2014_{ref['image_id']:012d}_{ref['ann_id']}.jpg",
            }
        )
    (tmp_path / "annotations").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "annotations" / "train-00000-of-00001.parquet"))
    script = load_script("prepare_refcoco")
    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert "--annotations" in capsys.readouterr().out
    output = script.main(
        ["--output", str(tmp_path / "out"), "--image-root", str(image_root), "--annotations",
         str(tmp_path / "annotations"), "--no-progress"]
    )  # fmt: skip
    dataset = check_refcoco_output(output)

    # the same annotations through the referring adapter, directly (annotation layout) and after conversion
    from transformers import CLIPTokenizer

    from vpd_hf.data import referring_dataset
    from vpd_hf.testing_utils import save_tiny_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(save_tiny_clip_tokenizer(tmp_path / "tokenizer"))
    direct = referring_dataset(
        datasets.load_dataset("parquet", data_dir=str(tmp_path / "annotations"))["train"], "eval", tokenizer,
        token_length=8, image_size=32, image_root=image_root,
    )  # fmt: skip
    converted = referring_dataset(dataset["train"], "eval", tokenizer, token_length=8, image_size=32)
    by_sentence = {item["sentence"]: item for item in (converted[i] for i in range(len(converted)))}
    assert len(direct) == 4 and len(converted) == 3
    for i in range(len(direct)):
        item = direct[i]
        if item["sentence"] in by_sentence:
            assert np.array_equal(item["labels"].numpy(), by_sentence[item["sentence"]]["labels"].numpy())
            assert np.array_equal(item["pixel_values"].numpy(), by_sentence[item["sentence"]]["pixel_values"].numpy())
