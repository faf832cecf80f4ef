"""Backbone families (SD 1.x, SD 2.x, SDXL): taps and attention layers from the UNet config, SDXL conditioning, and
the three tasks end to end on tiny SD-2- and SDXL-shaped diffusers folders."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import (
    AutoModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    pipeline,
)

from vpd_hf import (
    VPDConfig,
    VPDImageProcessor,
    VPDModel,
    VPDModelForDepthEstimation,
    VPDModelForReferringSegmentation,
    VPDModelForSegmentation,
    VPDProcessor,
)
from vpd_hf.attention import cross_attention_layers
from vpd_hf.backbones import (
    SD21_UNET_CONFIG,
    SDXL_TEXT_CONFIG,
    SDXL_TEXT_CONFIG_2,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    backbone_layout,
)
from vpd_hf.configuration_vpd import SD15_UNET_CONFIG
from vpd_hf.hub import create_model_card, infer_license, model_card_from_run
from vpd_hf.testing_utils import (
    TINY_DEPTH_HEAD,
    TINY_SDXL_UNET_CONFIG,
    TINY_SDXL_VAE_CONFIG,
    TINY_SEGMENTATION_HEAD,
    TINY_UNET_CONFIG,
    save_tiny_stable_diffusion,
    tiny_vpd_config,
)

NAMES = ["wall", "floor", "box"]
TOKENS = 8
REAL_UNET_CONFIGS = {"sd15": SD15_UNET_CONFIG, "sd21": SD21_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {
        family: save_tiny_stable_diffusion(tmp_path_factory.mktemp(f"tiny-{family}"), seed=1, family=family)
        for family in ("sd2", "sdxl")
    }


@pytest.fixture(scope="module")
def meta_unets():
    with torch.device("meta"):
        return {name: UNet2DConditionModel(**config) for name, config in REAL_UNET_CONFIGS.items()}


# ---------------------------------------------------------------------------------------------------------------------
# the layout function
# ---------------------------------------------------------------------------------------------------------------------


def test_sd15_layout_pins_the_official_modules():
    layout = backbone_layout(SD15_UNET_CONFIG)
    assert layout.family == "sd1" and layout.num_levels == 4 and not layout.text_time and layout.pooled_dim is None
    # ldm output blocks 1, 4, 7 and the UNet output (method notes, section 2.2), high resolution first
    assert [t.module for t in layout.taps] == [
        "",
        "up_blocks.2.attentions.1",
        "up_blocks.1.attentions.1",
        "up_blocks.0.resnets.1",
    ]
    assert [t.pool for t in layout.taps] == [1, 1, 1, 1] and layout.channels == [320, 640, 1280, 1280]
    assert [t.latent_stride for t in layout.taps] == [1, 2, 4, 8]
    for level in (0, 1, 2):  # 2 down + 3 up cross-attention layers per level, never the mid block
        attn = ".transformer_blocks.0.attn2"
        assert layout.attention_layers[level] == (
            *(f"down_blocks.{level}.attentions.{i}{attn}" for i in range(2)),
            *(f"up_blocks.{3 - level}.attentions.{i}{attn}" for i in range(3)),
        )
    assert set(layout.attention_layers) == {0, 1, 2}


def test_sd15_model_hooks_exactly_the_pinned_modules():
    model = VPDModel(tiny_vpd_config(attention_resolutions=[32, 16]))
    hooked = sorted(name for name, module in model.unet.named_modules() if module._forward_hooks)
    assert hooked == ["up_blocks.0.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.attentions.1"]
    layout = backbone_layout(TINY_UNET_CONFIG)
    captured = sorted(n.removesuffix(".processor") for n, p in model.unet.attn_processors.items() if hasattr(p, "key"))
    assert captured == sorted(layout.attention_layers[1] + layout.attention_layers[2])


def test_sdxl_layout_derives_the_stride_64_map_and_has_no_first_level_maps():
    layout = backbone_layout(SDXL_UNET_CONFIG)
    assert layout.family == "sdxl" and layout.num_levels == 3 and layout.text_time and layout.pooled_dim == 1280
    assert [(t.module, t.channels, t.latent_stride, t.pool) for t in layout.taps] == [
        ("", 320, 1, 1),
        ("up_blocks.1.attentions.1", 640, 2, 1),
        ("up_blocks.0.attentions.1", 1280, 4, 1),
        ("mid_block", 1280, 8, 2),
    ]
    assert sorted(layout.attention_layers) == [1, 2]
    assert len(layout.attention_layers[1]) == 2 * 2 + 3 * 2 and len(layout.attention_layers[2]) == 2 * 10 + 3 * 10
    assert backbone_layout(SD21_UNET_CONFIG).family == "sd2"
    assert [t.module for t in backbone_layout(SD21_UNET_CONFIG).taps] == [
        t.module for t in backbone_layout(SD15_UNET_CONFIG).taps
    ]


@pytest.mark.parametrize("name", list(REAL_UNET_CONFIGS))
def test_layout_names_match_the_built_unet(meta_unets, name):
    """The names derived from the config are the modules an independent walk of the built (real-size, meta) UNet finds,
    and each tap is the module kind the rule says."""
    unet, layout = meta_unets[name], backbone_layout(REAL_UNET_CONFIGS[name])
    for level in range(layout.num_levels):
        walked = tuple(n for n, _ in cross_attention_layers(unet, level))
        assert walked == layout.attention_layers.get(level, ()), level
    kinds = {"attentions": "Transformer2DModel", "resnets": "ResnetBlock2D"}
    for tap in layout.taps[1:]:
        module = unet.get_submodule(tap.module)
        kind = kinds.get(tap.module.split(".")[-2] if "." in tap.module else "", "UNetMidBlock2DCrossAttn")
        assert type(module).__name__ == kind, tap.module
        out_channels = module.resnets[-1].out_channels if kind.startswith("UNetMid") else module.out_channels
        assert out_channels == tap.channels, tap.module


def test_real_unet_parameter_counts_on_meta(meta_unets):
    counts = {name: sum(p.numel() for p in unet.parameters()) for name, unet in meta_unets.items()}
    assert counts == {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
    head = {name: sum(p.numel() for n, p in unet.named_parameters() if n.startswith(("conv_norm_out", "conv_out")))
            for name, unet in meta_unets.items()}  # fmt: skip
    assert set(head.values()) == {12_164}  # dropped by VPD: everything else of the UNet is kept (and trained)


@pytest.mark.parametrize(
    ("name", "kept"),
    [("sd21", 865_898_560), ("sdxl", 2_567_451_520)],
)
def test_real_size_vpd_models_on_meta(name, kept):
    """Real-size SD 2.1 / SDXL VPD segmentation models (shapes only, meta device): parameter counts of what VPD keeps
    and the four taps at 512x512 with 150 class-token maps at 32² and 16²."""
    vae = SDXL_VAE_CONFIG if name == "sdxl" else None
    config = VPDConfig(unet_config=REAL_UNET_CONFIGS[name], vae_config=vae, num_prompts=150,
                       id2label={i: str(i) for i in range(150)}, attention_resolutions=[32, 16])  # fmt: skip
    with torch.device("meta"):
        model = VPDModelForSegmentation(config)
        pooled = torch.zeros(1, 1280) if name == "sdxl" else None
        output = model.vpd(pixel_values=torch.zeros(1, 3, 512, 512), prompt_embeds=torch.zeros(1, 150, config.prompt_embed_dim),
                           pooled_prompt_embeds=pooled)  # fmt: skip
    assert sum(p.numel() for p in model.vpd.unet.parameters()) == kept
    assert sum(p.numel() for p in model.vpd.vae.parameters()) == 34_163_664  # same VAE encoder for SD 1.x/2.x/XL
    width = config.prompt_embed_dim
    assert sum(p.numel() for p in model.vpd.text_adapter.parameters()) == 2 * (width * width + width) + width
    shapes = [tuple(f.shape) for f in output.feature_maps]
    assert shapes == [(1, 320, 64, 64), (1, 640 + 150, 32, 32), (1, 1280 + 150, 16, 16), (1, 1280, 8, 8)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_out_channels": [32, 64]}, r"`unet_config\['block_out_channels'\]` must be 4 .* or 3"),
        ({"block_out_channels": [32] * 5}, r"`unet_config\['block_out_channels'\]`"),
        ({"up_block_types": ["CrossAttnUpBlock2D"] * 4}, "Stable Diffusion style"),
        ({"down_block_types": ["DownBlock2D"] * 4, "up_block_types": ["UpBlock2D"] * 4}, "Stable Diffusion style"),
        ({"layers_per_block": 3}, r"`unet_config\['layers_per_block'\]` must be 2"),
        ({"addition_embed_type": "image"}, r"`unet_config\['addition_embed_type'\]`"),
        (
            {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 88,
            },
            "SDXL refiner",
        ),
        ({"class_embed_type": "timestep"}, r"`unet_config\['class_embed_type'\]` must be None"),
        ({"mid_block_type": None}, r"`unet_config\['mid_block_type'\]`"),
        ({"transformer_layers_per_block": [1, 2]}, r"`unet_config\['transformer_layers_per_block'\]`"),
        ({"cross_attention_dim": [32, 32, 32, 32]}, r"`unet_config\['cross_attention_dim'\]` must be one integer"),
    ],
)
def test_unsupported_layouts_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_vpd_config(unet_config={**TINY_UNET_CONFIG, **change})


def test_sdxl_config_checks():
    sdxl = {"unet_config": TINY_SDXL_UNET_CONFIG, "vae_config": TINY_SDXL_VAE_CONFIG}
    config = tiny_vpd_config(**sdxl)
    assert config.backbone_family == "sdxl" and config.unet_channels == [32, 64, 64, 64]
    assert config.prompt_embed_dim == 80 and config.pooled_prompt_embed_dim == 40 and config.pad_multiple == 64
    with pytest.raises(ValueError, match=r"`attention_resolutions` contains \[64\].*no cross-attention"):
        tiny_vpd_config(**sdxl, attention_resolutions=[64, 32])
    with pytest.raises(ValueError, match="needs `text_config_2`"):
        tiny_vpd_config(**sdxl, num_prompts=0, text_config={"hidden_size": 32})
    with pytest.raises(ValueError, match=r"`text_config\['hidden_size'\]` \+ `text_config_2\['hidden_size'\]`"):
        tiny_vpd_config(**sdxl, num_prompts=0, text_config={"hidden_size": 32},
                        text_config_2={"hidden_size": 32, "projection_dim": 40})  # fmt: skip
    with pytest.raises(ValueError, match=r"`text_config_2\['projection_dim'\]` \(48\)"):
        tiny_vpd_config(**sdxl, num_prompts=0, text_config={"hidden_size": 32},
                        text_config_2={"hidden_size": 48, "projection_dim": 48})  # fmt: skip
    with pytest.raises(ValueError, match="`text_config_2` is for SDXL"):
        tiny_vpd_config(text_config_2={"hidden_size": 48})


# ---------------------------------------------------------------------------------------------------------------------
# SDXL conditioning and taps
# ---------------------------------------------------------------------------------------------------------------------


def sdxl_reference(unet, latents, context, text_embeds, time_ids):
    """Walks an SDXL-shaped diffusers UNet by hand (time + `text_time` embedding, down, mid, up) and returns the
    four VPD maps by the documented rule: the output, the second layer of up levels 1 and 2, the mid block pooled 2x2."""
    timestep = torch.ones(len(latents), dtype=torch.long)
    emb = unet.time_embedding(unet.time_proj(timestep).to(latents.dtype))
    time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(len(latents), -1)
    emb = emb + unet.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1))
    hidden = unet.conv_in(latents)
    skips = [hidden]
    for block in unet.down_blocks:
        kwargs = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        hidden, residuals = block(hidden, emb, **kwargs)
        skips.extend(residuals)
    mid = hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context)
    taps = {}
    for index, block in enumerate(unet.up_blocks):
        level = len(unet.up_blocks) - 1 - index
        for layer, resnet in enumerate(block.resnets):
            hidden = resnet(torch.cat([hidden, skips.pop()], dim=1), emb)
            if getattr(block, "attentions", None) is not None:
                hidden = block.attentions[layer](hidden, encoder_hidden_states=context, return_dict=False)[0]
            if layer == 1:
                taps[level] = hidden
        if block.upsamplers is not None:
            hidden = block.upsamplers[0](hidden)
    return [hidden, taps[1], taps[2], F.avg_pool2d(mid, 2)]


def sdxl_backbone(**overrides):
    torch.manual_seed(0)
    config = tiny_vpd_config(unet_config=TINY_SDXL_UNET_CONFIG, vae_config=TINY_SDXL_VAE_CONFIG, num_prompts=3,
                             **overrides)  # fmt: skip
    model = VPDModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    model.prompt_embeddings.normal_(generator=generator)
    model.pooled_prompt_embeddings.normal_(generator=generator)
    return model


def test_sdxl_taps_and_conditioning_match_a_hand_walk(make_pixels):
    model = sdxl_backbone()
    pixels = make_pixels(2, 3, 100, 130)  # padded to 128 x 192
    with torch.no_grad():
        output = model(pixel_values=pixels)
        latents = model.encode_images(pixels)
        context = model.text_adapter(model.prompt_embeddings)[None].expand(2, -1, -1)
        pooled = model.pooled_prompt_embeddings.mean(0).expand(2, -1)  # the whole table: its mean pooled row
        time_ids = torch.tensor([[128.0, 192.0, 0.0, 0.0, 128.0, 192.0]] * 2)
        expected = sdxl_reference(model.unet, latents, context, pooled, time_ids)
    shapes = [tuple(f.shape) for f in output.feature_maps]
    assert shapes == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    for got, want in zip(output.feature_maps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # per-image prompt rows and their pooled rows (depth's scene conditioning)
    with torch.no_grad():
        rows = model(latents=latents, prompt_embeds=model.get_prompt_embeddings([2, -1], 2),
                     pooled_prompt_embeds=model.get_pooled_prompt_embeddings([2, -1], 2)).feature_maps  # fmt: skip
        table = model.prompt_embeddings
        context = model.text_adapter(torch.stack([table[2], table.mean(0)])[:, None])
        pooled = torch.stack([model.pooled_prompt_embeddings[2], model.pooled_prompt_embeddings.mean(0)])
        expected = sdxl_reference(model.unet, latents, context, pooled, time_ids)
    for got, want in zip(rows, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sdxl_attention_maps_average_every_transformer_layer_of_the_level(make_pixels):
    model = sdxl_backbone(attention_resolutions=[32, 16])
    seen = {1: [], 2: []}
    for level in seen:
        for _name, module in cross_attention_layers(model.unet, level):
            module.register_forward_hook(lambda m, a, k, out, level=level: seen[level].append(out), with_kwargs=True)
    with torch.no_grad():
        output = model(pixel_values=make_pixels(1, 3, 64, 64))
    assert [len(seen[1]), len(seen[2])] == [2 * 2 + 3 * 2, 2 * 2 + 3 * 2]  # tiny SDXL: 2 transformer layers
    assert [tuple(m.shape) for m in output.attention_maps] == [(1, 3, 4, 4), (1, 3, 2, 2)]
    for maps in output.attention_maps:
        torch.testing.assert_close(maps.sum(dim=1), torch.ones_like(maps[:, 0]))


def test_sdxl_conditioning_errors(make_pixels):
    model = sdxl_backbone()
    pixels = make_pixels(1, 3, 64, 64)
    with pytest.raises(ValueError, match="needs `pooled_prompt_embeds`"):
        model(pixel_values=pixels, prompt_embeds=torch.zeros(1, 2, 80))
    with pytest.raises(ValueError, match=r"`pooled_prompt_embeds` must have shape \(batch, 40\)"):
        model(pixel_values=pixels, prompt_embeds=torch.zeros(1, 2, 80), pooled_prompt_embeds=torch.zeros(1, 7))
    sd15 = VPDModel(tiny_vpd_config())
    with pytest.raises(ValueError, match="`pooled_prompt_embeds` is for SDXL"):
        sd15(pixel_values=pixels, pooled_prompt_embeds=torch.zeros(1, 40))
    assert sd15.pooled_prompt_embeddings is None and sd15.get_pooled_prompt_embeddings(None, 1) is None
    assert "vpd.pooled_prompt_embeddings" not in VPDModelForDepthEstimation(tiny_vpd_config()).state_dict()


def test_sdxl_prompt_tables_are_both_encoders_like_the_sdxl_pipeline(family_dirs):
    """Class tokens: concatenated penultimate EOS states; pooled: text_encoder_2's text_embeds, each encoder fed by its
    own tokenizer (as StableDiffusionXLPipeline.encode_prompt does), independently of vpd_hf's single tokenisation."""
    folder = family_dirs["sdxl"]
    model = VPDModelForSegmentation.from_stable_diffusion(folder, class_names=NAMES, show_progress=False,
                                                          **TINY_SEGMENTATION_HEAD)  # fmt: skip
    texts = [f"a photo of a {name}." for name in NAMES]
    states, pooled = [], None
    for sub, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=f"tokenizer{sub}")
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = cls.from_pretrained(folder, subfolder=f"text_encoder{sub}")(input_ids=ids, output_hidden_states=True)
        eos = (ids == tokenizer.eos_token_id).int().argmax(1)
        states.append(out.hidden_states[-2][torch.arange(len(texts)), eos])
        pooled = getattr(out, "text_embeds", pooled)
    torch.testing.assert_close(model.vpd.prompt_embeddings, torch.cat(states, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.vpd.pooled_prompt_embeddings, pooled, rtol=1e-5, atol=1e-6)
    assert model.config.backbone_family == "sdxl" and model.config.base_model == str(folder)


def test_sdxl_referring_text_matches_two_tokenizers(family_dirs):
    folder = family_dirs["sdxl"]
    model = VPDModelForReferringSegmentation.from_stable_diffusion(folder, token_length=TOKENS)
    assert model.config.text_config_2["pad_token_id"] != model.config.text_config_2["eos_token_id"]  # "!" padding
    texts = ["the red box", "a large blue sphere on the left of the room"]  # padded / truncated
    ids, outputs = [], []
    for sub, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=f"tokenizer{sub}", model_max_length=TOKENS)
        ids.append(tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids)
        with torch.no_grad():
            outputs.append(
                cls.from_pretrained(folder, subfolder=f"text_encoder{sub}")(ids[-1], output_hidden_states=True)
            )
    assert not torch.equal(ids[0], ids[1])  # the padding differs
    with torch.no_grad():
        states, pooled = model.encode_text_and_pooled(ids[0])
    want = torch.cat([outputs[0].hidden_states[-2], outputs[1].hidden_states[-2]], dim=-1)
    torch.testing.assert_close(states, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, outputs[1].text_embeds, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# the three tasks end to end on tiny SD-2 and SDXL folders
# ---------------------------------------------------------------------------------------------------------------------


def build(task, folder):
    if task == "depth":
        return VPDModelForDepthEstimation.from_stable_diffusion(
            folder, scene_names=["kitchen", "office"], prompt_templates=["a photo of a {}.", "a photo of the {}."],
            show_progress=False, **TINY_DEPTH_HEAD,
        )  # fmt: skip
    if task == "segmentation":
        return VPDModelForSegmentation.from_stable_diffusion(
            folder, class_names=NAMES, show_progress=False, semantic_inference_mode="whole", **TINY_SEGMENTATION_HEAD
        )
    return VPDModelForReferringSegmentation.from_stable_diffusion(
        folder, token_length=TOKENS, referring_decoder_channels=32
    )


def task_inputs(task, model, pixels, generator):
    batch, _, height, width = pixels.shape
    if task == "depth":
        return {"scene_ids": [1, -1], "labels": torch.rand(batch, height, width, generator=generator) * 5 + 0.5}
    if task == "segmentation":
        return {"labels": torch.randint(0, len(NAMES), (batch, height, width), generator=generator)}
    ids = torch.randint(0, 300, (batch, TOKENS), generator=generator)
    return {"input_ids": ids, "labels": torch.randint(0, 2, (batch, height, width), generator=generator)}


def save_processor(task, folder, source):
    if task == "referring":
        VPDProcessor.from_stable_diffusion(source, token_length=TOKENS).save_pretrained(folder)
    else:
        VPDImageProcessor.for_task(task, size={"height": 128, "width": 128}).save_pretrained(folder)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("task", ["depth", "segmentation", "referring"])
def test_task_end_to_end(family_dirs, family, task, tmp_path, make_pixels):
    source = family_dirs[family]
    model = build(task, source).train()
    config = model.config
    assert config.backbone_family == family and config.base_model == str(source)
    assert config.unet_config == {
        k: v for k, v in json.loads((source / "unet" / "config.json").read_text()).items() if not k.startswith("_")
    }
    # heads sized from the tapped channels (+ token maps at 32 and 16 for segmentation / referring)
    tokens = {"depth": 0, "segmentation": len(NAMES), "referring": TOKENS}[task]
    expected = [32, 64 + tokens, 64 + tokens, 64]
    assert model.vpd.feature_channels(num_tokens=tokens or 1) == (expected if tokens else [32, 64, 64, 64])
    if family == "sdxl":
        assert (task == "referring") == (model.vpd.pooled_prompt_embeddings is None)

    generator = torch.Generator().manual_seed(0)
    pixels = make_pixels(2, 3, 64, 96)
    output = model(pixel_values=pixels, **task_inputs(task, model, pixels, generator), output_hidden_states=True)
    assert torch.isfinite(output.loss) and output.loss > 0
    assert [h.shape[-2:] for h in output.hidden_states] == [(8, 16), (4, 8), (2, 4), (1, 2)]
    output.loss.backward()
    named = dict(model.named_parameters())
    assert all(p.grad is None for n, p in named.items() if n.startswith(("vpd.vae.", "text_encoder")))
    assert named["vpd.text_adapter.gamma"].grad.abs().sum() > 0
    assert (
        sum(float(p.grad.abs().sum()) for n, p in named.items() if n.startswith("vpd.unet.") and p.grad is not None) > 0
    )
    if family == "sdxl" and task != "referring":  # the pooled text + time ids reach the UNet through add_embedding
        assert named["vpd.unet.add_embedding.linear_1.weight"].grad.abs().sum() > 0
    heads = [p for n, p in named.items() if not n.startswith(("vpd.", "text_encoder"))]
    assert heads and all(p.grad is not None for p in heads)

    model.eval().save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
    assert loaded.config.to_dict()["unet_config"] == config.unet_config
    for key in ("hidden_size", "projection_dim", "pad_token_id", "eos_token_id"):  # SDXL's second encoder
        assert (loaded.config.text_config_2 or {}).get(key) == (config.text_config_2 or {}).get(key), key
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if n.startswith(("vpd.vae.", "text_encoder")))
    inputs = {k: v for k, v in task_inputs(task, model, pixels, generator).items() if k != "labels"}
    with torch.no_grad():
        a, b = model(pixel_values=pixels, **inputs), loaded(pixel_values=pixels, **inputs)
    key = "predicted_depth" if task == "depth" else "logits"
    torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-4, atol=1e-5)

    save_processor(task, tmp_path, source)
    image = Image.fromarray((np.random.default_rng(0).random((80, 120, 3)) * 255).astype(np.uint8))
    if task == "depth":
        result = pipeline("depth-estimation", model=str(tmp_path))(image)
        assert result["predicted_depth"].shape == (80, 120) and torch.isfinite(result["predicted_depth"]).all()
    elif task == "segmentation":
        results = pipeline("image-segmentation", model=str(tmp_path))(image)
        assert results and {r["label"] for r in results} <= set(NAMES)
        assert np.stack([np.asarray(r["mask"]) for r in results]).shape[1:] == (80, 120)
    else:
        result = pipeline("referring-image-segmentation", model=str(tmp_path))(image, text="the red box")
        assert result["mask"].size == (120, 80) and 0.0 <= result["score"] <= 1.0


