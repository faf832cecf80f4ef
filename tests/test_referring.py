"""Referring segmentation: model, processor, pipeline and LAVT metrics."""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPTextConfig, CLIPTextModel, pipeline

from vpd_hf import (
    VPDConfig,
    VPDModelForReferringSegmentation,
    VPDProcessor,
    VPDReferringSegmentationOutput,
    compute_referring_metrics,
)
from vpd_hf.examples import load_example_image
from vpd_hf.metrics import ReferringMetricAccumulator, ReferringSegmentationMetric
from vpd_hf.testing_utils import tiny_referring_config
from vpd_hf.visualization import overlay_mask

TOKENS = 8


def randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.decoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


@pytest.fixture(scope="module")
def sd_processor(tiny_sd_dir):
    return VPDProcessor.from_stable_diffusion(tiny_sd_dir, token_length=TOKENS)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize(VPDModelForReferringSegmentation(tiny_referring_config(token_length=TOKENS))).eval()


def ids(n, seed=0):
    return torch.randint(0, 700, (n, TOKENS), generator=torch.Generator().manual_seed(seed))


def test_logits_and_token_attention_maps(model, make_pixels):
    with torch.no_grad():
        output = model(pixel_values=make_pixels(2, 3, 128, 96), input_ids=ids(2), output_attentions=True)
    assert isinstance(output, VPDReferringSegmentationOutput)
    assert output.logits.shape == (2, 2, 16, 12)
    assert [tuple(m.shape) for m in output.attentions] == [(2, TOKENS, 8, 8), (2, TOKENS, 4, 4)]  # padded to 128
    assert [conv.in_channels for conv in (model.decoder.conv1_4, model.decoder.conv1_3, model.decoder.conv1_2)] == [
        64 + 64 + TOKENS,
        32 + 64 + TOKENS,
        32 + 32,
    ]
    probability = output.foreground_probability()
    torch.testing.assert_close(probability, output.logits.softmax(1)[:, 1])
    assert output.foreground_probability((128, 96)).shape == (2, 128, 96)


