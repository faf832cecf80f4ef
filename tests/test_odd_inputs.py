"""Odd inputs found by fuzzing: each gives a correct output or a clear error naming the argument."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import vpd_hf
from vpd_hf import VPDImageProcessor, VPDProcessor
from vpd_hf.testing_utils import tiny_vpd_config


@pytest.fixture(scope="module")
def referring_processor(tiny_sd_dir):
    return VPDProcessor.from_stable_diffusion(tiny_sd_dir, token_length=8)


@pytest.mark.parametrize("task", ["depth", "segmentation", "referring"])
@pytest.mark.parametrize(
    "empty",
    [
        np.zeros((0, 0, 3), dtype=np.uint8),
        np.zeros((0, 5), dtype=np.uint8),
        torch.zeros(3, 4, 0),
        Image.new("RGB", (0, 0)),
    ],
    ids=["hwc-0x0", "gray-0x5", "chw-4x0", "pil-0x0"],
)
def test_empty_images_are_a_value_error_naming_images(task, empty):
    with pytest.raises(ValueError, match=r"`images\[0\]` is empty"):
        VPDImageProcessor.for_task(task)(images=empty, return_tensors="pt")


def test_empty_image_in_the_referring_processor(referring_processor):
    with pytest.raises(ValueError, match=r"`images\[1\]` is empty \(0x0"):
        referring_processor(images=[np.zeros((4, 4, 3), np.uint8), np.zeros((0, 0, 3), np.uint8)], text=["a", "b"])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_grayscale_hw_arrays_are_accepted_as_documented(dtype):
    processor = VPDImageProcessor(do_resize=False)
    gray = np.random.default_rng(0).integers(0, 256, (20, 30)).astype(dtype)
    if dtype == np.float32:
        gray /= 255
    out = processor(images=gray, return_tensors="pt")
    expected = torch.from_numpy(np.asarray(gray, np.float32) / (255 if dtype == np.uint8 else 1)) * 2 - 1
    assert out.pixel_values.shape == (1, 3, 64, 64)
    for channel in range(3):
        torch.testing.assert_close(out.pixel_values[0, channel, :20, :30], expected)
    # a list of (H, W) arrays is a list of images, and a torch (H, W) tensor is one image too
    assert processor(images=[gray, gray], return_tensors="pt").pixel_values.shape == (2, 3, 64, 64)
    assert processor(images=torch.from_numpy(gray), return_tensors="pt").pixel_values.shape == (1, 3, 64, 64)


def test_grayscale_arrays_in_the_referring_processor(referring_processor):
    gray = np.random.default_rng(0).integers(0, 256, (20, 30)).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    a = referring_processor(images=gray, text=["the box", "a ball"])
    b = referring_processor(images=rgb, text=["the box", "a ball"])
    assert torch.equal(a.pixel_values, b.pixel_values) and a.image_indices.tolist() == [0, 0]


def test_images_of_unknown_types_are_a_type_error():
    with pytest.raises(TypeError, match="`images`"):
        VPDImageProcessor()(images=42)
    with pytest.raises(ValueError, match=r"`images`.*shape \(2, 2, 2, 2, 2\)"):
        VPDImageProcessor()(images=np.zeros((2, 2, 2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="`images` is empty"):
        VPDImageProcessor()(images=[])


@pytest.mark.parametrize("text", [42, 3.5, {"a": 1}])
def test_referring_processor_rejects_non_text(referring_processor, text):
    with pytest.raises(TypeError, match="`text`"):
        referring_processor(images=np.zeros((8, 8, 3), np.uint8), text=text)


@pytest.mark.parametrize("text", [[[]], [["a"], []], [], ["a", ["b"]]])
def test_referring_processor_rejects_empty_or_mixed_text_groups(referring_processor, text):
    images = [np.zeros((8, 8, 3), np.uint8)] * max(1, len(text))
    with pytest.raises(ValueError, match="`text"):
        referring_processor(images=images, text=text)


def test_float_pil_images_agree_between_processor_and_pipeline(tmp_path):
    """A mode "F" image on PIL's 0-255 scale: the processor reads it as PIL does, and so does the pipeline."""
    from transformers import pipeline

    values = np.random.default_rng(0).uniform(0, 255, (24, 40)).astype(np.float32)
    picture = Image.fromarray(values, mode="F")
    processor = VPDImageProcessor(do_resize=False)
    out = processor(images=picture, return_tensors="pt")
    torch.testing.assert_close(out.pixel_values[0, 1, :24, :40], torch.from_numpy(values / 255 * 2 - 1))

    torch.manual_seed(0)
    model = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config()).eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    estimator = pipeline("depth-estimation", model=str(tmp_path))
    with torch.no_grad():
        manual = processor.post_process_depth_estimation(model(**out), target_sizes=[(24, 40)])[0]["predicted_depth"]
    torch.testing.assert_close(estimator(picture)["predicted_depth"], manual)

    with pytest.raises(ValueError, match="0-255 scale"):
        processor(images=Image.fromarray(values * 2, mode="F"))


def test_auto_processor_on_image_only_folders_returns_the_image_processor(tmp_path, tiny_sd_dir, referring_processor):
    depth = tmp_path / "depth"
    vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config()).save_pretrained(depth)
    VPDImageProcessor.for_task("depth").save_pretrained(depth)
    loaded = AutoProcessor.from_pretrained(depth)
    assert type(loaded) is VPDImageProcessor and loaded.size == VPDImageProcessor.for_task("depth").size

    referring = tmp_path / "referring"
    referring_processor.save_pretrained(referring)
    vpd_hf.VPDModelForReferringSegmentation.from_stable_diffusion(
        tiny_sd_dir, token_length=8, show_progress=False
    ).config.save_pretrained(referring)
    loaded = AutoProcessor.from_pretrained(referring)
    assert type(loaded) is VPDProcessor and loaded.token_length == 8
