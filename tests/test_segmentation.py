"""VPDModelForSegmentation: neck/head, loss, test-time procedures, import from SD, save/load, pipeline."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, CLIPTextModel, CLIPTokenizer, pipeline

from vpd_hf import (
    VPDConfig,
    VPDImageProcessor,
    VPDModelForSegmentation,
    VPDModelForSemanticSegmentation,
    sliding_window_logits,
)
from vpd_hf.examples import load_example_image
from vpd_hf.testing_utils import TINY_SEGMENTATION_HEAD, tiny_segmentation_config

NAMES = ["wall", "floor", "ceiling", "sphere", "box"]


def randomize(model, seed=0):
    """Larger random head weights and prompt rows than the near-constant official init, so outputs vary."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.vpd.prompt_embeddings.copy_(torch.randn(model.vpd.prompt_embeddings.shape, generator=generator))
        for module in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) / math.sqrt(module.weight[0].numel())
                )
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


@pytest.fixture
def seg_model():
    torch.manual_seed(0)
    return randomize(VPDModelForSegmentation(tiny_segmentation_config(NAMES))).eval()


def test_neck_inputs_include_the_attention_map_channels(seg_model, make_pixels):
    assert [conv.in_channels for conv in seg_model.neck.lateral_convs] == [32, 64 + 5, 64 + 5, 64]
    with torch.no_grad():
        backbone = seg_model.vpd(pixel_values=make_pixels(2, 3, 128, 192))
        neck = seg_model.neck(backbone.feature_maps)
    assert [tuple(f.shape) for f in backbone.feature_maps] == [
        (2, 32, 16, 24),
        (2, 69, 8, 12),
        (2, 69, 4, 6),
        (2, 64, 2, 3),
    ]
    assert [tuple(f.shape) for f in neck] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]


def test_fpn_and_semantic_fpn_match_their_definitions(seg_model, make_pixels):
    features = [torch.randn(1, c, s, s) for c, s in zip([32, 69, 69, 64], [16, 8, 4, 2], strict=True)]
    neck, head = seg_model.neck, seg_model.head
    with torch.no_grad():
        laterals = [conv(f) for conv, f in zip(neck.lateral_convs, features, strict=True)]
        for i in (3, 2, 1):  # top-down: nearest x2 and add
            laterals[i - 1] = laterals[i - 1] + laterals[i].repeat_interleave(2, -1).repeat_interleave(2, -2)
        outs = [conv(x) for conv, x in zip(neck.fpn_convs, laterals, strict=True)]
        for got, want in zip(neck(features), outs, strict=True):
            torch.testing.assert_close(got, want)
        # Semantic FPN: level i has max(1, i) conv-BN-ReLU blocks, each followed by x2 upsampling for i > 0.
        assert [sum(isinstance(m, torch.nn.Conv2d) for m in h.modules()) for h in head.scale_heads] == [1, 1, 2, 3]
        total = head.scale_heads[0](outs[0])
        for level in (1, 2, 3):
            x = outs[level]
            for block in head.scale_heads[level]:
                x = block(x)
            total = total + x
        torch.testing.assert_close(head(outs), head.conv_seg(total))


