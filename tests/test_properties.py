"""Property-based checks (hypothesis) of the pre/post-processing geometry and the metric invariances."""

import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.image_utils import SizeDict

from vpd_hf import VPDDepthEstimatorOutput, VPDImageProcessor
from vpd_hf.image_processing_vpd import _target_size
from vpd_hf.metrics import image_depth_metrics

sizes = st.tuples(st.integers(1, 200), st.integers(1, 200))


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(sizes, min_size=1, max_size=3), divisor=st.sampled_from([1, 8, 32, 64]))
def test_padding_and_unpadding_are_exact(shapes, divisor):
    processor = VPDImageProcessor(do_resize=False, size_divisor=divisor)
    # PIL images: an (h, w, 3) array with h or w in (1, 3, 4) is channel-ambiguous for transformers.
    images = [Image.fromarray(np.full((h, w, 3), i * 40, np.uint8)) for i, (h, w) in enumerate(shapes)]
    inputs = processor(images=images, return_tensors="pt")
    height, width = inputs.pixel_values.shape[-2:]
    assert height % divisor == 0 and width % divisor == 0
    assert height == -(-max(h for h, _ in shapes) // divisor) * divisor
    assert width == -(-max(w for _, w in shapes) // divisor) * divisor
    for i, (h, w) in enumerate(shapes):
        assert int(inputs.pixel_mask[i].sum()) == h * w and bool(inputs.pixel_mask[i, :h, :w].all())
    # A "depth" that encodes the pixel position comes back as exactly the valid region of each image.
    position = torch.arange(height * width, dtype=torch.float32).reshape(height, width)
    outputs = VPDDepthEstimatorOutput(predicted_depth=position.expand(len(shapes), -1, -1),
                                      pixel_mask=inputs.pixel_mask)  # fmt: skip
    for (h, w), result in zip(shapes, processor.post_process_depth_estimation(outputs), strict=True):
        assert torch.equal(result["predicted_depth"], position[:h, :w])


@settings(max_examples=200, deadline=None)
@given(shape=st.tuples(st.integers(1, 5000), st.integers(1, 5000)))
def test_default_resize_keeps_the_aspect_ratio_within_the_frame(shape):
    height, width = shape
    new_h, new_w = _target_size(height, width, SizeDict(shortest_edge=480, longest_edge=640))
    assert min(new_h, new_w) <= 480 and max(new_h, new_w) <= 640
    assert min(new_h, new_w) == 480 or max(new_h, new_w) == 640  # as large as the frame allows
    assume(min(new_h, new_w) >= 8)  # extreme strips are clamped to >= 1 pixel, where the ratio cannot hold
    # Aspect ratio kept up to the rounding of each side.
    assert abs(new_h / new_w - height / width) <= (height / width) * (1 / new_h + 1 / new_w) + 1e-9


depth_maps = st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed))


@settings(max_examples=50, deadline=None)
@given(rng=depth_maps, scale=st.floats(0.2, 5.0))
def test_metrics_are_invariant_to_units_except_the_absolute_errors(rng, scale):
    gt = rng.uniform(0.5, 1.8, (6, 6))
    pred = gt * rng.uniform(0.7, 1.4, (6, 6))
    base = image_depth_metrics(pred, gt, max_depth=100.0)
    scaled = image_depth_metrics(pred * scale, gt * scale, max_depth=100.0)
    for name in ("d1", "d2", "d3", "abs_rel", "rmse_log", "log10", "silog"):
        assert scaled[name] == base[name] or abs(scaled[name] - base[name]) < 1e-9, name
    assert abs(scaled["rmse"] - scale * base["rmse"]) < 1e-9
    assert abs(scaled["sq_rel"] - scale * base["sq_rel"]) < 1e-9
