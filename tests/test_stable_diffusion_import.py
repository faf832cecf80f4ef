"""`from_stable_diffusion`: config, weights and prompt embeddings taken from a diffusers-layout SD checkpoint."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from vpd_hf import CLIP_IMAGENET_TEMPLATES, NYU_SCENE_NAMES, VPDModelForDepthEstimation
from vpd_hf.testing_utils import TINY_DEPTH_HEAD


@pytest.fixture(scope="module")
def imported(tiny_sd_dir):
    return VPDModelForDepthEstimation.from_stable_diffusion(tiny_sd_dir, show_progress=False, **TINY_DEPTH_HEAD)


def test_hub_layout_of_the_fixture(tiny_sd_dir):
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_dir / sub).is_dir()
    assert {p.name for p in (tiny_sd_dir / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    assert json.loads((tiny_sd_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_config_comes_from_the_checkpoint(imported, tiny_sd_dir):
    unet_config = json.loads((tiny_sd_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((tiny_sd_dir / "vae" / "config.json").read_text())
    assert imported.config.unet_config == {k: v for k, v in unet_config.items() if not k.startswith("_")}
    assert imported.config.vae_config == {k: v for k, v in vae_config.items() if not k.startswith("_")}
    assert imported.config.prompt_names == list(NYU_SCENE_NAMES)
    assert imported.config.prompt_templates == list(CLIP_IMAGENET_TEMPLATES)
    assert imported.config.prompt_embed_dim == unet_config["cross_attention_dim"]
    assert imported.config.timestep == 1 and imported.config.latent_scaling is None
    assert not imported.training
    assert not hasattr(imported, "text_encoder") and not hasattr(imported.vpd, "text_encoder")


def test_unet_and_vae_weights_are_the_checkpoints(imported, tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").state_dict()
    ours = imported.vpd.unet.state_dict()
    assert set(unet) - set(ours) == {"conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, unet[name]), name
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae").state_dict()
    ours = imported.vpd.vae.state_dict()
    assert set(ours) == {k for k in vae if k.startswith(("encoder.", "quant_conv."))}
    for name, tensor in ours.items():
        assert torch.equal(tensor, vae[name]), name


def test_scene_embeddings_are_template_means_of_pooled_clip(imported, tiny_sd_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder").eval()
    for row in (0, 14, 26):
        name = NYU_SCENE_NAMES[row].replace("_", " ")
        texts = [template.format(name) for template in CLIP_IMAGENET_TEMPLATES]
        ids = tokenizer(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = encoder(input_ids=ids).last_hidden_state
        # Pooled = final-LayerNorm state at the first end-of-text token, no projection.
        eos = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
        pooled = hidden[torch.arange(len(texts)), eos]
        torch.testing.assert_close(imported.vpd.prompt_embeddings[row], pooled.mean(0), rtol=1e-5, atol=1e-6)


def test_custom_scenes_templates_and_config(tiny_sd_dir, tmp_path):
    model = VPDModelForDepthEstimation.from_stable_diffusion(
        str(tiny_sd_dir),
        scene_names=["kitchen", "office"],
        prompt_templates=["a photo of a {}."],
        dtype=torch.bfloat16,
        show_progress=False,
        max_depth=80.0,
        latent_scaling="scaling_factor",
        **TINY_DEPTH_HEAD,
    )
    assert model.config.num_prompts == 2 and model.config.prompt_names == ["kitchen", "office"]
    assert model.config.max_depth == 80.0 and model.config.latent_scaling == "scaling_factor"
    assert model.dtype == torch.bfloat16 and model.vpd.prompt_embeddings.dtype == torch.bfloat16
    with torch.no_grad():
        depth = model(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16), scene_ids=[1]).predicted_depth
    assert depth.shape == (1, 64, 64) and torch.isfinite(depth).all()


def test_bad_prompts_are_rejected(tiny_sd_dir):
    with pytest.raises(ValueError, match="exactly one '\\{\\}' placeholder"):
        VPDModelForDepthEstimation.from_stable_diffusion(tiny_sd_dir, prompt_templates=["no placeholder"])
    with pytest.raises(ValueError, match="`names` must be a non-empty list"):
        VPDModelForDepthEstimation.from_stable_diffusion(tiny_sd_dir, scene_names=[])


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises((OSError, EnvironmentError)):
        VPDModelForDepthEstimation.from_stable_diffusion(tmp_path / "nowhere")