def test_logits_at_one_eighth_and_loss_on_upsampled_logits(seg_model, make_pixels):
    seg_model.config.semantic_inference_mode = "whole"
    pixels = make_pixels(2, 3, 128, 96)
    labels = torch.randint(0, 5, (2, 128, 96), generator=torch.Generator().manual_seed(0))
    labels[0, :40] = 255
    output = seg_model(pixels, labels=labels)
    assert output.logits.shape == (2, 5, 16, 12)
    upsampled = F.interpolate(output.logits, size=(128, 96), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(upsampled, labels, ignore_index=255, reduction="none")
    torch.testing.assert_close(output.loss, per_pixel.sum() / labels.numel())  # mmseg 0.x: ignored pixels count
    assert (per_pixel[labels == 255] == 0).all()
    seg_model.config.semantic_loss_avg_non_ignore = True
    torch.testing.assert_close(
        seg_model(pixels, labels=labels).loss, F.cross_entropy(upsampled, labels, ignore_index=255)
    )


def test_loss_ignores_padding_and_checks_labels(seg_model, make_pixels):
    pixels = make_pixels(1, 3, 64, 64)
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    mask = torch.ones(1, 64, 64, dtype=torch.long)
    mask[:, 32:] = 0
    with_mask = seg_model(pixels, labels=labels, pixel_mask=mask).loss
    ignored = labels.clone()
    ignored[:, 32:] = 255
    torch.testing.assert_close(with_mask, seg_model(pixels, labels=ignored).loss)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        seg_model(pixels, labels=torch.zeros(1, 32, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor of class indices"):
        seg_model(pixels, labels=torch.zeros(1, 64, 64))


def test_gradients_reach_head_neck_adapter_and_unet_not_vae(seg_model, make_pixels):
    seg_model.train()
    labels = torch.randint(0, 5, (2, 64, 64))
    seg_model(make_pixels(2, 3, 64, 64), labels=labels).loss.backward()
    for name in (
        "head.conv_seg.weight",
        "neck.lateral_convs.1.weight",
        "vpd.text_adapter.gamma",
        "vpd.unet.conv_in.weight",
    ):
        assert seg_model.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in seg_model.vpd.vae.parameters())


def reference_sliding_window(fn, image, crop, stride):
    """mmsegmentation's slide_inference, written out independently."""
    _, _, h_img, w_img = image.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds, count = None, torch.zeros(1, 1, h_img, w_img)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits = fn(image[:, :, y1:y2, x1:x2])
            padded = F.pad(logits, (x1, w_img - x2, y1, h_img - y2))
            preds = padded if preds is None else preds + padded
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def test_sliding_windows_match_the_reference_procedure(seg_model, make_pixels):
    image = make_pixels(1, 3, 100, 150)
    with torch.no_grad():
        got = sliding_window_logits(seg_model.dense_logits, image, crop_size=64, stride=40)
        want = reference_sliding_window(seg_model.dense_logits, image, 64, 40)
    assert got.shape == (1, 5, 100, 150)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_slide_equals_a_single_pass_when_the_image_fits_one_window(seg_model, make_pixels):
    image = make_pixels(2, 3, 96, 120)
    seg_model.config.semantic_inference_mode = "slide"
    with torch.no_grad():
        slid = seg_model(image).logits
        single = seg_model.dense_logits(image)
    assert slid.shape == (2, 5, 96, 120)
    torch.testing.assert_close(slid, single)


def test_flip_tta_of_a_symmetric_image_is_symmetric(seg_model, make_pixels):
    half = make_pixels(1, 3, 64, 32)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    with torch.no_grad():
        plain = seg_model.dense_logits(symmetric)
        tta = seg_model.segmentation_logits(symmetric, mode="whole", flip=True)
    torch.testing.assert_close(tta, tta.flip(-1), rtol=1e-5, atol=1e-6)
    want = torch.log((plain.softmax(1) + plain.flip(-1).softmax(1)) / 2)
    torch.testing.assert_close(tta, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)  # the model itself is not flip-equivariant


def test_multi_scale_averages_probabilities(seg_model, make_pixels):
    image = make_pixels(1, 3, 64, 64)
    with torch.no_grad():
        got = seg_model.segmentation_logits(image, mode="whole", scales=[1.0, 1.5])
        large = seg_model.dense_logits(F.interpolate(image, size=(96, 96), mode="bilinear", align_corners=False))
        large = F.interpolate(large, size=(64, 64), mode="bilinear", align_corners=False)
        want = torch.log((seg_model.dense_logits(image).softmax(1) + large.softmax(1)) / 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_test_time_procedure_only_in_eval_without_labels(seg_model, make_pixels):
    seg_model.config.semantic_inference_mode = "slide"
    pixels = make_pixels(1, 3, 64, 64)
    assert seg_model(pixels).logits.shape == (1, 5, 64, 64)  # eval, no labels: test procedure, input resolution
    assert seg_model(pixels, labels=torch.zeros(1, 64, 64, dtype=torch.long)).logits.shape == (1, 5, 8, 8)
    assert seg_model.train()(pixels.expand(2, -1, -1, -1)).logits.shape == (2, 5, 8, 8)  # BatchNorm needs 2 values
    with pytest.raises(ValueError, match="describe one pass"):
        seg_model.eval()(pixels, output_hidden_states=True)


def test_padded_batches_are_predicted_on_each_image_region(seg_model, make_pixels):
    seg_model.config.semantic_inference_mode = "slide"
    seg_model.config.semantic_inference_crop_size = 64
    seg_model.config.semantic_inference_stride = 40
    small, large = make_pixels(1, 3, 70, 50, seed=1), make_pixels(1, 3, 100, 120, seed=2)
    batch = torch.zeros(2, 3, 128, 128)
    mask = torch.zeros(2, 128, 128, dtype=torch.long)
    batch[0, :, :70, :50], mask[0, :70, :50] = small[0], 1
    batch[1, :, :100, :120], mask[1, :100, :120] = large[0], 1
    with torch.no_grad():
        logits = seg_model(batch, pixel_mask=mask).logits
        alone = seg_model.segmentation_logits(small)
    torch.testing.assert_close(logits[0, :, :70, :50], alone[0])
    assert (logits[0, :, 70:] == 0).all()


def test_save_and_load_through_the_auto_class(seg_model, make_pixels, tmp_path):
    seg_model.save_pretrained(tmp_path)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    assert type(loaded) is VPDModelForSegmentation is VPDModelForSemanticSegmentation
    for name, tensor in seg_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.config.id2label == dict(enumerate(NAMES))
    pixels = make_pixels(1, 3, 64, 64)
    with (
        torch.no_grad()
    ):  # same weights; loaded tensors are not 64-byte aligned, so CPU kernels may differ in the last bit
        torch.testing.assert_close(loaded.eval()(pixels).logits, seg_model(pixels).logits, rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_conversion_keeps_the_weights(seg_model, make_pixels):
    keys = dict(seg_model.state_dict())
    converted = seg_model.convert_sync_batchnorm()
    assert converted is seg_model
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in seg_model.head.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in seg_model.modules())
    assert dict(seg_model.state_dict()).keys() == keys.keys()
    with torch.no_grad():  # eval mode uses the running statistics, no process group needed
        assert seg_model(make_pixels(1, 3, 64, 64)).logits.shape == (1, 5, 8, 8)


def test_one_prompt_per_label_is_required():
    with pytest.raises(ValueError, match="one class prompt per label"):
        VPDModelForSegmentation(tiny_segmentation_config(NAMES, num_prompts=4, prompt_names=None))


def test_sd15_sized_neck_and_head_parameter_counts():
    names = [str(i) for i in range(150)]
    config = VPDConfig(
        num_prompts=150, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        attention_resolutions=[32, 16],
    )  # fmt: skip
    with torch.device("meta"):
        model = VPDModelForSegmentation(config)
    assert [conv.in_channels for conv in model.neck.lateral_convs] == [320, 640 + 150, 1280 + 150, 1280]
    assert sum(p.numel() for p in model.neck.parameters()) == 3_339_264  # FPN neck, 3.34 M
    assert sum(p.numel() for p in model.head.parameters()) == 4_170_902  # Semantic FPN head, 4.17 M


def test_from_stable_diffusion_with_a_few_classes(tiny_sd_dir):
    model = VPDModelForSegmentation.from_stable_diffusion(
        tiny_sd_dir, class_names=NAMES, show_progress=False, **TINY_SEGMENTATION_HEAD
    )
    config = model.config
    assert config.id2label == dict(enumerate(NAMES)) and config.label2id == {n: i for i, n in enumerate(NAMES)}
    assert config.num_prompts == 5 and config.prompt_templates == ["a photo of a {}."]
    assert config.attention_resolutions == [32, 16] and config.semantic_inference_mode == "slide"
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder").eval()
    ids = tokenizer([f"a photo of a {n}." for n in NAMES], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        pooled = encoder(input_ids=ids.input_ids).pooler_output
    torch.testing.assert_close(model.vpd.prompt_embeddings, pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unique"):
        VPDModelForSegmentation.from_stable_diffusion(tiny_sd_dir, class_names=["a", "a"])


def test_image_segmentation_pipeline(tiny_sd_dir, tmp_path):
    model = VPDModelForSegmentation.from_stable_diffusion(
        tiny_sd_dir, class_names=NAMES, show_progress=False, semantic_inference_crop_size=256,
        semantic_inference_stride=170, **TINY_SEGMENTATION_HEAD,
    )  # fmt: skip
    randomize(model)
    model.save_pretrained(tmp_path)
    processor = VPDImageProcessor(size={"shortest_edge": 256, "longest_edge": 1024}, do_reduce_labels=True)
    processor.save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    assert type(segmenter.model) is VPDModelForSegmentation
    photo = load_example_image()
    results = segmenter(photo)
    assert results and all(set(r) == {"label", "mask", "score"} for r in results)
    assert {r["label"] for r in results} <= set(NAMES)
    masks = np.stack([np.asarray(r["mask"]) for r in results])
    assert masks.shape[1:] == (400, 600) and set(np.unique(masks)) <= {0, 255}
    assert (masks.astype(bool).sum(0) == 1).all()  # the masks partition the image
    # The same as processor + eval-mode model (sliding windows) + post-processing by hand.
    inputs = processor(images=photo, return_tensors="pt")
    with torch.no_grad():
        outputs = segmenter.model(**inputs)
    assert outputs.logits.shape[-2:] == inputs.pixel_values.shape[-2:]  # test procedure: input resolution
    by_hand = processor.post_process_semantic_segmentation(outputs, target_sizes=[(400, 600)])[0]
    for result in results:
        label = NAMES.index(result["label"])
        assert np.array_equal(np.asarray(result["mask"]) == 255, (by_hand == label).numpy())


def test_processor_segmentation_maps_and_post_processing():
    processor = VPDImageProcessor(size={"shortest_edge": 32, "longest_edge": 128}, do_reduce_labels=True)
    annotation = np.zeros((16, 24), np.uint8)
    annotation[:, 12:] = 3  # right half: class 3 -> 2 after reduction; left half: 0 -> 255 (ignored)
    annotation[0, 0] = 255  # stays ignored
    inputs = processor(images=np.zeros((16, 24, 3), np.uint8), segmentation_maps=Image.fromarray(annotation),
                       return_tensors="pt")  # fmt: skip
    labels = inputs.labels
    assert labels.dtype == torch.int64 and labels.shape == (1, 64, 64)
    assert (labels[0, :32, 24:48] == 2).all() and (labels[0, :32, :24] == 255).all()
    assert (labels[0, 32:] == 255).all() and (labels[0, :, 48:] == 255).all()  # padding
    with pytest.raises(ValueError, match="has size"):
        processor(images=np.zeros((16, 24, 3), np.uint8), segmentation_maps=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        processor(images=np.zeros((16, 24, 3), np.uint8), segmentation_maps=np.zeros((16, 24), np.float32))
    with pytest.raises(ValueError, match="1 images"):
        processor(images=np.zeros((16, 24, 3), np.uint8), segmentation_maps=[annotation, annotation])

    # Post-processing: 1/8 logits of a padded batch -> the image region -> target size.
    logits = torch.zeros(1, 3, 8, 8)
    logits[0, 1, :, :4] = 1.0  # class 1 on the left half of the 64x64 input grid
    logits[0, 2, :, 4:] = 1.0
    mask = torch.zeros(1, 64, 64, dtype=torch.long)
    mask[0, :32, :48] = 1
    from vpd_hf import VPDSemanticSegmenterOutput

    outputs = VPDSemanticSegmenterOutput(logits=logits, pixel_mask=mask)
    (native,) = processor.post_process_semantic_segmentation(outputs)
    assert native.shape == (32, 48) and (native[:, :30] == 1).all() and (native[:, 34:] == 2).all()
    (resized,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(16, 24)])
    assert resized.shape == (16, 24) and (resized[:, :15] == 1).all() and (resized[:, 17:] == 2).all()
    overlay = processor.visualize_segmentation(np.zeros((16, 24, 3), np.uint8), resized, {1: "one", 2: "two"})
    assert overlay.height == 16 and overlay.width > 24