@pytest.mark.parametrize("task", ["depth", "referring"])
def test_sdxl_images_of_different_sizes_run_at_their_own_size(family_dirs, task, make_pixels):
    """With a pixel_mask of two sizes, each SDXL image (pooled text and time ids per image) gives what it gives alone."""
    model = build(task, family_dirs["sdxl"]).eval()
    pixels = make_pixels(2, 3, 128, 128)
    mask = torch.zeros(2, 128, 128, dtype=torch.long)
    mask[0], mask[1, :64, :64] = 1, 1
    kwargs = {"scene_ids": [0, 1]} if task == "depth" else {"input_ids": torch.randint(0, 300, (2, TOKENS))}
    key = "predicted_depth" if task == "depth" else "logits"
    with torch.no_grad():
        both = getattr(model(pixel_values=pixels, pixel_mask=mask, **kwargs), key)
        alone = [
            getattr(
                model(pixel_values=pixels[i : i + 1, :, :size, :size], **{k: v[i : i + 1] for k, v in kwargs.items()}),
                key,
            )
            for i, size in ((0, 128), (1, 64))
        ]
    torch.testing.assert_close(both[:1], alone[0], rtol=1e-4, atol=1e-5)
    cut = 64 if task == "depth" else 8
    torch.testing.assert_close(both[1:, ..., :cut, :cut], alone[1], rtol=1e-4, atol=1e-5)


