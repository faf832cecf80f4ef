"""VPDModelForDepthEstimation: the official head procedure, loss, conditioning, save/load, initialisation, sizes."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import AutoConfig, AutoModel, AutoModelForDepthEstimation

from vpd_hf import SD15_UNET_CONFIG, VPDConfig, VPDModel, VPDModelForDepthEstimation
from vpd_hf.losses import silog_loss
from vpd_hf.testing_utils import tiny_vpd_config


def official_vpd_depth(model, pixels, scene_ids):
    """The reference `VPDDepth.forward` for a 480x480 (or 352x352) input, written from the official procedure:
    zero-pad to 512 (384), run the encoder, drop the last row/column of the neck output, decode, two bilinear x2."""
    size = pixels.shape[-1]
    padded_size = {480: 512, 352: 384}[size]
    padded = torch.zeros(pixels.shape[0], 3, padded_size, padded_size)
    padded[:, :, :size, :size] = pixels
    prompt = model.vpd.get_prompt_embeddings(scene_ids, pixels.shape[0])
    f8, f16, f32, f64 = model.vpd(pixel_values=padded, prompt_embeds=prompt).feature_maps
    neck = model.head.neck
    x = torch.cat([neck.layer1(f8), neck.layer2(f16), torch.cat([f32, F.interpolate(f64, scale_factor=2)], 1)], 1)
    conv_feats = neck.out_layer(x)[:, :, :-1, :-1]
    decoder = model.head.decoder
    out = decoder.conv_layers(decoder.deconv_layers(conv_feats))
    up = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    out = up(up(out))
    return torch.sigmoid(model.head.last_layer_depth(out)) * model.config.max_depth


def randomize_head(model, seed=0):
    """The official init makes the head output ~max_depth / 2 everywhere; draw larger weights and BatchNorm statistics
    so that the output depends on the features."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.head.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in))
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)


