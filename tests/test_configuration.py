"""VPDConfig: defaults, validation, serialisation."""

import pytest
from transformers import AutoConfig

from vpd_hf import SD15_UNET_CONFIG, SD15_VAE_CONFIG, VPDConfig
from vpd_hf.testing_utils import TINY_UNET_CONFIG, tiny_vpd_config


def test_defaults_are_the_official_depth_model_on_sd15():
    config = VPDConfig()
    assert config.model_type == "vpd"
    assert config.unet_config == SD15_UNET_CONFIG and config.vae_config == SD15_VAE_CONFIG
    assert config.prompt_embed_dim == 768 and config.num_prompts == 27
    assert config.timestep == 1 and config.latent_scaling is None
    assert config.attention_resolutions == [] and config.detach_attention_maps is True
    assert config.text_adapter_gamma_init == 1e-4
    assert config.max_depth == 10.0 and config.depth_neck_channels == 1536 and config.depth_head_channels == 192
    assert config.depth_deconv_filters == [32, 32, 32] and config.depth_deconv_kernels == [2, 2, 2]
    assert config.silog_lambda == 0.5
    assert config.unet_channels == [320, 640, 1280, 1280] and config.pad_multiple == 64


def test_round_trip_through_auto_config(tmp_path):
    config = tiny_vpd_config(attention_resolutions=[32, 16], latent_scaling=5.07543, prompt_names=None, timestep=5)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is VPDConfig
    assert loaded.attention_resolutions == [32, 16]
    assert loaded.latent_scaling == 5.07543 and loaded.timestep == 5
    assert loaded.unet_config == config.unet_config


def test_private_diffusers_keys_are_dropped():
    unet = {**TINY_UNET_CONFIG, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"}
    assert "_class_name" not in tiny_vpd_config(unet_config=unet).unet_config


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_depth": -1.0}, ValueError, "`max_depth` must be a positive number"),
        ({"max_depth": 0}, ValueError, "`max_depth` must be a positive number"),
        ({"attention_resolutions": [8]}, ValueError, r"contains \[8\]; allowed values are \[64, 32, 16\]"),
        ({"attention_resolutions": [16, 16]}, ValueError, "duplicates"),
        ({"attention_resolutions": "16"}, TypeError, "list of integers"),
        ({"timestep": -1}, ValueError, r"`timestep` must be an integer in \[0, 1000\)"),
        ({"timestep": 1.5}, ValueError, "`timestep` must be an integer"),
        ({"latent_scaling": "sd"}, ValueError, "`latent_scaling` must be None, one of"),
        ({"latent_scaling": -2.0}, ValueError, "`latent_scaling` must be None"),
        ({"latent_scaling": True}, ValueError, "`latent_scaling` must be None"),
        ({"prompt_embed_dim": 768}, ValueError, r"must equal the UNet's `cross_attention_dim` \(32\)"),
        ({"num_prompts": -1}, ValueError, "`num_prompts` must be a non-negative integer"),
        ({"num_prompts": 2, "prompt_names": ["a"]}, ValueError, "`prompt_names` has 1 entries but `num_prompts` is 2"),
        ({"prompt_names": "kitchen"}, TypeError, "`prompt_names` must be a list of strings"),
        ({"detach_attention_maps": "yes"}, TypeError, "`detach_attention_maps` must be a bool"),
        ({"text_adapter_gamma_init": float("nan")}, ValueError, "`text_adapter_gamma_init` must be a finite number"),
        ({"depth_neck_channels": 100}, ValueError, "divisible by 16"),
        ({"depth_head_channels": 0}, ValueError, "`depth_head_channels` must be a positive integer"),
        ({"depth_deconv_filters": [8, 8], "depth_deconv_kernels": [2]}, ValueError, "same length"),
        ({"depth_deconv_kernels": [2, 2, 5]}, ValueError, r"entries must be in \[2, 3, 4\]"),
        ({"depth_deconv_filters": [8] * 6, "depth_deconv_kernels": [2] * 6}, ValueError, "at most 5"),
        ({"silog_lambda": 1.5}, ValueError, r"`silog_lambda` must be a number in \[0, 1\]"),
        ({"unet_config": "sd15"}, TypeError, "`unet_config` must be a dict"),
        (
            {"unet_config": {**TINY_UNET_CONFIG, "up_block_types": ["UpBlock2D"] * 4}},
            ValueError,
            "Stable Diffusion style",
        ),
        ({"unet_config": {**TINY_UNET_CONFIG, "layers_per_block": 1}}, ValueError, r"layers_per_block.*must be 2"),
        ({"unet_config": {**TINY_UNET_CONFIG, "in_channels": 8}}, ValueError, r"`unet_config\['in_channels'\]` \(8\)"),
        ({"vae_config": {"block_out_channels": [8, 8]}}, ValueError, "must have 4 entries"),
    ],
)
def test_bad_values_raise_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_vpd_config(**kwargs)
