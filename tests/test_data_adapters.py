"""Dataset adapters (depth, segmentation, referring) and collate_fn on small in-memory Hub-layout datasets."""

import io
import json
import logging
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vpd_hf.data import (
    collate_fn,
    decode_mask,
    depth_dataset,
    get_adapter_transform,
    nyu_scene_id,
    polygons_to_mask,
    referring_dataset,
    rle_encode,
    save_synthetic_dataset,
    segmentation_dataset,
    set_epoch,
)
from vpd_hf.data.segmentation import ade20k_id2label
from vpd_hf.prompts import ADE20K_CLASS_NAMES, NYU_SCENE_NAMES

pytest.importorskip("albumentations")

IMAGE_FEATURES = {"image": datasets.Image()}


def png(array, mode=None):
    buffer = io.BytesIO()
    (Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def tiff(array):
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.float32), mode="F").save(buffer, format="TIFF")
    return {"bytes": buffer.getvalue(), "path": None}


def rgb(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


BROKEN = {"bytes": b"this is not an image", "path": None}


# -- depth ----------------------------------------------------------------------------------------------------------


def depth_rows(count=5, height=40, width=56):
    rows = {"image": [], "depth_map": [], "scene": []}
    scenes = ["study_room_0001", "office_kitchen_0003", "living room", "garage", "bedroom_0012"]
    for i in range(count):
        depth = np.linspace(0.5, 12.0, height * width, dtype=np.float32).reshape(height, width)
        depth[0, 0] = 0.0  # missing measurement
        rows["image"].append(png(rgb(height, width, i)))
        rows["depth_map"].append(tiff(depth + 0.01 * i))
        rows["scene"].append(scenes[i % len(scenes)])
    return rows


def depth_source(rows=None):
    features = datasets.Features(
        {"image": datasets.Image(), "depth_map": datasets.Image(), "scene": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(rows or depth_rows(), features=features)


def test_nyu_scene_id_official_rule():
    assert nyu_scene_id("study_room_0001") == NYU_SCENE_NAMES.index("study")
    assert nyu_scene_id("office_kitchen_0003") == NYU_SCENE_NAMES.index("kitchen")
    assert nyu_scene_id("kitchen_0028b/rgb_00045.jpg") == NYU_SCENE_NAMES.index("kitchen")
    assert nyu_scene_id("Living Room") == NYU_SCENE_NAMES.index("living_room")
    assert nyu_scene_id("garage") == -1 and nyu_scene_id(None) == -1 and nyu_scene_id("") == -1


def test_depth_eval_items_are_the_full_image():
    source = depth_source()
    dataset = depth_dataset(source, "eval", scene_column="scene")
    assert len(dataset) == 5
    item = dataset[0]
    assert set(item) == {"pixel_values", "labels", "scene_ids"}
    assert item["pixel_values"].shape == (3, 40, 56) and item["pixel_values"].dtype == torch.float32
    expected = torch.from_numpy(np.array(source[0]["image"])).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(item["pixel_values"], expected)
    labels, raw = item["labels"], np.asarray(source[0]["depth_map"])
    assert labels.dtype == torch.float32 and labels.shape == (40, 56)
    valid = (raw > 1e-3) & (raw < 10.0)
    np.testing.assert_allclose(labels.numpy()[valid], raw[valid])
    assert (labels.numpy()[~valid] == 0).all() and (~valid).sum() > 1
    assert [dataset[i]["scene_ids"].item() for i in range(5)] == [
        NYU_SCENE_NAMES.index("study"),
        NYU_SCENE_NAMES.index("kitchen"),
        NYU_SCENE_NAMES.index("living_room"),
        -1,
        NYU_SCENE_NAMES.index("bedroom"),
    ]
    assert item["scene_ids"].dtype == torch.int64 and item["scene_ids"].shape == ()
    assert depth_dataset(source, "eval")[0]["scene_ids"].item() == -1  # no scene column: unknown


def test_depth_reads_16bit_millimetre_pngs():
    millimetres = np.array([[0, 500, 2500], [9999, 12000, 1]], np.uint16)
    features = datasets.Features({"image": datasets.Image(), "depth_map": datasets.Image()})
    source = datasets.Dataset.from_dict(
        {"image": [png(rgb(2, 3, 0))], "depth_map": [png(millimetres)]}, features=features
    )
    labels = depth_dataset(source, "eval")[0]["labels"]
    torch.testing.assert_close(labels, torch.tensor([[0.0, 0.5, 2.5], [9.999, 0.0, 0.001]]) * (labels > 0.0011))
    scaled = depth_dataset(source, "eval", depth_scale=1e-4, min_depth=0.0)[0]["labels"]
    torch.testing.assert_close(scaled[0], torch.tensor([0.0, 0.05, 0.25]))


def test_depth_train_items_are_deterministic_crops():
    dataset = depth_dataset(depth_source(), "train", crop_size=(32, 32), seed=3)
    first = [dataset[i] for i in range(5)]
    for item in first:
        assert item["pixel_values"].shape == (3, 32, 32) and item["labels"].shape == (32, 32)
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
        assert ((item["labels"] == 0) | ((item["labels"] > 1e-3) & (item["labels"] < 10))).all()
    # independent of the fetch order and of shuffling (each item keeps its source row)
    for i in [4, 2, 0, 3, 1]:
        assert torch.equal(dataset[i]["pixel_values"], first[i]["pixel_values"])
    shuffled = dataset.shuffle(seed=0)
    order = shuffled.with_format(None)["__index__"]  # the source row of each item
    for position, row in enumerate(order):
        assert torch.equal(shuffled[position]["labels"], first[row]["labels"])
    # the epoch changes the draws
    set_epoch(dataset, 1)
    assert not torch.equal(dataset[1]["pixel_values"], first[1]["pixel_values"])
    set_epoch(dataset, 0)
    assert torch.equal(dataset[1]["pixel_values"], first[1]["pixel_values"])
    # a pickled copy (DataLoader workers under spawn) carries the epoch and gives the same items
    set_epoch(dataset, 4)
    clone = pickle.loads(pickle.dumps(dataset))
    assert get_adapter_transform(clone).epoch == 4
    assert torch.equal(clone[2]["labels"], dataset[2]["labels"])
    with pytest.raises(ValueError, match="epoch"):
        set_epoch(dataset, -1)
    with pytest.raises(ValueError, match="not returned by a vpd_hf adapter"):
        set_epoch(depth_source(), 1)


def test_depth_validation_errors():
    source = depth_source()
    with pytest.raises(ValueError, match="'depth'"):
        depth_dataset(source, "train", depth_column="depth")
    with pytest.raises(ValueError, match="'place'"):
        depth_dataset(source, "eval", scene_column="place")
    with pytest.raises(ValueError, match="split"):
        depth_dataset(source, "test")
    with pytest.raises(ValueError, match=r"must be a `datasets\.Image`"):
        depth_dataset(source, "eval", depth_column="scene")
    wrong_mode = depth_rows(2)
    wrong_mode["depth_map"][0] = png(rgb(40, 56, 9))
    with pytest.raises(ValueError, match="mode 'RGB'"):
        depth_dataset(depth_source(wrong_mode), "eval")
    negative = depth_rows(2)
    negative["depth_map"][0] = tiff(np.full((40, 56), -1.0))
    with pytest.raises(ValueError, match="negative"):
        depth_dataset(depth_source(negative), "eval")


def test_depth_bad_later_rows_raise_on_fetch_or_are_skipped(caplog):
    rows = depth_rows(5)
    rows["image"][2] = BROKEN
    rows["depth_map"][4] = tiff(np.full((40, 56), np.nan))
    lazy = depth_dataset(depth_source(rows), "eval")
    lazy[1]
    with pytest.raises(ValueError, match="row 2: column 'image' is not a readable image"):
        lazy[2]
    with caplog.at_level(logging.WARNING):
        dataset = depth_dataset(depth_source(rows), "eval", skip_invalid=True)
    assert len(dataset) == 3 and dataset.with_format(None)["__index__"] == [0, 1, 3]
    assert get_adapter_transform(dataset).dropped_rows == [2, 4]
    assert "dropped 2 invalid rows" in dataset.info.description
    assert "dropped 2 of 5 rows" in caplog.text
    assert dataset[2]["labels"].shape == (40, 56)


# -- segmentation ---------------------------------------------------------------------------------------------------


def segmentation_rows(count=4, height=48, width=64):
    rows = {"image": [], "annotation": []}
    for _ in range(count):
        image = np.full((height, width, 3), 60, np.uint8)
        label = np.full((height, width), 1, np.uint8)  # wall
        image[10:30, 20:45] = (20, 220, 30)
        label[10:30, 20:45] = 5  # class 4 after reduction
        label[:4] = 0  # "other": ignored after reduction
        rows["image"].append(png(image))
        rows["annotation"].append(png(label))
    return rows


def segmentation_source(rows=None):
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    return datasets.Dataset.from_dict(rows or segmentation_rows(), features=features)


def test_ade20k_id2label():
    id2label = ade20k_id2label()
    assert len(id2label) == 150 and id2label[0] == "wall" and id2label[149] == ADE20K_CLASS_NAMES[149]


def test_segmentation_train_items():
    dataset = segmentation_dataset(segmentation_source(), "train", crop_size=(32, 32), img_scale=(128, 48))
    for i in range(4):
        item = dataset[i]
        assert set(item) == {"pixel_values", "labels"}
        assert item["pixel_values"].shape == (3, 32, 32) and item["labels"].shape == (32, 32)
        assert item["labels"].dtype == torch.int64
        assert set(item["labels"].unique().tolist()) <= {0, 4, 255}
        green = item["pixel_values"][1] > 0.5
        assert (item["labels"][green] == 4).float().mean() > 0.8


def test_segmentation_train_pads_with_ignore():
    dataset = segmentation_dataset(
        segmentation_source(), "train", crop_size=(96, 96), img_scale=(64, 48), ratio_range=(1.0, 1.0)
    )
    item = dataset[0]
    assert (item["labels"][48:] == 255).all() and (item["labels"][:, 64:] == 255).all()
    assert (item["pixel_values"][:, 48:] == 0).all()


def test_segmentation_eval_resizes_image_and_keeps_original_labels():
    dataset = segmentation_dataset(segmentation_source(), "eval")
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 512, 683)  # short side 512, aspect kept (64 * 8 = 682.7)
    labels = item["labels"]
    assert labels.shape == (48, 64) and labels.dtype == torch.int64
    assert (labels[:4] == 255).all() and (labels[10:30, 20:45] == 4).all() and labels[40, 5] == 0
    wide = {"image": [png(rgb(20, 100, 0))], "annotation": [png(np.ones((20, 100), np.uint8))]}
    assert segmentation_dataset(segmentation_source(wide), "eval")[0]["pixel_values"].shape == (3, 410, 2048)
    raw = segmentation_dataset(segmentation_source(), "eval", reduce_labels=False)[0]["labels"]
    assert (raw[:4] == 0).all() and (raw[10:30, 20:45] == 5).all()


def test_segmentation_validation_errors():
    with pytest.raises(ValueError, match="'label'"):
        segmentation_dataset(segmentation_source(), "train", label_column="label")
    out_of_range = segmentation_rows(2)
    out_of_range["annotation"][0] = png(np.full((48, 64), 151, np.uint8))
    with pytest.raises(ValueError, match=r"labels \[151\] outside \[0, 150\]"):
        segmentation_dataset(segmentation_source(out_of_range), "eval")
    rgb_label = segmentation_rows(2)
    rgb_label["annotation"][0] = png(rgb(48, 64, 1))
    with pytest.raises(ValueError, match="mode 'RGB'"):
        segmentation_dataset(segmentation_source(rgb_label), "eval")
    wrong_size = segmentation_rows(2)
    wrong_size["annotation"][0] = png(np.ones((10, 10), np.uint8))
    with pytest.raises(ValueError, match="different sizes"):
        segmentation_dataset(segmentation_source(wrong_size), "eval")
    with pytest.raises(ValueError, match="num_labels"):
        segmentation_dataset(segmentation_source(), "eval", num_labels=0)


def test_segmentation_skip_invalid():
    rows = segmentation_rows(4)
    rows["annotation"][1] = png(np.full((48, 64), 200, np.uint8))
    rows["image"][3] = BROKEN
    with pytest.raises(ValueError, match="row 1"):
        segmentation_dataset(segmentation_source(rows), "eval")[1]
    dataset = segmentation_dataset(segmentation_source(rows), "eval", skip_invalid=True)
    assert len(dataset) == 2 and get_adapter_transform(dataset).num_dropped == 2
    assert "dropped 2 invalid rows: [1, 3]" in dataset.info.description


def test_segmentation_same_items_with_dataloader_workers():
    dataset = segmentation_dataset(segmentation_source(), "train", crop_size=(32, 32), img_scale=(128, 48), seed=7)
    set_epoch(dataset, 2)
    expected = collate_fn([dataset[i] for i in range(4)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_fn)
    batches = list(loader)
    assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), expected["pixel_values"])
    assert torch.equal(torch.cat([b["labels"] for b in batches]), expected["labels"])


# -- referring: masks and sentences ---------------------------------------------------------------------------------


def test_polygon_mask_matches_hand_rasterisation():
    # rectangle with integer corners: exactly pixels [1:3, 1:4]
    expected = np.zeros((5, 6), bool)
    expected[1:3, 1:4] = True
    np.testing.assert_array_equal(polygons_to_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6), expected)
    # right triangle (0,0) (6,0) (0,6): pixel centres (j + .5, i + .5) with (j + .5) + (i + .5) < 6
    triangle = np.array([[int(j + i + 1 < 6) for j in range(6)] for i in range(6)], bool)
    np.testing.assert_array_equal(polygons_to_mask([[0, 0, 6, 0, 0, 6]], 6, 6), triangle)
    # two polygons are united; degenerate ones are ignored; the flat form is one polygon
    union = polygons_to_mask([[0, 0, 2, 0, 2, 2, 0, 2], [3, 3, 5, 3, 5, 5, 3, 5], [1, 1]], 6, 6)
    assert union.sum() == 8 and union[0, 0] and union[4, 4] and not union[2, 2]
    np.testing.assert_array_equal(decode_mask([1, 1, 4, 1, 4, 3, 1, 3], 5, 6), expected)
    np.testing.assert_array_equal(decode_mask(json.dumps({"segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]}), 5, 6), expected)


def test_decode_mask_rle_forms():
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    np.testing.assert_array_equal(decode_mask(rle_encode(mask), 4, 5), mask)
    with pytest.raises(ValueError, match="size"):
        decode_mask(rle_encode(mask), 5, 5)
    with pytest.raises(ValueError, match="unrecognised"):
        decode_mask(42, 4, 5)
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pycocotools"):
            decode_mask({"size": [4, 5], "counts": "52203"}, 4, 5)


# -- referring: embedded layout -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from vpd_hf.testing_utils import save_tiny_clip_tokenizer

    return CLIPTokenizer.from_pretrained(save_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer")))


REFERRING_SENTENCES = [["the red box", "box on the left", "a red object"], ["the green ball"], ["blue", "the blue one"]]


def referring_rows():
    rows = {"image": [], "answer": [], "segmentation": [], "bbox": []}
    for i, sentences in enumerate(REFERRING_SENTENCES):
        rows["image"].append(png(rgb(30, 40, i)))
        rows["answer"].append(sentences)
        rows["segmentation"].append([[5, 5, 20, 5, 20 + i, 25, 5, 25]])  # polygons (lmms-lab/RefCOCO style)
        rows["bbox"].append([5.0, 5.0, 15.0 + i, 20.0])
    return rows


def referring_source(rows=None):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "answer": datasets.List(datasets.Value("string")),
            "segmentation": datasets.List(datasets.List(datasets.Value("float32"))),
            "bbox": datasets.List(datasets.Value("float32")),
        }
    )
    return datasets.Dataset.from_dict(rows or referring_rows(), features=features)


def token_ids(tokenizer, sentence, length=8):
    return tokenizer(sentence, padding="max_length", truncation=True, max_length=length, return_tensors="pt")[
        "input_ids"
    ][0]


def test_referring_train_draws_one_sentence_per_epoch(tokenizer):
    dataset = referring_dataset(referring_source(), "train", tokenizer, token_length=8, image_size=32)
    assert len(dataset) == 3
    item = dataset[0]
    assert set(item) == {"pixel_values", "input_ids", "labels"}
    assert item["pixel_values"].shape == (3, 32, 32) and item["labels"].shape == (32, 32)
    assert item["input_ids"].shape == (8,) and item["input_ids"].dtype == torch.int64
    assert set(item["labels"].unique().tolist()) == {0, 1}
    candidates = [token_ids(tokenizer, s) for s in REFERRING_SENTENCES[0]]
    chosen = []
    for epoch in range(10):
        set_epoch(dataset, epoch)
        ids = dataset[0]["input_ids"]
        matches = [i for i, c in enumerate(candidates) if torch.equal(ids, c)]
        assert len(matches) == 1
        chosen.append(matches[0])
        assert torch.equal(dataset[0]["input_ids"], ids)  # same epoch, same choice
    assert len(set(chosen)) > 1
    assert torch.equal(dataset[1]["input_ids"], token_ids(tokenizer, "the green ball"))


def test_referring_eval_yields_every_sentence(tokenizer):
    dataset = referring_dataset(referring_source(), "eval", tokenizer, token_length=8, image_size=32)
    assert len(dataset) == 6
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["sentence"] for item in items] == [s for group in REFERRING_SENTENCES for s in group]
    for item in items:
        assert torch.equal(item["input_ids"], token_ids(tokenizer, item["sentence"]))
    assert torch.equal(items[0]["labels"], items[2]["labels"])
    expected = polygons_to_mask([[5, 5, 20, 5, 20, 25, 5, 25]], 30, 40)
    resized = np.asarray(Image.fromarray(expected.astype(np.uint8)).resize((32, 32), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(items[0]["labels"].numpy(), resized)
    batch = collate_fn(items[:4])
    assert batch["sentence"] == [item["sentence"] for item in items[:4]]
    assert batch["input_ids"].shape == (4, 8) and batch["labels"].shape == (4, 32, 32)


def test_referring_validation_and_skip_invalid(tokenizer):
    with pytest.raises(ValueError, match="'expressions'"):
        referring_dataset(referring_source(), "eval", tokenizer, sentences_column="expressions")
    with pytest.raises(ValueError, match="layout"):
        referring_dataset(referring_source().remove_columns("image"), "eval", tokenizer)
    with pytest.raises(ValueError, match="image_root"):
        referring_dataset(referring_source(), "eval", tokenizer, layout="annotations")
    rows = referring_rows()
    rows["answer"][1] = []
    rows["image"][2] = BROKEN
    with pytest.raises(ValueError, match="row 1"):
        referring_dataset(referring_source(rows), "train", tokenizer, token_length=8)[1]
    dataset = referring_dataset(referring_source(rows), "eval", tokenizer, token_length=8, skip_invalid=True)
    assert len(dataset) == 3 and get_adapter_transform(dataset).dropped_rows == [1, 2]


# -- referring: annotation layout (jxu124/refcoco) + local COCO pictures --------------------------------------------


def test_referring_annotation_layout(tokenizer, tmp_path):
    root = tmp_path / "train2014"
    root.mkdir()
    picture = rgb(24, 32, 5)
    Image.fromarray(picture).save(root / "COCO_train2014_000000000042.jpg", quality=95)
    polygon = [[4, 4, 20, 4, 20, 16, 4, 16]]
    row = {
        "sentences": [[{"raw": "The Cat", "sent": "the cat", "sent_id": 1, "tokens": ["the", "cat"]}]],
        "raw_anns": [json.dumps({"segmentation": polygon, "bbox": [4, 4, 16, 12], "id": 7})],
        "image_path": ["coco/train2014/COCO_train2014_000000000042.jpg"],
        "file_name": ["COCO_train2014_000000000042_7.jpg"],
        "image_id": [42],
        "split": ["val"],
    }
    source = datasets.Dataset.from_dict(row)
    dataset = referring_dataset(source, "eval", tokenizer, token_length=8, image_size=24, image_root=root)
    item = dataset[0]
    assert item["sentence"] == "the cat"
    assert item["labels"].shape == (24, 24)
    expected = np.asarray(
        Image.fromarray(polygons_to_mask(polygon, 24, 32).astype(np.uint8)).resize((24, 24), Image.Resampling.NEAREST)
    )
    np.testing.assert_array_equal(item["labels"].numpy(), expected)
    moved = source.map(lambda r: {"image_path": "elsewhere/" + r["image_path"].split("/")[-1]})
    assert referring_dataset(moved, "train", tokenizer, token_length=8, image_root=root)[0]["labels"].sum() > 0
    missing = source.map(lambda r: {"image_path": "nope.jpg", "file_name": "nope_1.jpg", "image_id": 1})
    with pytest.raises(ValueError, match="no picture found"):
        referring_dataset(missing, "train", tokenizer, image_root=root)


# -- the synthetic parquet through the three adapters ---------------------------------------------------------------


def test_synthetic_parquet_through_all_adapters(tmp_path, tokenizer):
    save_synthetic_dataset(tmp_path, num_train=2, num_validation=1, height=48, width=64, progress=False)
    scenes = datasets.load_dataset("parquet", data_dir=str(tmp_path / "scenes"))
    referring = datasets.load_dataset("parquet", data_dir=str(tmp_path / "referring"))

    depth = depth_dataset(scenes["train"], "train", scene_column="scene", crop_size=(32, 32))
    item = depth[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["scene_ids"].item() >= 0
    depth_eval = depth_dataset(scenes["validation"], "eval", scene_column="scene")
    np.testing.assert_allclose(depth_eval[0]["labels"].numpy(), np.asarray(scenes["validation"][0]["depth_map"]))
    assert NYU_SCENE_NAMES[depth_eval[0]["scene_ids"].item()] == scenes["validation"][0]["scene"]

    segmentation = segmentation_dataset(scenes["train"], "train", crop_size=(32, 32), img_scale=(128, 48))
    assert segmentation[1]["labels"].max() < 8 or segmentation[1]["labels"].max() == 255
    seg_eval = segmentation_dataset(scenes["validation"], "eval")
    np.testing.assert_array_equal(
        seg_eval[0]["labels"].numpy(), np.asarray(scenes["validation"][0]["annotation"]).astype(np.int64) - 1
    )

    refer = referring_dataset(referring["validation"], "eval", tokenizer, token_length=8, image_size=48)
    assert len(refer) == sum(len(a) for a in referring["validation"]["answer"])
    first = referring["validation"][0]
    mask = decode_mask(first["segmentation"], 48, 64)
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((48, 48), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(refer[0]["labels"].numpy(), resized)
    assert refer[0]["sentence"] == first["answer"][0]
    train = referring_dataset(referring["train"], "train", tokenizer, token_length=8, image_size=48)
    batch = collate_fn([train[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 48, 48) and batch["input_ids"].shape == (3, 8)


# -- collate_fn -----------------------------------------------------------------------------------------------------


def test_collate_pads_different_sizes_to_multiples_of_64():
    examples = [
        {"pixel_values": torch.ones(3, 40, 70), "labels": torch.ones(40, 70, dtype=torch.long), "name": "a"},
        {"pixel_values": torch.ones(3, 65, 30), "labels": torch.ones(65, 30, dtype=torch.long), "name": "b"},
    ]
    batch = collate_fn(examples)
    assert batch["pixel_values"].shape == (2, 3, 128, 128) and batch["pixel_mask"].shape == (2, 128, 128)
    assert batch["pixel_mask"].dtype == torch.int64
    assert batch["pixel_mask"][0, :40, :70].all() and batch["pixel_mask"][0].sum() == 40 * 70
    assert (batch["pixel_values"][0, :, 40:] == 0).all() and (batch["pixel_values"][1, :, :, 30:] == 0).all()
    assert (batch["labels"][0, 40:] == 255).all() and (batch["labels"][0, :40, :70] == 1).all()
    assert batch["name"] == ["a", "b"]
    depth = collate_fn(
        [
            {"pixel_values": torch.ones(3, 4, 4), "labels": torch.full((4, 4), 2.0), "scene_ids": torch.tensor(1)},
            {"pixel_values": torch.ones(3, 6, 4), "labels": torch.full((6, 4), 3.0), "scene_ids": torch.tensor(-1)},
        ],
        pad_to_multiple_of=8,
    )
    assert depth["labels"].shape == (2, 8, 8) and (depth["labels"][0, 4:] == 0).all()
    assert depth["scene_ids"].tolist() == [1, -1]


def test_collate_stacks_equal_sizes_and_checks_inputs():
    batch = collate_fn([{"pixel_values": torch.zeros(3, 8, 8), "labels": torch.zeros(8, 8)}] * 2)
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and "pixel_mask" not in batch
    with pytest.raises(ValueError, match="empty"):
        collate_fn([])
    with pytest.raises(ValueError, match="keys"):
        collate_fn([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="input_ids"):
        collate_fn([{"input_ids": torch.zeros(4)}, {"input_ids": torch.zeros(5)}])