def test_backbone_alone_round_trips_through_automodel(family_dirs, tmp_path):
    model = build("depth", family_dirs["sdxl"])
    model.vpd.save_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert type(backbone) is VPDModel and backbone.pooled_prompt_embeddings.abs().sum() > 0
    for name, tensor in model.vpd.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], tensor), name


# ---------------------------------------------------------------------------------------------------------------------
# model cards
# ---------------------------------------------------------------------------------------------------------------------


def test_cards_record_the_backbone(family_dirs, tmp_path):
    assert infer_license("stabilityai/stable-diffusion-xl-base-1.0") == "openrail++"
    card = create_model_card("depth", base_model="stabilityai/stable-diffusion-xl-base-1.0", backbone="sdxl")
    assert card.data.license == "openrail++" and "stable-diffusion-xl" in card.data.tags
    assert "(Stable Diffusion XL UNet)" in card.text and "derive from Stable Diffusion XL" in card.text
    with pytest.raises(ValueError, match="`backbone` must be one of"):
        create_model_card("depth", backbone="sd3")
    build("segmentation", family_dirs["sd2"]).save_pretrained(tmp_path)
    card = model_card_from_run(tmp_path)
    assert "(Stable Diffusion 2.x UNet)" in card.text and "stable-diffusion-2" in card.data.tags
    assert (
        SDXL_TEXT_CONFIG["hidden_size"] + SDXL_TEXT_CONFIG_2["hidden_size"] == SDXL_UNET_CONFIG["cross_attention_dim"]
    )


