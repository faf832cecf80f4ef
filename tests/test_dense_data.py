"""Surface-normal and multi-task data: the 8-bit normal-map codec, `dense_dataset` / `normals_dataset` against the
synthetic scenes' exact labels, the shared augmentation (a flip negates x), mixed labels, padding and bad inputs."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vpd_hf.data import (
    DenseAugmentation,
    collate_fn,
    decode_normals,
    dense_dataset,
    encode_normals,
    generate_scene,
    make_synthetic_dataset,
    normals_dataset,
)
from vpd_hf.data.normals import convert_normal_convention
from vpd_hf.data.segmentation import reduce_labels

SIZE = (32, 48)


@pytest.fixture(scope="module")
def scenes():
    return make_synthetic_dataset(num_train=2, num_validation=2, height=SIZE[0], width=SIZE[1], seed=3)["scenes"]


def angle_degrees(a, b):
    return np.degrees(np.arccos(np.clip(np.sum(a * b, axis=-1), -1.0, 1.0)))


def test_normal_codec_round_trip_conventions_and_invalid_pixels():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(6, 7, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[0, :3] = 0.0  # invalid
    encoded = encode_normals(normals)
    assert encoded.dtype == np.uint8 and (encoded[0, :3] == 0).all() and (encoded[1:] != 0).any(axis=-1).all()
    # The usual image encoding, written out: rgb = round((n + 1) * 255 / 2).
    np.testing.assert_array_equal(encoded[2, 4], np.round((normals[2, 4] + 1) * 127.5).astype(np.uint8))
    decoded = decode_normals(encoded)
    assert decoded.dtype == np.float32 and (decoded[0, :3] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(decoded[1:], axis=-1), 1.0, atol=1e-6)
    assert angle_degrees(decoded[1:], normals[1:]).max() < 0.5
    # A map stored in OpenCV's frame (y down, z away from the camera) comes back in Marigold's.
    opencv = encode_normals(normals * np.array([1, -1, -1]))
    np.testing.assert_allclose(decode_normals(opencv, "opencv"), decoded, atol=1e-6)
    np.testing.assert_allclose(convert_normal_convention(normals, (1, -1, -1)), normals * [1, -1, -1])
    with pytest.raises(ValueError, match="convention"):
        decode_normals(encoded, "opengl")
    with pytest.raises(ValueError, match="uint8"):
        decode_normals(decoded)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        encode_normals(normals[..., :2])


def test_dense_eval_items_are_the_synthetic_labels(scenes):
    items = dense_dataset(scenes["validation"], "eval", num_labels=8)
    item = items[1]
    sample = generate_scene(1, seed=3, split="validation", height=SIZE[0], width=SIZE[1])
    assert set(item) == {"pixel_values", "depth_labels", "segmentation_labels", "normal_labels"}
    np.testing.assert_allclose(item["pixel_values"].numpy(), sample.image.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(item["depth_labels"].numpy(), np.where(sample.depth < 10, sample.depth, 0))
    np.testing.assert_array_equal(item["segmentation_labels"].numpy(), reduce_labels(sample.semantic))
    normals = item["normal_labels"].numpy().transpose(1, 2, 0)
    assert item["normal_labels"].shape == (3, *SIZE) and angle_degrees(normals, sample.normals).max() < 0.5
    # The normals-only adapter gives the same normals under `labels`.
    single = normals_dataset(scenes["validation"], "eval")[1]
    assert set(single) == {"pixel_values", "labels"} and torch.equal(single["labels"], item["normal_labels"])
    only_two = dense_dataset(scenes["validation"], "eval", tasks=["normals", "depth"])[0]
    assert set(only_two) == {"pixel_values", "depth_labels", "normal_labels"}


def test_augmentation_moves_every_label_with_the_image_and_a_flip_negates_x():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    normals = rng.normal(size=(10, 12, 3)).astype(np.float32)
    labels = {"depth": rng.uniform(1, 5, (10, 12)).astype(np.float32), "segmentation": rng.integers(0, 8, (10, 12)),
              "normals": normals}  # fmt: skip
    flip = DenseAugmentation((10, 12), flip_prob=1.0, photometric=False)
    pixel_values, out = flip(image, labels, np.random.default_rng(0))
    np.testing.assert_array_equal(out["depth"], labels["depth"][:, ::-1])
    np.testing.assert_array_equal(out["segmentation"], labels["segmentation"][:, ::-1])
    np.testing.assert_array_equal(out["normals"], normals[:, ::-1] * np.array([-1, 1, 1], dtype=np.float32))
    np.testing.assert_allclose(pixel_values.numpy(), image[:, ::-1].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    # A crop larger than the image pads every label with its invalid value; smaller crops line up with the image.
    pad = DenseAugmentation((12, 16), flip_prob=0.0, photometric=False)
    pixel_values, out = pad(image, labels, np.random.default_rng(0))
    assert pixel_values.shape == (3, 12, 16) and (pixel_values[:, 10:] == 0).all()
    assert (out["depth"][10:] == 0).all() and (out["segmentation"][:, 12:] == 255).all()
    assert (out["normals"][10:] == 0).all()
    crop = DenseAugmentation((6, 5), flip_prob=0.0, photometric=False)
    pixel_values, out = crop(image, labels, np.random.default_rng(4))
    (y,), (x,) = np.nonzero(labels["depth"] == out["depth"][0, 0])
    np.testing.assert_array_equal(out["normals"], normals[y : y + 6, x : x + 5])
    np.testing.assert_array_equal(out["segmentation"], labels["segmentation"][y : y + 6, x : x + 5])


def test_train_items_are_deterministic_crops_and_mixed_labels_batch(scenes):
    train = dense_dataset(scenes["train"], "train", crop_size=(24, 24), num_labels=8, seed=5)
    first, again = train[0], train[0]
    assert first["pixel_values"].shape == (3, 24, 24) and first["normal_labels"].shape == (3, 24, 24)
    assert all(torch.equal(first[k], again[k]) for k in first)
    valid = first["normal_labels"].abs().sum(0) > 0
    assert valid.all() and torch.allclose(first["normal_labels"].norm(dim=0), torch.ones(()), atol=1e-5)
    # Mixed labels: an image without normals or segmentation gets all-invalid labels and still batches.
    rows = scenes["validation"].cast_column("normal_map", datasets.Image(decode=False)).to_dict()
    rows["normal_map"][1] = None
    rows["annotation"][0] = None
    mixed = datasets.Dataset.from_dict(rows, features=scenes["validation"].features)
    items = dense_dataset(mixed, "eval", num_labels=8)
    batch = collate_fn([items[0], items[1]])
    assert batch["normal_labels"].shape == (2, 3, *SIZE) and (batch["normal_labels"][1] == 0).all()
    assert (batch["segmentation_labels"][0] == 255).all() and (batch["normal_labels"][0] != 0).any()
    # Images of different sizes: labels are padded with their invalid values, as the image.
    small = {k: v[..., :20, :30] for k, v in items[0].items()}
    padded = collate_fn([small, items[1]], pad_to_multiple_of=16)
    assert padded["normal_labels"].shape == (2, 3, 32, 48) and (padded["normal_labels"][0, :, 20:] == 0).all()
    assert (padded["segmentation_labels"][0, :, 30:] == 255).all() and padded["pixel_mask"][0, :, 30:].sum() == 0


def test_bad_arguments_and_columns(scenes):
    validation = scenes["validation"]
    with pytest.raises(ValueError, match="tasks"):
        dense_dataset(validation, "eval", tasks=["depth", "referring"])
    with pytest.raises(ValueError, match="tasks"):
        dense_dataset(validation, "eval", tasks="depth")
    with pytest.raises(ValueError, match="'surface_normals'"):
        normals_dataset(validation, "eval", normal_column="surface_normals")
    with pytest.raises(ValueError, match="normal_convention"):
        normals_dataset(validation, "eval", normal_convention="dsine")
    grey = validation.cast_column("normal_map", datasets.Image(decode=False)).to_dict()
    grey["normal_map"] = [Image.fromarray(np.zeros(SIZE, dtype=np.uint8)) for _ in grey["normal_map"]]
    with pytest.raises(ValueError, match="8-bit RGB"):
        normals_dataset(datasets.Dataset.from_dict(grey, features=validation.features), "eval")