@pytest.mark.parametrize("size", [480, 352])
def test_matches_the_official_padded_crop_procedure(depth_model, make_pixels, size):
    pixels = make_pixels(1, 3, size, size)
    scene_ids = torch.tensor([3])
    randomize_head(depth_model)
    with torch.no_grad():
        got = depth_model(pixels, scene_ids=scene_ids).predicted_depth
        want = official_vpd_depth(depth_model, pixels, scene_ids)[:, 0]
    assert got.shape == (1, size, size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.std() > 1e-3  # not a constant map


@pytest.mark.parametrize(("height", "width"), [(480, 640), (100, 130), (64, 64), (33, 250)])
def test_output_has_the_input_size(depth_model, make_pixels, height, width):
    with torch.no_grad():
        depth = depth_model(make_pixels(2, 3, height, width)).predicted_depth
    assert depth.shape == (2, height, width)
    assert bool(((depth > 0) & (depth < depth_model.config.max_depth)).all())


def test_loss_is_silog_over_valid_pixels(depth_model, make_pixels):
    pixels = make_pixels(2, 3, 64, 96)
    labels = torch.rand(2, 64, 96) * 9 + 0.5
    labels[0, :10] = 0  # no depth
    mask = torch.ones(2, 64, 96, dtype=torch.long)
    mask[:, :, 80:] = 0  # padding
    output = depth_model(pixels, labels=labels, pixel_mask=mask)
    expected = silog_loss(output.predicted_depth, labels, 0.5, valid_mask=mask)
    torch.testing.assert_close(output.loss, expected)
    d = torch.log(labels[(labels > 0) & mask.bool()]) - torch.log(output.predicted_depth[(labels > 0) & mask.bool()])
    torch.testing.assert_close(output.loss, torch.sqrt((d**2).mean() - 0.5 * d.mean() ** 2))
    assert output.pixel_mask is mask
    assert depth_model(pixels).loss is None


def test_loss_trains_head_adapter_and_unet_not_vae(depth_model, make_pixels):
    depth_model.train()
    output = depth_model(make_pixels(2, 3, 64, 64), labels=torch.rand(2, 64, 64) * 5 + 1)
    output.loss.backward()
    assert all(p.grad is None for p in depth_model.vpd.vae.parameters())
    for name in ("head.last_layer_depth.2.weight", "head.neck.out_layer.0.weight", "vpd.text_adapter.gamma"):
        assert depth_model.get_parameter(name).grad.abs().sum() > 0, name
    assert depth_model.vpd.unet.conv_in.weight.grad.abs().sum() > 0
    assert depth_model.vpd.prompt_embeddings.requires_grad is False


def test_scene_ids_select_prompt_rows(depth_model, make_pixels):
    pixels = make_pixels(2, 3, 64, 64)
    table = depth_model.vpd.prompt_embeddings
    embeds = depth_model.vpd.get_prompt_embeddings(torch.tensor([4, -1]), 2)
    torch.testing.assert_close(embeds[0, 0], table[4])
    torch.testing.assert_close(embeds[1, 0], table.mean(0))
    torch.testing.assert_close(depth_model.vpd.get_prompt_embeddings(None, 2)[:, 0], table.mean(0).expand(2, -1))
    randomize_head(depth_model)
    with torch.no_grad():
        unknown = depth_model(pixels).predicted_depth
        minus_one = depth_model(pixels, scene_ids=[-1, -1]).predicted_depth
        scene = depth_model(pixels, scene_ids=torch.tensor([4, 4])).predicted_depth
    torch.testing.assert_close(unknown, minus_one)
    assert not torch.allclose(unknown, scene)


@pytest.mark.parametrize(
    ("scene_ids", "message"),
    [([27, 0], r"must lie in \[-1, 26\]"), ([-2, 0], r"must lie in \[-1, 26\]"), ([0.5, 1.0], "must be integers"),
     ([1, 2, 3], r"shape \(2,\)")],
)  # fmt: skip
def test_bad_scene_ids(depth_model, make_pixels, scene_ids, message):
    with pytest.raises(ValueError, match=message):
        depth_model(make_pixels(2, 3, 64, 64), scene_ids=scene_ids)


def test_bad_labels_and_mask(depth_model, make_pixels):
    pixels = make_pixels(1, 3, 64, 64)
    with pytest.raises(ValueError, match="`labels` must have the shape"):
        depth_model(pixels, labels=torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match="`pixel_mask` must have shape"):
        depth_model(pixels, pixel_mask=torch.ones(1, 64, 63))


def test_return_dict_false_and_optional_outputs(depth_model, make_pixels):
    pixels = make_pixels(1, 3, 64, 64)
    with torch.no_grad():
        tuple_out = depth_model(pixels, return_dict=False)
        full = depth_model(pixels, output_hidden_states=True, output_attentions=True)
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], full.predicted_depth)
    assert len(full.hidden_states) == 4 and full.attentions is None  # depth uses no attention maps by default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_is_bit_identical(depth_model, make_pixels, tmp_path, dtype):
    model = depth_model.to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm statistics must survive too
        model.head.decoder.deconv_layers[1].running_mean.uniform_()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForDepthEstimation.from_pretrained(tmp_path)
    assert type(loaded) is VPDModelForDepthEstimation
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
    pixels = make_pixels(1, 3, 64, 64).to(dtype)
    with (
        torch.no_grad()
    ):  # same weights; loaded tensors are not 64-byte aligned, so CPU kernels may differ in the last bit
        tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(model(pixels).predicted_depth, loaded.eval()(pixels).predicted_depth, **tolerance)
    bookkeeping = {"_name_or_path", "dtype", "transformers_version"}
    saved = {k: v for k, v in AutoConfig.from_pretrained(tmp_path).to_dict().items() if k not in bookkeeping}
    assert saved == {k: v for k, v in model.config.to_dict().items() if k not in bookkeeping}


def test_backbone_loads_alone_through_automodel(depth_model, tmp_path):
    depth_model.vpd.save_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert type(backbone) is VPDModel
    for name, tensor in depth_model.vpd.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], tensor), name


@torch.no_grad()
def test_init_weights_touches_only_vpd_layers(depth_config):
    torch.manual_seed(0)
    model = VPDModelForDepthEstimation(depth_config)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vpd.unet.", "vpd.vae."))}
    model.apply(model._init_weights)
    for name, tensor in frozen.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    head = model.head
    assert float(head.last_layer_depth[0].weight.std()) == pytest.approx(0.001, rel=0.1)
    assert float(head.decoder.deconv_layers[0].weight.std()) == pytest.approx(0.001, rel=0.1)
    assert float(head.neck.out_layer[0].weight.std()) == pytest.approx(0.02, rel=0.1)
    assert torch.all(head.neck.out_layer[0].bias == 0) and torch.all(head.last_layer_depth[2].bias == 0)
    assert torch.all(head.decoder.conv_layers[1].weight == 1) and torch.all(head.decoder.conv_layers[1].bias == 0)
    adapter = model.vpd.text_adapter
    assert torch.all(adapter.gamma == 1e-4)
    bound = 1 / math.sqrt(32)  # PyTorch's default nn.Linear initialisation, as the reference adapter
    assert float(adapter.linear_1.weight.abs().max()) <= bound and float(adapter.linear_1.weight.std()) > bound / 3
    assert torch.all(model.vpd.prompt_embeddings == 0)


