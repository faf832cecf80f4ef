"""VPDImageProcessor: input formats, resizing, normalisation, padding, post-processing, serialisation."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from vpd_hf import VPDDepthEstimatorOutput, VPDImageProcessor


@pytest.fixture
def processor():
    return VPDImageProcessor(do_resize=False)


def rgb_array(height=20, width=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_normalises_to_minus_one_one_and_pads_to_64(processor):
    array = rgb_array(20, 30)
    out = processor(images=Image.fromarray(array), return_tensors="pt")
    assert out.pixel_values.shape == (1, 3, 64, 64) and out.pixel_values.dtype == torch.float32
    expected = torch.from_numpy(array).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(out.pixel_values[0, :, :20, :30], expected)
    assert torch.all(out.pixel_values[0, :, 20:] == 0) and torch.all(out.pixel_values[0, :, :, 30:] == 0)
    mask = torch.zeros(1, 64, 64, dtype=torch.long)
    mask[0, :20, :30] = 1
    assert torch.equal(out.pixel_mask, mask)


@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a,  # HWC uint8
        lambda a: np.ascontiguousarray(a.transpose(2, 0, 1)),  # CHW uint8
        lambda a: a.astype(np.float32) / 255,  # HWC float in [0, 1]
        lambda a: torch.from_numpy(a).permute(2, 0, 1),  # CHW uint8 tensor
        lambda a: torch.from_numpy(a.astype(np.float64) / 255),  # HWC float64 tensor
        lambda a: Image.fromarray(a),
        lambda a: np.concatenate([a, np.full((*a.shape[:2], 1), 255, np.uint8)], axis=-1),  # RGBA array
    ],
)
def test_input_formats_agree(processor, convert):
    array = rgb_array(24, 40)
    reference = processor(images=Image.fromarray(array), return_tensors="pt").pixel_values
    got = processor(images=convert(array), return_tensors="pt").pixel_values
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)


def test_pil_modes_become_rgb(processor):
    gray = Image.fromarray(np.full((8, 8), 51, np.uint8))
    out = processor(images=gray, return_tensors="pt").pixel_values
    torch.testing.assert_close(out[0, :, :8, :8], torch.full((3, 8, 8), 51 / 255 * 2 - 1))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: composited on white
    torch.testing.assert_close(
        processor(images=rgba, return_tensors="pt").pixel_values[0, :, :8, :8], torch.ones(3, 8, 8)
    )
    deep = Image.fromarray(np.full((8, 8), 65535 // 4, np.uint16))  # 16-bit grayscale keeps its precision
    value = processor(images=deep, return_tensors="pt").pixel_values[0, 0, 0, 0]
    assert float(value) == pytest.approx((65535 // 4) / 65535 * 2 - 1, abs=1e-6)
    for mode in ("P", "CMYK", "LA", "1", "YCbCr"):
        assert processor(images=Image.new(mode, (8, 8)), return_tensors="pt").pixel_values.shape == (1, 3, 64, 64)


def test_default_resize_keeps_aspect_ratio_in_the_nyu_frame():
    processor = VPDImageProcessor()
    cases = {(3000, 4000): (480, 640), (1080, 1920): (360, 640), (240, 320): (480, 640), (640, 480): (640, 480)}
    for (height, width), (want_h, want_w) in cases.items():
        out = processor(images=np.zeros((height, width, 3), np.uint8), return_tensors="pt")
        assert int(out.pixel_mask[0].any(1).sum()) == want_h and int(out.pixel_mask[0].any(0).sum()) == want_w
        assert out.pixel_values.shape[-2] % 64 == 0 and out.pixel_values.shape[-1] % 64 == 0


def test_resize_is_bilinear_on_float_planes():
    processor = VPDImageProcessor(size={"height": 4, "width": 4}, do_normalize=False)
    ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (8, 1))
    out = processor(images=np.stack([ramp] * 3, -1), return_tensors="pt").pixel_values[0, 0, :4, :4]
    want = np.array(Image.fromarray(ramp).resize((4, 4), Image.Resampling.BILINEAR))
    torch.testing.assert_close(out, torch.from_numpy(want))


def test_batch_of_different_sizes_is_padded_together(processor):
    out = processor(images=[rgb_array(20, 30), rgb_array(70, 10)], return_tensors="pt")
    assert out.pixel_values.shape == (2, 3, 128, 64)
    assert out.pixel_mask[0].sum() == 20 * 30 and out.pixel_mask[1].sum() == 70 * 10


def test_without_padding(processor):
    out = processor(images=rgb_array(20, 30), do_pad=False, return_tensors="pt")
    assert out.pixel_values.shape == (1, 3, 20, 30) and "pixel_mask" not in out
    with pytest.raises(ValueError, match=r"different sizes .* `do_pad=True`"):
        processor(images=[rgb_array(20, 30), rgb_array(21, 30)], do_pad=False, return_tensors="pt")


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (np.full((8, 8, 3), 2.0, np.float32), ValueError, r"Float images must hold values in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), ValueError, r"Float images must hold values in \[0, 1\]"),
        (np.zeros((8, 8, 3), np.int32), TypeError, "must be uint8"),
        (np.zeros((8, 8, 3), bool), TypeError, "must be uint8"),
        (np.zeros((8, 8, 2), np.uint8), ValueError, "channel"),
        (np.zeros((8,), np.uint8), ValueError, "`images` must be one image or a list of images"),
        ("not an image", ValueError, "`images` must be one image or a list of images"),
        (object(), TypeError, "`images` must be one image or a list of images"),
    ],
)
def test_bad_images(processor, image, error, message):
    with pytest.raises(error, match=message):
        processor(images=image, return_tensors="pt")


def test_post_processing_removes_padding_then_resizes(processor):
    inputs = processor(images=[rgb_array(20, 30), rgb_array(50, 40)], return_tensors="pt")
    depth = torch.arange(2 * 64 * 64, dtype=torch.float32).reshape(2, 64, 64)
    outputs = VPDDepthEstimatorOutput(predicted_depth=depth, pixel_mask=inputs.pixel_mask)
    raw = processor.post_process_depth_estimation(outputs)
    assert [tuple(r["predicted_depth"].shape) for r in raw] == [(20, 30), (50, 40)]
    assert torch.equal(raw[1]["predicted_depth"], depth[1, :50, :40])
    resized = processor.post_process_depth_estimation(outputs, target_sizes=[(40, 60), (25, 20)])
    assert [tuple(r["predicted_depth"].shape) for r in resized] == [(40, 60), (25, 20)]
    want = torch.nn.functional.interpolate(depth[None, :1, :20, :30], size=(40, 60), mode="bilinear")[0, 0]
    torch.testing.assert_close(resized[0]["predicted_depth"], want)
    # Tensor target sizes, as some callers pass them, and outputs without a mask.
    no_mask = processor.post_process_depth_estimation(
        VPDDepthEstimatorOutput(predicted_depth=depth), target_sizes=torch.tensor([[64, 64], [32, 32]])
    )
    assert torch.equal(no_mask[0]["predicted_depth"], depth[0])


def test_post_processing_validates_target_sizes(processor):
    outputs = VPDDepthEstimatorOutput(predicted_depth=torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="2 predictions"):
        processor.post_process_depth_estimation(outputs, target_sizes=[(8, 8)])
    with pytest.raises(ValueError, match="positive ints"):
        processor.post_process_depth_estimation(outputs, target_sizes=[(8, 8), (0, 4)])


def test_round_trip_through_auto_image_processor(tmp_path):
    processor = VPDImageProcessor(size={"shortest_edge": 352, "longest_edge": 1216}, size_divisor=32)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VPDImageProcessor
    assert loaded.size_divisor == 32 and dict(loaded.size) == {"shortest_edge": 352, "longest_edge": 1216}
    image = rgb_array(100, 120)
    assert torch.equal(loaded(images=image, return_tensors="pt").pixel_values,
                       processor(images=image, return_tensors="pt").pixel_values)  # fmt: skip


def test_task_presets():
    seg = VPDImageProcessor.for_task("segmentation")
    assert dict(seg.size) == {"shortest_edge": 512, "longest_edge": 2048} and seg.do_reduce_labels
    out = seg(images=np.zeros((600, 800, 3), np.uint8), return_tensors="pt")
    assert int(out.pixel_mask[0].any(1).sum()) == 512 and int(out.pixel_mask[0].any(0).sum()) == 683
    depth = VPDImageProcessor.for_task("depth", size_divisor=32)
    assert dict(depth.size) == {"shortest_edge": 480, "longest_edge": 640} and depth.size_divisor == 32
    with pytest.raises(ValueError, match="`task` must be one of"):
        VPDImageProcessor.for_task("panoptic")
