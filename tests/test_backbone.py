"""VPDModel (the backbone): taps, attention maps, conditioning, padding, gradients."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vpd_hf import VPDModel
from vpd_hf.attention import CrossAttentionMapProcessor
from vpd_hf.testing_utils import TINY_UNET_CONFIG, tiny_vpd_config


def reference_taps(unet, latents, timestep, context):
    """Walks a diffusers UNet by the ldm numbering of the official code: the decoder outputs after ldm output blocks
    1, 4, 7 (the second resnet/attention pair of up blocks 0, 1, 2) and after the last block, high resolution first."""
    temb = unet.time_embedding(unet.time_proj(timestep).to(latents.dtype))
    hidden = unet.conv_in(latents)
    skips = [hidden]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, residuals = block(hidden, temb, encoder_hidden_states=context)
        else:
            hidden, residuals = block(hidden, temb)
        skips.extend(residuals)
    hidden = unet.mid_block(hidden, temb, encoder_hidden_states=context)
    taps, ldm_index = [], 0
    for block in unet.up_blocks:
        for layer, resnet in enumerate(block.resnets):
            hidden = resnet(torch.cat([hidden, skips.pop()], dim=1), temb)
            if getattr(block, "attentions", None) is not None:
                hidden = block.attentions[layer](hidden, encoder_hidden_states=context, return_dict=False)[0]
            if ldm_index in (1, 4, 7):
                taps.append(hidden)
            ldm_index += 1
        if block.upsamplers is not None:
            hidden = block.upsamplers[0](hidden)
    taps.append(hidden)
    return taps[::-1]


def build_backbone(seed=0, **overrides):
    torch.manual_seed(seed)
    model = VPDModel(tiny_vpd_config(**overrides)).eval()
    model.prompt_embeddings.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return model


def test_feature_taps_match_the_ldm_output_blocks(make_pixels):
    model = build_backbone()
    pixels = make_pixels(2, 3, 128, 192)
    with torch.no_grad():
        output = model(pixel_values=pixels)
        latents = model.encode_images(pixels)
        context = model.text_adapter(model.prompt_embeddings)[None].expand(2, -1, -1)
        expected = reference_taps(model.unet, latents, torch.tensor([1, 1]), context)
    channels = TINY_UNET_CONFIG["block_out_channels"]
    shapes = [tuple(f.shape) for f in output.feature_maps]
    assert shapes == [(2, channels[0], 16, 24), (2, channels[1], 8, 12), (2, channels[2], 4, 6), (2, channels[3], 2, 3)]
    for got, want in zip(output.feature_maps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert output.attention_maps is None


def test_sd15_taps_have_the_reference_shapes_on_meta():
    """SD-1.5 sizes at 512x512 (meta tensors: shapes only, no compute)."""
    with torch.device("meta"):
        model = VPDModel(tiny_vpd_config(unet_config=None, vae_config=None, attention_resolutions=[16, 32]))
        output = model(pixel_values=torch.zeros(1, 3, 512, 512), prompt_embeds=torch.zeros(1, 150, 768))
    shapes = [tuple(f.shape) for f in output.feature_maps]
    assert shapes == [(1, 320, 64, 64), (1, 640 + 150, 32, 32), (1, 1280 + 150, 16, 16), (1, 1280, 8, 8)]
    assert [tuple(a.shape) for a in output.attention_maps] == [(1, 150, 32, 32), (1, 150, 16, 16)]


def test_the_unet_runs_at_the_configured_timestep(make_pixels):
    model = build_backbone(timestep=7)
    seen = []
    model.unet.time_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    with torch.no_grad():
        model(pixel_values=make_pixels(2, 3, 64, 64))
    assert len(seen) == 1 and seen[0].tolist() == [7, 7] and seen[0].dtype == torch.long


def test_latent_scaling_options(make_pixels):
    pixels = make_pixels(1, 3, 64, 64)
    raw = build_backbone().encode_images(pixels)
    sd = build_backbone(latent_scaling="scaling_factor").encode_images(pixels)
    evp = build_backbone(latent_scaling=5.07543).encode_images(pixels)
    torch.testing.assert_close(sd, raw * 0.18215)
    torch.testing.assert_close(evp, raw / 5.07543)
    # Faithful default: the posterior mode, i.e. the mean half of the VAE moments, unscaled.
    model = build_backbone()
    moments = model.vae.quant_conv(model.vae.encoder(pixels))
    torch.testing.assert_close(raw, moments[:, :4])


def test_inputs_are_zero_padded_to_a_multiple_of_64(make_pixels):
    model = build_backbone()
    pixels = make_pixels(1, 3, 100, 130)
    padded = F.pad(pixels, (0, 192 - 130, 0, 128 - 100))
    with torch.no_grad():
        implicit = model(pixel_values=pixels).feature_maps
        explicit = model(pixel_values=padded).feature_maps
    for a, b in zip(implicit, explicit, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("resolutions", [[16, 32], [16, 32, 64], [16]])
def test_attention_maps_are_head_and_layer_means_of_softmax_probabilities(make_pixels, resolutions):
    model = build_backbone(attention_resolutions=resolutions)
    levels = {64: 0, 32: 1, 16: 2}
    captured = {level: [] for level in levels.values()}

    def capture(level):
        def hook(module, args, kwargs):
            captured[level].append((args[0], kwargs["encoder_hidden_states"], module))

        return hook

    for name, module in model.unet.named_modules():
        if name.endswith("attn2") and not name.startswith("mid_block"):
            block, index = name.split(".")[:2]
            level = int(index) if block == "down_blocks" else 3 - int(index)
            if level in captured:
                module.register_forward_pre_hook(capture(level), with_kwargs=True)

    pixels = make_pixels(2, 3, 128, 128)
    with torch.no_grad():
        output = model(pixel_values=pixels)
    num_tokens = model.config.num_prompts
    assert len(output.attention_maps) == len(resolutions)
    for maps, resolution in zip(output.attention_maps, sorted(resolutions, reverse=True), strict=True):
        level = levels[resolution]
        size = 128 // 8 // 2**level
        assert maps.shape == (2, num_tokens, size, size)
        torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, size, size))
        # Independent reference: explicit per-head softmax of the captured layer inputs, then means.
        assert len(captured[level]) == 5  # 2 down + 3 up cross-attention layers
        per_layer = []
        for hidden, context, attn in captured[level]:
            heads = attn.heads
            q = attn.to_q(hidden).unflatten(-1, (heads, -1)).transpose(1, 2)
            k = attn.to_k(context).unflatten(-1, (heads, -1)).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            per_layer.append(probs.mean(dim=1))
        want = torch.stack(per_layer).mean(0).transpose(1, 2).unflatten(2, (size, size))
        torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-6)
        # ... and they are concatenated after the UNet channels of that resolution.
        features = output.feature_maps[level]
        assert features.shape[1] == model.config.unet_channels[level] + num_tokens
        torch.testing.assert_close(features[:, -num_tokens:], maps)


def test_attention_capture_changes_nothing_else(make_pixels):
    """The probability-materialising processor gives the same UNet features as SDPA; only attn2 layers of the
    configured levels get it."""
    plain = build_backbone()
    capturing = build_backbone(attention_resolutions=[16, 32])
    capturing.load_state_dict(plain.state_dict())
    pixels = make_pixels(1, 3, 128, 128)
    with torch.no_grad():
        a = plain(pixel_values=pixels).feature_maps
        b = capturing(pixel_values=pixels).feature_maps
    for level, (x, y) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(y[:, : x.shape[1]], x, rtol=1e-5, atol=1e-5, msg=f"level {level}")
    processors = capturing.unet.attn_processors
    custom = sorted(name for name, p in processors.items() if isinstance(p, CrossAttentionMapProcessor))
    assert len(custom) == 10 and all("attn2" in name for name in custom)
    assert all(name.startswith(("down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2")) for name in custom)
    assert not any(isinstance(p, CrossAttentionMapProcessor) for p in plain.unet.attn_processors.values())


def test_reference_attention_emulation_matches_the_fast_path_and_restores_it(make_pixels):
    """The official design (every attention materialised, maps of <= 32² queries stored) gives the same features as
    the fast path; its store holds one head-mean map per emulated layer; the processors come back afterwards."""
    from vpd_hf.attention import ReferenceAttentionProcessor, reference_attention

    model = build_backbone(attention_resolutions=[16, 32])
    before = dict(model.unet.attn_processors)
    pixels = make_pixels(1, 3, 64, 64)
    with torch.no_grad():
        fast = model(pixel_values=pixels)
        with reference_attention(model.unet) as store:
            assert sum(isinstance(p, ReferenceAttentionProcessor) for p in model.unet.attn_processors.values()) == 22
            slow = model(pixel_values=pixels)
    for x, y in zip(fast.feature_maps, slow.feature_maps, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    # 32 attention layers, 10 of them VPD's capture layers; at an 8x8 latent every query count is <= 32².
    assert len(store) == 22
    self_maps = [m for m in store if m.shape[1] == m.shape[2]]
    assert len(self_maps) == 16 and all(torch.allclose(m.sum(-1), torch.ones(())) for m in store)
    assert model.unet.attn_processors == before
    with reference_attention(model.unet, max_stored_queries=16) as store, torch.no_grad():
        model(pixel_values=pixels)
    assert {m.shape[1] for m in store} == {16, 4, 1}  # the 8² level (64 queries) is not stored


def test_replaced_attention_processors_are_detected(make_pixels):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = build_backbone(attention_resolutions=[16, 32])
    model.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="attention processors installed by VPD were replaced"):
        model(pixel_values=make_pixels(1, 3, 64, 64))
    model.install_attention_capture()
    assert model(pixel_values=make_pixels(1, 3, 64, 64)).attention_maps is not None


def test_prompt_embeds_shared_or_per_image(make_pixels):
    model = build_backbone()
    pixels = make_pixels(2, 3, 64, 64)
    table = model.prompt_embeddings
    with torch.no_grad():
        shared = model(pixel_values=pixels, prompt_embeds=table).feature_maps[0]
        per_image = model(pixel_values=pixels, prompt_embeds=table[None].expand(2, -1, -1)).feature_maps[0]
        default = model(pixel_values=pixels).feature_maps[0]
        other = model(pixel_values=pixels, prompt_embeds=table.flip(0)[:3]).feature_maps[0]
    torch.testing.assert_close(shared, per_image)
    torch.testing.assert_close(shared, default)
    assert not torch.allclose(shared, other)


def test_latents_input_reuses_one_encoding(make_pixels):
    model = build_backbone()
    pixels = make_pixels(1, 3, 64, 64)
    with torch.no_grad():
        direct = model(pixel_values=pixels).feature_maps
        latents = model.encode_images(pixels)
        reused = model(latents=latents).feature_maps
    for a, b in zip(direct, reused, strict=True):
        torch.testing.assert_close(a, b)


def test_text_adapter_is_residual_with_gamma(make_pixels):
    model = build_backbone()
    adapter = model.text_adapter
    torch.testing.assert_close(adapter.gamma, torch.full((32,), 1e-4))
    x = torch.randn(5, 32)
    mlp = adapter.linear_2(torch.nn.functional.gelu(adapter.linear_1(x)))
    torch.testing.assert_close(adapter(x), x + 1e-4 * mlp)


def test_gradients_reach_unet_and_adapter_but_not_the_vae(make_pixels):
    model = build_backbone().train()
    output = model(pixel_values=make_pixels(2, 3, 64, 64))
    loss = sum((f * torch.randn_like(f)).sum() for f in output.feature_maps)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.vae.parameters())
    unet_grads = [p.grad for p in model.unet.parameters()]
    assert all(g is not None for g in unet_grads)
    assert sum(float(g.abs().sum()) for g in unet_grads) > 0
    assert model.text_adapter.gamma.grad is not None and model.text_adapter.gamma.grad.abs().sum() > 0
    assert model.text_adapter.linear_2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("detach", [True, False])
def test_attention_map_gradients_follow_the_config(make_pixels, detach):
    model = build_backbone(attention_resolutions=[16, 32], detach_attention_maps=detach).train()
    output = model(pixel_values=make_pixels(1, 3, 64, 64))
    loss = sum((maps * torch.randn_like(maps)).sum() for maps in output.attention_maps)
    if detach:
        assert not loss.requires_grad
        return
    loss.backward()
    assert model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_q.weight.grad.abs().sum() > 0
    assert model.text_adapter.gamma.grad.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(make_pixels, reentrant):
    pixels = make_pixels(1, 3, 64, 64)

    def grads(model):
        output = model(pixel_values=pixels)
        sum((f * f).mean() for f in output.feature_maps).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = build_backbone(attention_resolutions=[16, 32]).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert checkpointed.unet.up_blocks[1].gradient_checkpointing
    a, b = grads(plain), grads(checkpointed)
    assert a.keys() == b.keys() and len(a) > 100
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_nothing_is_recorded_outside_a_forward(make_pixels):
    model = build_backbone(attention_resolutions=[16, 32])
    assert not model._recorder.active
    with torch.no_grad():
        model.unet(torch.zeros(1, 4, 8, 8), 1, encoder_hidden_states=torch.zeros(1, 3, 32))
    with model._recorder.record() as record:
        pass
    assert dict(record) == {}


def test_deepcopy_keeps_a_working_independent_model(make_pixels):
    model = build_backbone(attention_resolutions=[16, 32])
    clone = copy.deepcopy(model)
    pixels = make_pixels(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(pixel_values=pixels), clone(pixel_values=pixels)
    torch.testing.assert_close(a.attention_maps[0], b.attention_maps[0])
    torch.testing.assert_close(a.feature_maps[3], b.feature_maps[3])
    assert clone._recorder is not model._recorder
    processor = clone.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.processor
    assert processor.recorder is clone._recorder
    hooks = list(clone.unet.up_blocks[0].resnets[1]._forward_hooks.values())
    assert len(hooks) == 1 and hooks[0].recorder is clone._recorder


def test_bad_inputs_raise_clear_errors(make_pixels):
    model = build_backbone()
    with pytest.raises(ValueError, match="exactly one of `pixel_values` and `latents`"):
        model()
    with pytest.raises(ValueError, match=r"`pixel_values` must be a float tensor of shape \(batch, 3"):
        model(pixel_values=make_pixels(1, 4, 64, 64))
    with pytest.raises(TypeError, match=r"`pixel_values` must be a torch\.Tensor"):
        model(pixel_values=[[0.0]])
    with pytest.raises(ValueError, match="`prompt_embeds` must have shape"):
        model(pixel_values=make_pixels(1, 3, 64, 64), prompt_embeds=torch.zeros(1, 2, 7))
    with pytest.raises(ValueError, match="batch size 3"):
        model(pixel_values=make_pixels(1, 3, 64, 64), prompt_embeds=torch.zeros(3, 2, 32))
    with pytest.raises(ValueError, match="`latents` must have shape"):
        model(latents=torch.zeros(1, 3, 8, 8))