def test_sd15_sized_parameter_counts_match_the_reference():
    """Counted on the meta device (no memory). Reference: method notes section 2.4 / checkpoint-key notes."""
    with torch.device("meta"):
        model = VPDModelForDepthEstimation(VPDConfig())
        full_unet = UNet2DConditionModel(**SD15_UNET_CONFIG)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(full_unet) == 859_520_964  # SD-1.5 UNet (859.52 M)
    # VPD drops the unused output norm + conv (as the official depth model, 682 of 686 keys): 859.51 M.
    assert count(model.vpd.unet) == 859_520_964 - (320 * 4 * 9 + 4) - 2 * 320
    assert count(model.vpd.vae) == 34_163_664  # encoder + quant_conv (34.16 M), no decoder
    assert count(model.vpd.text_adapter) == 1_181_184 + 768  # MLP (1.181 M) + gamma
    assert count(model.head) == 11_537_409  # depth head (11.54 M)
    assert tuple(model.vpd.prompt_embeddings.shape) == (27, 768)


def test_from_config_through_the_auto_class():
    model = AutoModelForDepthEstimation.from_config(tiny_vpd_config(max_depth=80.0))
    assert isinstance(model, VPDModelForDepthEstimation) and model.head.max_depth == 80.0


def test_float16_keeps_the_vae_in_float32_and_detects_overflow(depth_model, make_pixels, tmp_path):
    depth_model.save_pretrained(tmp_path)
    half = VPDModelForDepthEstimation.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert half.vpd.vae.encoder.conv_in.weight.dtype == torch.float32  # SD's VAE overflows in fp16
    assert (
        half.vpd.unet.conv_in.weight.dtype == torch.float16
        and half.head.neck.out_layer[0].weight.dtype == torch.float16
    )
    with torch.no_grad():
        depth = half(make_pixels(1, 3, 64, 64).half()).predicted_depth
    assert depth.dtype == torch.float16 and torch.isfinite(depth).all()
    assert (
        VPDModelForDepthEstimation.from_pretrained(tmp_path, dtype=torch.bfloat16).vpd.vae.encoder.conv_in.weight.dtype
        == torch.bfloat16
    )
    half.vpd.vae.half()
    with torch.no_grad():
        half.vpd.vae.quant_conv.bias.fill_(float("inf"))  # what an fp16 overflow in the encoder produces
        with pytest.raises(FloatingPointError, match="overflowed in float16"):
            half(make_pixels(1, 3, 64, 64).half())


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_loaded_models_keep_the_vae_and_text_encoder_frozen(tmp_path, train_text_encoder):
    """Loading materialises new parameters: the frozen parts must come back frozen (optimisers and DDP see them)."""
    from vpd_hf import VPDModelForReferringSegmentation
    from vpd_hf.testing_utils import tiny_referring_config

    VPDModelForDepthEstimation(tiny_vpd_config()).save_pretrained(tmp_path / "depth")
    config = tiny_referring_config(train_text_encoder=train_text_encoder)
    VPDModelForReferringSegmentation(config).save_pretrained(tmp_path / "ref")
    depth = VPDModelForDepthEstimation.from_pretrained(tmp_path / "depth")
    referring = VPDModelForReferringSegmentation.from_pretrained(tmp_path / "ref")
    for model in (depth, referring):
        assert not any(p.requires_grad for p in model.vpd.vae.parameters())
        assert all(p.requires_grad for p in model.vpd.unet.parameters())
    assert all(p.requires_grad == train_text_encoder for p in referring.text_encoder.parameters())


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_loading_in_another_dtype_does_not_keep_the_checkpoint_mapped(depth_model, tmp_path):
    """Integer buffers are not cast by `dtype=`; as views of the mmapped file they kept all of it resident."""
    depth_model.head.decoder.deconv_layers[1].num_batches_tracked.fill_(7)
    depth_model.save_pretrained(tmp_path / "saved")
    loaded = VPDModelForDepthEstimation.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert str(tmp_path / "saved" / "model.safetensors") not in Path("/proc/self/maps").read_text()
    assert int(loaded.head.decoder.deconv_layers[1].num_batches_tracked) == 7
    assert loaded.head.decoder.deconv_layers[1].weight.dtype == torch.bfloat16