# ---------------------------------------------------------------------------------------------------------------------
# benchmark harness (tiny models only; real sizes are measured by hand, see README "Backbones")
# ---------------------------------------------------------------------------------------------------------------------


def load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("vpd_benchmark_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backbone", ["sd21", "sdxl"])
def test_benchmark_builds_each_backbone(backbone, tmp_path, make_pixels):
    bench = load_benchmark()
    assert bench.parse_args(["--size", "sd15"]).size == "full"  # the old name of the real size
    full = bench.backbone_configs(backbone, full=True)
    assert full["unet_config"] == REAL_UNET_CONFIGS[backbone] and len(full["text_configs"]) == 1 + (backbone == "sdxl")
    args = bench.parse_args(["--backbone", backbone, "--size", "tiny", "--cache-dir", str(tmp_path)])
    bench.build_and_save(args, "referring")
    model, _ = bench.load_model(args, "referring", torch.float32, "cpu")
    assert model.config.backbone_family == {"sd21": "sd2", "sdxl": "sdxl"}[backbone]
    runner = bench.TaskRunner(args, "referring", model, "cpu", torch.float32)
    pixels = make_pixels(1, 3, 64, 64)
    with torch.no_grad():
        assert runner.forward(pixels).shape == (1, 2, 8, 8)
        latents = model.vpd.encode_images(pixels)
        conditioning = runner.unet_conditioning(latents)
        unet = UNet2DConditionModel(**model.config.unet_config)  # the stock UNet of the "bare" path
        unet.load_state_dict(model.vpd.unet.state_dict(), strict=False)
        assert unet(latents, torch.ones(1, dtype=torch.long), **conditioning).sample.shape == latents.shape
    assert ("added_cond_kwargs" in conditioning) == (backbone == "sdxl")