def test_decoder_matches_the_lavt_procedure(model):
    features = [torch.randn(1, c, s, s) for c, s in ((32, 16), (64 + TOKENS, 8), (64 + TOKENS, 4), (64, 2))]
    d = model.decoder
    with torch.no_grad():
        x = features[3]
        for stage, skip in (("4", features[2]), ("3", features[1]), ("2", features[0])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = torch.cat([x, skip], 1)
            x = F.relu(getattr(d, f"bn1_{stage}")(getattr(d, f"conv1_{stage}")(x)))
            x = F.relu(getattr(d, f"bn2_{stage}")(getattr(d, f"conv2_{stage}")(x)))
        torch.testing.assert_close(d(features), d.conv1_1(x))


def test_one_vae_encode_for_several_expressions(model, make_pixels):
    pixels = make_pixels(2, 3, 64, 64)
    calls = []
    model.vpd.vae.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        shared = model(pixel_values=pixels, input_ids=ids(3), image_indices=torch.tensor([0, 0, 1])).logits
        assert calls == [2]  # one encode of the two images for three expressions
        separate = torch.cat(
            [
                model(pixel_values=pixels[i : i + 1], input_ids=ids(3)[j : j + 1]).logits
                for i, j in ((0, 0), (0, 1), (1, 2))
            ]
        )
        broadcast = model(pixel_values=pixels[:1], input_ids=ids(3)[:2]).logits  # one image, two expressions
    torch.testing.assert_close(shared, separate, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(broadcast, shared[:2], rtol=1e-4, atol=1e-5)


def test_bad_inputs(model, make_pixels):
    pixels = make_pixels(2, 3, 64, 64)
    with pytest.raises(ValueError, match="exactly `token_length` = 8 tokens"):
        model(pixel_values=pixels, input_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="pass `image_indices`"):
        model(pixel_values=pixels, input_ids=ids(3))
    with pytest.raises(ValueError, match=r"`image_indices` must lie in \[0, 1\]"):
        model(pixel_values=pixels, input_ids=ids(2), image_indices=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"`input_ids` .* are required"):
        model(pixel_values=pixels)
    with pytest.raises(ValueError, match=r"needs `config\.text_config`"):
        VPDModelForReferringSegmentation(tiny_referring_config(text_config=None))


def test_weighted_loss_on_upsampled_logits(model, make_pixels):
    pixels = make_pixels(1, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 10:40, 20:50] = 1
    labels[1, :5] = 255
    output = model(pixel_values=pixels, input_ids=ids(2), labels=labels)
    upsampled = F.interpolate(output.logits, size=(64, 64), mode="bilinear", align_corners=True)
    want = F.cross_entropy(upsampled, labels, weight=torch.tensor([0.9, 1.1]), ignore_index=255)
    torch.testing.assert_close(output.loss, want)
    mask = torch.ones(1, 64, 64, dtype=torch.long)
    mask[:, 48:] = 0
    masked = model(pixel_values=pixels, input_ids=ids(2), labels=labels, pixel_mask=mask)
    ignored = labels.clone()
    ignored[:, 48:] = 255
    torch.testing.assert_close(masked.loss, model(pixel_values=pixels, input_ids=ids(2), labels=ignored).loss)
    assert masked.pixel_mask.shape == (2, 64, 64)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_gradients(make_pixels, train_text_encoder):
    torch.manual_seed(0)
    model = VPDModelForReferringSegmentation(tiny_referring_config(TOKENS, train_text_encoder=train_text_encoder))
    model.train()
    labels = torch.randint(0, 2, (2, 64, 64))
    model(pixel_values=make_pixels(2, 3, 64, 64), input_ids=ids(2), labels=labels).loss.backward()
    for name in (
        "decoder.conv1_1.weight",
        "decoder.conv1_4.weight",
        "vpd.text_adapter.gamma",
        "vpd.unet.conv_in.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.vpd.vae.parameters())
    text_grads = [p.grad for p in model.text_encoder.parameters()]
    if train_text_encoder:
        assert all(p.requires_grad for p in model.text_encoder.parameters())
        assert sum(float(g.abs().sum()) for g in text_grads if g is not None) > 0
    else:
        assert not any(p.requires_grad for p in model.text_encoder.parameters())
        assert all(g is None for g in text_grads)


def test_sd15_sized_decoder_parameter_counts():
    text_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                 num_hidden_layers=12, projection_dim=768).to_dict()  # fmt: skip
    counts = {}
    for tokens in (40, 77):
        config = VPDConfig(num_prompts=0, text_config=text_config, token_length=tokens, attention_resolutions=[32, 16])
        with torch.device("meta"):
            model = VPDModelForReferringSegmentation(config)
        counts[tokens] = sum(p.numel() for p in model.decoder.parameters())
        assert model.decoder.conv1_4.in_channels == 1280 + 1280 + tokens
    assert counts == {40: 39_176_962, 77: 39_603_202}  # 39.18 M / 39.60 M
    assert sum(p.numel() for p in model.text_encoder.parameters()) == 123_060_480  # CLIP ViT-L/14 text, 123.06 M


def test_from_stable_diffusion_imports_the_text_encoder(tiny_sd_dir):
    model = VPDModelForReferringSegmentation.from_stable_diffusion(tiny_sd_dir, token_length=TOKENS)
    config = model.config
    assert config.token_length == TOKENS and config.num_prompts == 0 and config.attention_resolutions == [32, 16]
    reference = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder").state_dict()
    for name, tensor in model.text_encoder.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert model.vpd.prompt_embeddings is None


def test_processor_structures_texts_and_masks(sd_processor):
    image_a, image_b = np.zeros((40, 60, 3), np.uint8), np.zeros((50, 50, 3), np.uint8)
    one = sd_processor(images=image_a, text="a box")
    assert one.input_ids.shape == (1, TOKENS) and one.image_indices.tolist() == [0]
    assert one.pixel_values.shape == (1, 3, 512, 512)  # the official plain 512x512 resize
    several = sd_processor(images=image_a, text=["a box", "the red sphere"])
    assert several.image_indices.tolist() == [0, 0] and several.pixel_values.shape[0] == 1
    paired = sd_processor(images=[image_a, image_b], text=["a box", "a sphere"])
    assert paired.image_indices.tolist() == [0, 1]
    nested = sd_processor(images=[image_a, image_b], text=[["a box", "a cone"], ["a sphere"]])
    assert nested.image_indices.tolist() == [0, 0, 1] and nested.input_ids.shape == (3, TOKENS)
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 255
    labeled = sd_processor(images=image_a, text=["left", "right"], masks=[255 - mask, mask])
    assert labeled.labels.shape == (2, 512, 512) and set(labeled.labels.unique().tolist()) == {0, 1}
    assert (labeled.labels[1, :, 260:] == 1).all() and (labeled.labels[1, :, :250] == 0).all()
    with pytest.raises(ValueError, match="empty or non-string expression"):
        sd_processor(images=image_a, text=["a box", "  "])
    with pytest.raises(ValueError, match="one expression per image"):
        sd_processor(images=[image_a, image_b], text=["a", "b", "c"])
    with pytest.raises(ValueError, match="2 `masks` for 1 expressions"):
        sd_processor(images=image_a, text="a", masks=[mask, mask])


def test_overlong_expressions_are_truncated_with_a_warning(sd_processor, caplog):
    long_text = "the small red sphere on the left of the large blue box near the kitchen wall"
    with caplog.at_level(logging.WARNING):
        out = sd_processor(images=np.zeros((8, 8, 3), np.uint8), text=long_text)
    assert out.input_ids.shape == (1, TOKENS)
    assert out.input_ids[0, -1] == sd_processor.tokenizer.eos_token_id  # truncation keeps the end token
    assert "truncated" in caplog.text


def test_save_and_load_with_the_processor(tiny_sd_dir, sd_processor, tmp_path, make_pixels):
    model = randomize(VPDModelForReferringSegmentation.from_stable_diffusion(tiny_sd_dir, token_length=TOKENS))
    model.save_pretrained(tmp_path)
    sd_processor.save_pretrained(tmp_path)
    loaded = VPDModelForReferringSegmentation.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is VPDProcessor and processor.token_length == TOKENS
    inputs = processor(images=load_example_image(), text=["a cup", "the spoon"])
    reference = sd_processor(images=load_example_image(), text=["a cup", "the spoon"])
    for key in reference:
        assert torch.equal(inputs[key], reference[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_post_processing_masks_at_the_original_size(sd_processor):
    logits = torch.zeros(2, 2, 64, 64)
    logits[0, 1, :, 32:] = 4.0  # right half is the object
    logits[1, 0] = 4.0  # nothing
    outputs = VPDReferringSegmentationOutput(logits=logits, pixel_mask=torch.ones(2, 512, 512, dtype=torch.long))
    first, second = sd_processor.post_process_referring_segmentation(outputs, target_sizes=[(40, 60), (40, 60)])
    assert first["mask"].shape == (40, 60) and first["mask"].dtype == torch.bool
    assert first["mask"][:, 32:].all() and not first["mask"][:, :28].any()
    assert not second["mask"].any() and float(second["probabilities"].max()) < 0.1
    strict = sd_processor.post_process_referring_segmentation(outputs, [(40, 60)] * 2, threshold=0.99)
    assert not strict[0]["mask"].any()
    with pytest.raises(ValueError, match="`threshold` must be in"):
        sd_processor.post_process_referring_segmentation(outputs, threshold=2.0)


def test_referring_pipeline(tiny_sd_dir, sd_processor, tmp_path):
    model = randomize(VPDModelForReferringSegmentation.from_stable_diffusion(tiny_sd_dir, token_length=TOKENS))
    model.save_pretrained(tmp_path)
    sd_processor.save_pretrained(tmp_path)
    segmenter = pipeline("referring-image-segmentation", model=str(tmp_path))
    assert type(segmenter.model) is VPDModelForReferringSegmentation and type(segmenter.processor) is VPDProcessor
    photo = load_example_image()
    single = segmenter(photo, text="the cup")
    assert set(single) == {"mask", "score", "text"} and single["text"] == "the cup"
    assert single["mask"].size == photo.size and set(np.unique(np.asarray(single["mask"]))) <= {0, 255}
    assert 0.0 <= single["score"] <= 1.0
    several = segmenter(photo, text=["the cup", "the spoon", "the table"])
    assert [r["text"] for r in several] == ["the cup", "the spoon", "the table"]
    np.testing.assert_array_equal(np.asarray(several[0]["mask"]), np.asarray(single["mask"]))
    # Batched inputs: several images, or per-image texts.
    batch = segmenter([photo, photo.resize((300, 200))], text="the cup")
    assert len(batch) == 2 and batch[1]["mask"].size == (300, 200)
    per_image = segmenter([{"image": photo, "text": "the cup"}, {"image": photo, "text": ["a", "b"]}])
    assert isinstance(per_image[0], dict) and len(per_image[1]) == 2
    # The same as the processor + model + post-processing by hand.
    inputs = sd_processor(images=photo, text="the cup")
    with torch.no_grad():
        outputs = segmenter.model(**inputs)
    (by_hand,) = sd_processor.post_process_referring_segmentation(outputs, [(400, 600)])
    np.testing.assert_array_equal(np.asarray(single["mask"]) == 255, by_hand["mask"].numpy())
    with pytest.raises(ValueError, match="`text` is required"):
        segmenter(photo)
    with pytest.raises(ValueError, match="empty or non-string"):
        segmenter(photo, text="")


def test_lavt_metrics_against_hand_computation():
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[:1] = True  # 4 pixels, inside a
    c = np.zeros((4, 4), bool)
    c[3, 3] = True
    predictions = [a, b, c, np.zeros((4, 4), bool)]
    references = [a, a, b, np.zeros((4, 4), bool)]
    # IoUs: 8/8 = 1, 4/8 = 0.5, 0/5 = 0, empty/empty = 0 (LAVT); cumulative I = 12, U = 21.
    result = compute_referring_metrics(predictions, references)
    assert result["overall_iou"] == pytest.approx(12 / 21)
    assert result["mean_iou"] == pytest.approx(1.5 / 4)
    assert result["precision@0.5"] == pytest.approx(2 / 4) and result["precision@0.6"] == pytest.approx(1 / 4)
    assert result["precision@0.9"] == pytest.approx(1 / 4) and result["num_expressions"] == 4
    streaming = ReferringMetricAccumulator()
    streaming.update(np.stack(predictions[:2]), np.stack(references[:2]))
    streaming.update(predictions[2:], references[2:])
    assert streaming.compute() == result
    metric = ReferringSegmentationMetric()
    metric.add_batch(predictions=predictions[:3], references=references[:3])
    metric.add(prediction=predictions[3], reference=references[3])
    assert metric.compute() == result
    with pytest.raises(TypeError, match="binary masks"):
        compute_referring_metrics([np.zeros((2, 2), np.float32)], [np.zeros((2, 2), bool)])


def test_mask_overlay():
    image = np.zeros((10, 12, 3), np.uint8)
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3:9] = True
    picture = np.asarray(overlay_mask(image, mask, color=(200, 0, 0), alpha=0.5))
    assert picture[5, 5].tolist() == [100, 0, 0] and picture[2, 3].tolist() == [200, 0, 0]  # inside / outline
    assert picture[0, 0].tolist() == [0, 0, 0]
    captioned = overlay_mask(image, mask, caption="the box")
    assert captioned.size == (12, 28)
    with pytest.raises(ValueError, match="image's size"):
        overlay_mask(image, np.zeros((3, 3)))


def test_image_text_modalities():
    assert VPDModelForReferringSegmentation.input_modalities == ("image", "text")
    assert math.isclose(VPDConfig().referring_loss_weights[1], 1.1)


def test_tiny_tokenizer_keeps_every_synthetic_expression_word_whole(sd_processor):
    """The offline tokenizer must not cut synthetic expressions into characters (and then truncate them)."""
    from vpd_hf.data.synthetic import make_synthetic_dataset
    from vpd_hf.testing_utils import TINY_CLIP_VOCAB_SIZE

    tokenizer = sd_processor.tokenizer
    assert len(tokenizer) == TINY_CLIP_VOCAB_SIZE
    rows = make_synthetic_dataset(24, 1, 48, 48, seed=1)["referring"]["train"]
    words = {word for sentences in rows["answer"] for sentence in sentences for word in sentence.split()}
    assert len(words) > 10
    for word in sorted(words):
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    ids = tokenizer("the farthest small object on the left").input_ids
    assert len(ids) == 2 + 7 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
