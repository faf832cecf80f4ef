"""Conversion of the authors' released VPD checkpoints (`vpd_hf.conversion`).

The released files cannot be used here, so the tests write "official-layout" files from tiny vpd_hf models with an
inverse mapping written independently of the converter, from the tables of `docs/vpd-checkpoint-keys.md` (ldm UNet/VAE
names, mmcv/LAVT head names, task prefixes, and the junk the real files carry), convert them back, and check that the
converted models reproduce the original models' outputs. The same mapping applied to full-size models on the meta
device must give the documented key counts of the real files.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from vpd_hf import (
    NYU_SCENE_NAMES,
    VPDConfig,
    VPDModelForDepthEstimation,
    VPDModelForReferringSegmentation,
    VPDModelForSegmentation,
)
from vpd_hf.conversion import (
    ConversionReport,
    convert_checkpoint,
    convert_state_dict,
    detect_task,
    infer_config_overrides,
    load_official_state_dict,
)
from vpd_hf.testing_utils import tiny_referring_config, tiny_segmentation_config, tiny_vpd_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# Inverse mapping: our names -> the names in the released files (doc sections 3-8)
# ---------------------------------------------------------------------------------------------------------------------

# ResBlock parts, diffusers -> ldm (doc section 3).
_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _ldm_resnet(rest: str) -> str:
    module, _, param = rest.partition(".")
    return f"{_LDM_RESNET[module]}.{param}"


def unet_key_to_ldm(key: str) -> str:
    """A diffusers `UNet2DConditionModel` key (two layers per block) -> the ldm `UNetModel` key."""
    if m := re.fullmatch(r"time_embedding\.linear_(\d)\.(\w+)", key):
        return f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}"
    if m := re.fullmatch(r"conv_in\.(\w+)", key):
        return f"input_blocks.0.0.{m[1]}"
    if m := re.fullmatch(r"down_blocks\.(\d)\.resnets\.(\d)\.(.+)", key):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.0.{_ldm_resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d)\.attentions\.(\d)\.(.+)", key):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"  # SpatialTransformer names are identical
    if m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{3 * int(m[1]) + 3}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_ldm_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.resnets\.(\d)\.(.+)", key):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.{_ldm_resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.attentions\.(\d)\.(.+)", key):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(\w+)", key):
        # The first up block has no attention, so its upsampler is the 2nd module of the last output block.
        return f"output_blocks.{3 * int(m[1]) + 2}.{1 if m[1] == '0' else 2}.conv.{m[2]}"
    raise AssertionError(f"unmapped UNet key {key}")


def vae_item_to_ldm(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A diffusers VAE encoder / quant_conv key -> the ldm `AutoencoderKL` key (doc section 4)."""
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)\.(\w+)\.(\w+)", key):
        module = "nin_shortcut" if m[3] == "conv_shortcut" else m[3]
        return f"encoder.down.{m[1]}.block.{m[2]}.{module}.{m[4]}", tensor
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", tensor
    if m := re.fullmatch(r"encoder\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"encoder.mid.block_{int(m[1]) + 1}.{m[2]}", tensor
    if m := re.fullmatch(r"encoder\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", key):
        module = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[1]]
        if m[1] != "group_norm" and m[2] == "weight":
            tensor = tensor[:, :, None, None]  # ldm uses 1x1 convs where diffusers has Linear layers
        return f"encoder.mid.attn_1.{module}.{m[2]}", tensor
    if m := re.fullmatch(r"encoder\.conv_norm_out\.(\w+)", key):
        return f"encoder.norm_out.{m[1]}", tensor
    if re.fullmatch(r"(encoder\.conv_in|encoder\.conv_out|quant_conv)\.\w+", key):
        return key, tensor
    raise AssertionError(f"unmapped VAE key {key}")


def head_key_to_official(key: str, task: str) -> str:
    """Our head / adapter / prompt names -> the released names (doc sections 5-8)."""
    p = "encoder." if task == "depth" else ""
    if m := re.fullmatch(r"vpd\.text_adapter\.linear_(\d)\.(\w+)", key):
        return f"{p}text_adapter.fc.{0 if m[1] == '1' else 2}.{m[2]}"
    if key == "vpd.text_adapter.gamma":
        return f"{p}gamma"
    if key == "vpd.prompt_embeddings":
        return f"{p}class_embeddings"
    if task == "segmentation":
        if m := re.fullmatch(r"neck\.(lateral_convs|fpn_convs)\.(\d)\.(\w+)", key):
            return f"neck.{m[1]}.{m[2]}.conv.{m[3]}"  # mmcv ConvModule
        if m := re.fullmatch(r"head\.(.+)", key):
            return f"decode_head.{m[1]}"
    if task == "depth":
        if m := re.fullmatch(r"head\.neck\.(.+)", key):
            return f"encoder.{m[1]}"
        if m := re.fullmatch(r"head\.(decoder|last_layer_depth)\.(.+)", key):
            return f"{m[1]}.{m[2]}"
    if task == "referring" and (m := re.fullmatch(r"decoder\.(.+)", key)):
        return f"classifier.{m[1]}"
    raise AssertionError(f"unmapped {task} key {key}")


_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights",
)  # fmt: skip


def official_state_dict(model: torch.nn.Module, task: str, *, with_vae: bool = True) -> tuple[dict, list[str]]:
    """The weights of `model` in the layout of the released `task` file, plus the junk that file carries; returns the
    dict and the keys a converter is expected to drop."""
    p = "encoder." if task == "depth" else ""
    unet_prefix, vae_prefix = f"{p}unet.unet.diffusion_model.", f"{p}encoder_vq."
    official, junk = {}, {}
    for key, tensor in model.state_dict().items():
        if key.startswith("vpd.unet."):
            official[unet_prefix + unet_key_to_ldm(key[len("vpd.unet.") :])] = tensor
        elif key.startswith("vpd.vae."):
            if with_vae:
                name, value = vae_item_to_ldm(key[len("vpd.vae.") :], tensor)
                official[vae_prefix + name] = value
        elif key.startswith("text_encoder."):
            continue  # never in the released files
        else:
            official[head_key_to_official(key, task)] = tensor
    device = model.vpd.unet.conv_in.weight.device
    width = model.config.unet_channels[0]
    latent = model.config.latent_channels
    if task != "depth":  # only depth deleted the UNet's output layers
        junk[unet_prefix + "out.0.weight"] = torch.ones(width, device=device)
        junk[unet_prefix + "out.0.bias"] = torch.zeros(width, device=device)
        junk[unet_prefix + "out.2.weight"] = torch.zeros(latent, width, 3, 3, device=device)
        junk[unet_prefix + "out.2.bias"] = torch.zeros(latent, device=device)
    if with_vae:
        junk[vae_prefix + "post_quant_conv.weight"] = torch.zeros(latent, latent, 1, 1, device=device)
        junk[vae_prefix + "post_quant_conv.bias"] = torch.zeros(latent, device=device)
    if task == "segmentation":
        for name in _SCHEDULE_BUFFERS:
            junk[f"sd_model.{name}"] = torch.linspace(0.00085, 0.012, 1000, device=device)
    return {**official, **junk}, sorted(junk)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturbs every weight and buffer (a fresh model has zero prompts, unit BN statistics, constant gamma), so that
    a wrong mapping changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: tiny original models (sharing the tiny SD's frozen parts) and their official-layout files
# ---------------------------------------------------------------------------------------------------------------------


def _take_from_sd(model: torch.nn.Module, sd_dir: Path, vae: bool = False, text: bool = False) -> None:
    """Copies the parts a released file may lack from the tiny SD folder, as the converter will."""
    from diffusers import AutoencoderKL

    if vae:
        state = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae").state_dict()
        model.vpd.vae.load_state_dict({k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))})
    if text:
        model.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder").state_dict())


@pytest.fixture(scope="module")
def seg_model(tiny_sd_dir):
    torch.manual_seed(0)
    model = randomize_(VPDModelForSegmentation(tiny_segmentation_config(semantic_inference_mode="slide")), seed=1)
    _take_from_sd(model, tiny_sd_dir, vae=True)  # the slim file has no VAE: the converter takes SD's
    return model


@pytest.fixture(scope="module")
def depth_model():
    torch.manual_seed(0)
    return randomize_(VPDModelForDepthEstimation(tiny_vpd_config()), seed=2)


@pytest.fixture(scope="module")
def refer_model(tiny_sd_dir):
    torch.manual_seed(0)
    text_config = CLIPTextConfig.from_pretrained(tiny_sd_dir, subfolder="text_encoder").to_dict()
    model = randomize_(VPDModelForReferringSegmentation(tiny_referring_config(text_config=text_config)), seed=3)
    _take_from_sd(model, tiny_sd_dir, text=True)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory, seg_model, depth_model, refer_model):
    """Official-layout files: mmcv seg (pickle, full and slim safetensors), depth (pickle, safetensors), refer
    (pickle with an `argparse.Namespace`, which needs `weights_only=False`)."""
    root = tmp_path_factory.mktemp("official")
    seg, seg_junk = official_state_dict(seg_model, "segmentation")
    slim, slim_junk = official_state_dict(seg_model, "segmentation", with_vae=False)
    del slim["class_embeddings"]  # the slim file may lack the prompt table as well (doc section 9)
    torch.save(seg_model.vpd.prompt_embeddings.clone(), root / "class_embeddings.pth")  # as the repository ships it
    depth, depth_junk = official_state_dict(depth_model, "depth")
    refer, refer_junk = official_state_dict(refer_model, "referring")
    meta = {"CLASSES": tuple(seg_model.config.prompt_names), "mmcv_version": "1.6.2", "iter": 80000}
    torch.save({"meta": meta, "state_dict": seg, "optimizer": {"state": {}, "param_groups": []}}, root / "seg.ckpt")
    save_file({k: v.contiguous() for k, v in slim.items()}, root / "seg_slim.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in depth.items()}}, root / "depth.pth")
    save_file({k: v.contiguous() for k, v in depth.items()}, root / "depth.safetensors")
    namespace = argparse.Namespace(token_length=8, lr=5e-5)
    torch.save({"model": refer, "optimizer": {}, "epoch": 39, "args": namespace, "lr_scheduler": {}}, root / "ref.pth")
    return {
        "seg": (root / "seg.ckpt", seg, seg_junk),
        "seg_slim": (root / "seg_slim.safetensors", slim, slim_junk),
        "class_embeddings": root / "class_embeddings.pth",
        "depth": (root / "depth.pth", depth, depth_junk),
        "depth_st": (root / "depth.safetensors", depth, depth_junk),
        "refer": (root / "ref.pth", refer, refer_junk),
    }


def _pixels(seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def test_pickles_are_refused_unless_trusted(files):
    path, official, _ = files["seg"]
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_official_state_dict(path)
    with pytest.raises(ValueError, match="trust_pickle"):
        convert_checkpoint(path, path.parent / "never")
    assert not (path.parent / "never").exists()
    loaded = load_official_state_dict(path, trust_pickle=True)
    assert loaded.keys() == official.keys()  # `state_dict` unwrapped, `meta` / `optimizer` left out
    assert all(torch.equal(loaded[k], official[k]) for k in official)


def test_module_prefix_stripped_and_safetensors_read_directly(files):
    path, official, _ = files["depth"]
    assert load_official_state_dict(path, trust_pickle=True).keys() == official.keys()
    st_path = files["depth_st"][0]
    assert load_official_state_dict(st_path).keys() == official.keys()  # no trust needed


def test_namespace_needs_full_unpickling_with_a_warning(files, caplog):
    path, official, _ = files["refer"]
    with caplog.at_level(logging.WARNING, logger="vpd_hf.conversion"):
        loaded = load_official_state_dict(path, trust_pickle=True)
    assert loaded.keys() == official.keys()
    assert any("weights_only=False" in record.getMessage() for record in caplog.records)


def test_bad_paths_and_arguments(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        load_official_state_dict(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError):
        load_official_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(TypeError, match="path"):
        load_official_state_dict(42)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_official_state_dict(tmp_path / "broken.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Detection and shape inference
# ---------------------------------------------------------------------------------------------------------------------


def test_detect_task(files):
    assert detect_task(files["seg"][1]) == "segmentation"
    assert detect_task(files["seg_slim"][1]) == "segmentation"
    assert detect_task(files["depth"][1]) == "depth"
    assert detect_task(files["refer"][1]) == "referring"
    with pytest.raises(ValueError, match="Cannot tell"):
        detect_task({"backbone.conv1.weight": torch.zeros(1)})
    mixed = {**files["seg"][1], "classifier.conv1_4.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="several"):
        detect_task(mixed)
    headless = {k: v for k, v in files["seg"][1].items() if not k.startswith("unet.")}
    with pytest.raises(ValueError, match="no UNet"):
        detect_task(headless)
    with pytest.raises(TypeError, match="state_dict"):
        detect_task([("a", torch.zeros(1))])


def test_infer_config_overrides(files, seg_model, depth_model, refer_model):
    seg = infer_config_overrides(files["seg"][1], "segmentation")
    assert seg == {
        "num_labels": 5,
        "num_prompts": 5,
        "attention_resolutions": [32, 16],
        "fpn_channels": seg_model.config.fpn_channels,
        "semantic_head_channels": seg_model.config.semantic_head_channels,
        "prompt_embed_dim": 32,
    }
    depth = infer_config_overrides(files["depth"][1], "depth")
    for name in ("depth_neck_channels", "depth_head_channels", "depth_deconv_filters", "depth_deconv_kernels"):
        assert depth[name] == getattr(depth_model.config, name)
    assert depth["num_prompts"] == 27 and depth["attention_resolutions"] == []
    refer = infer_config_overrides(files["refer"][1], "referring")
    assert refer["token_length"] == refer_model.config.token_length == 8
    assert refer["referring_decoder_channels"] == 32 and refer["attention_resolutions"] == [32, 16]


def test_shape_checks_reject_variants(files):
    seg = dict(files["seg"][1])
    num_classes = seg["decode_head.conv_seg.weight"].shape[0]
    seg["decode_head.conv_seg.weight"] = torch.zeros(num_classes, 128, 1, 1)  # a 128-channel head on 32-wide convs
    with pytest.raises(ValueError, match="conv_seg"):
        infer_config_overrides(seg, "segmentation")
    seg = dict(files["seg"][1])
    seg["neck.lateral_convs.1.conv.weight"] = torch.zeros(32, 64 + 3, 1, 1)  # 3 maps for 5 classes
    with pytest.raises(ValueError, match="0 or 5"):
        infer_config_overrides(seg, "segmentation")
    refer = dict(files["refer"][1])
    refer["classifier.conv1_3.weight"] = torch.zeros(32, 32 + 64 + 9, 3, 3)  # T = 9 here, 8 from conv1_4
    with pytest.raises(ValueError, match="token_length 8"):
        infer_config_overrides(refer, "referring")
    depth = dict(files["depth"][1])
    depth["encoder.out_layer.0.weight"] = torch.zeros(64, 224 + 2, 1, 1)
    with pytest.raises(ValueError, match="out_layer"):
        infer_config_overrides(depth, "depth")
    with pytest.raises(ValueError, match="lacks"):
        infer_config_overrides({k: v for k, v in files["depth"][1].items() if "gamma" not in k}, "depth")
    with pytest.raises(ValueError, match="task"):
        infer_config_overrides(files["depth"][1], "classification")


def test_full_size_layout_matches_the_documented_key_counts():
    """The inverse mapping on SD-1.5-sized models (meta device) gives the doc's key counts of the real files, and the
    converter maps them back one to one (doc section 2: seg 875, depth 839, refer 839 with T = 40)."""
    clip = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
    cases = {
        "segmentation": (
            VPDModelForSegmentation,
            VPDConfig(num_prompts=150, id2label=dict(enumerate(map(str, range(150)))), attention_resolutions=[32, 16]),
            875,
            19,
        ),
        "depth": (VPDModelForDepthEstimation, VPDConfig(), 839, 2),
        "referring": (
            VPDModelForReferringSegmentation,
            VPDConfig(num_prompts=0, text_config=clip.to_dict(), token_length=40, attention_resolutions=[32, 16]),
            839,
            6,
        ),
    }
    for task, (cls, config, count, dropped) in cases.items():
        with torch.device("meta"):
            model = cls(config)
        official, junk = official_state_dict(model, task)
        assert len(official) == count, task
        assert detect_task(official) == task
        overrides = infer_config_overrides(official, task)
        if task == "referring":
            assert overrides["token_length"] == 40
        converted, report = convert_state_dict(official, task, config)
        assert report.dropped == junk and len(junk) == dropped
        assert report.unexpected == []
        target = model.state_dict()
        expected_missing = sorted(k for k in target if k.startswith("text_encoder."))
        assert report.missing == expected_missing
        assert len(converted) == count - dropped
        assert all(tensor.shape == target[key].shape for key, tensor in converted.items())


# ---------------------------------------------------------------------------------------------------------------------
# End to end: convert, reload with from_pretrained, compare with the original model
# ---------------------------------------------------------------------------------------------------------------------


def _check_report(report: ConversionReport, output: Path, model: torch.nn.Module, junk: list[str], missing_prefix):
    """The report (and its JSON copy) lists exactly the junk as dropped and the keys under `missing_prefix` as missing
    and filled; everything else of the model was converted from the file."""
    target = model.state_dict().keys()
    expected_missing = sorted(k for k in target if missing_prefix and k.startswith(missing_prefix))
    assert report.dropped == junk
    assert report.unexpected == []
    assert report.missing == expected_missing
    assert sorted(report.filled) == expected_missing
    assert report.unresolved == []
    assert sorted(report.converted) == sorted(set(target) - set(expected_missing))
    saved = json.loads((output / "conversion_report.json").read_text())
    assert saved["dropped"] == junk and saved["missing"] == expected_missing
    assert (output / "model.safetensors").is_file()
    assert not list(output.glob("*.bin")) and not list(output.glob("*.pth"))
    summary = report.summary()
    assert f"dropped:    {len(junk)}" in summary


def test_segmentation_round_trip(files, seg_model, tiny_sd_dir, tmp_path):
    path, _, junk = files["seg"]
    names = list(seg_model.config.prompt_names)
    report = convert_checkpoint(
        path, tmp_path / "seg", stable_diffusion=tiny_sd_dir, trust_pickle=True, class_names=names
    )
    assert report.task == "segmentation" and report.ignored_entries == ["meta", "optimizer"]
    _check_report(report, tmp_path / "seg", seg_model, junk, None)
    converted = VPDModelForSegmentation.from_pretrained(tmp_path / "seg").eval()
    assert converted.config.id2label == seg_model.config.id2label
    assert converted.config.semantic_inference_mode == "slide"
    assert (tmp_path / "seg" / "preprocessor_config.json").is_file()
    pixels = _pixels(0)
    with torch.no_grad():
        # One pass each (the configured 512-pixel sliding windows would only repeat it, slowly, on a 64-pixel image).
        _assert_same(converted.dense_logits(pixels), seg_model.dense_logits(pixels))
        assert torch.equal(
            converted.head.scale_heads[3][4].bn.num_batches_tracked,
            seg_model.head.scale_heads[3][4].bn.num_batches_tracked,
        )


def test_slim_segmentation_file_takes_the_vae_from_stable_diffusion(files, seg_model, tiny_sd_dir, tmp_path):
    path, _, junk = files["seg_slim"]
    names = list(seg_model.config.prompt_names)
    table = files["class_embeddings"]
    with pytest.raises(ValueError, match="class_names"):
        convert_checkpoint(path, tmp_path / "x", stable_diffusion=tiny_sd_dir)  # 5 classes are not ADE20K's
    with pytest.raises(ValueError, match="stable_diffusion"):
        convert_checkpoint(path, tmp_path / "x", class_names=names)  # widths differ from SD 1.5 too
    with pytest.raises(ValueError, match="trust_pickle"):
        convert_checkpoint(
            path, tmp_path / "x", stable_diffusion=tiny_sd_dir, class_names=names, prompt_embeddings=table
        )
    report = convert_checkpoint(
        path,
        tmp_path / "slim",
        stable_diffusion=tiny_sd_dir,
        class_names=names,
        prompt_embeddings=table,
        trust_pickle=True,
    )
    _check_report(report, tmp_path / "slim", seg_model, junk, ("vpd.vae.", "vpd.prompt_embeddings"))
    assert set(report.filled.values()) == {f"{tiny_sd_dir}/vae", "prompt_embeddings argument"}
    converted = VPDModelForSegmentation.from_pretrained(tmp_path / "slim").eval()
    pixels = _pixels(1)
    with torch.no_grad():
        _assert_same(converted.dense_logits(pixels), seg_model.dense_logits(pixels))


def test_missing_prompt_table_is_re_embedded_with_a_note(files, tiny_sd_dir, tmp_path):
    official = {k: v for k, v in files["depth_st"][1].items() if k != "encoder.class_embeddings"}
    save_file({k: v.contiguous() for k, v in official.items()}, tmp_path / "no_prompts.safetensors")
    report = convert_checkpoint(tmp_path / "no_prompts.safetensors", tmp_path / "out", stable_diffusion=tiny_sd_dir)
    assert report.missing == ["vpd.prompt_embeddings"]
    assert "re-embedded" in report.filled["vpd.prompt_embeddings"]
    assert any("wl-zhao/VPD#56" in note for note in report.notes)
    model = VPDModelForDepthEstimation.from_pretrained(tmp_path / "out")
    assert model.vpd.prompt_embeddings.shape == (27, 32) and model.vpd.prompt_embeddings.abs().sum() > 0


def test_depth_round_trip(files, depth_model, tiny_sd_dir, tmp_path):
    path, _, junk = files["depth"]
    with pytest.raises(ValueError, match="UNet"):
        convert_checkpoint(path, tmp_path / "x", trust_pickle=True)  # tiny widths vs the SD 1.5 default configs
    with pytest.raises(ValueError, match="depth model"):
        convert_checkpoint(path, tmp_path / "x", trust_pickle=True, task="segmentation", stable_diffusion=tiny_sd_dir)
    report = convert_checkpoint(path, tmp_path / "depth", trust_pickle=True, stable_diffusion=tiny_sd_dir, dtype=None)
    _check_report(report, tmp_path / "depth", depth_model, junk, None)
    converted = VPDModelForDepthEstimation.from_pretrained(tmp_path / "depth").eval()
    assert converted.config.prompt_names == list(NYU_SCENE_NAMES) and converted.config.max_depth == 10.0
    pixels = _pixels(2)
    with torch.no_grad():
        expected = depth_model(pixels, scene_ids=torch.tensor([3, -1])).predicted_depth
        _assert_same(converted(pixels, scene_ids=torch.tensor([3, -1])).predicted_depth, expected)


def test_referring_round_trip(files, refer_model, tiny_sd_dir, tmp_path):
    path, _, junk = files["refer"]
    with pytest.raises(ValueError, match="text encoder"):
        convert_checkpoint(path, tmp_path / "x", trust_pickle=True, task="referring")
    with pytest.raises(ValueError, match="token_length"):
        convert_checkpoint(path, tmp_path / "x", trust_pickle=True, stable_diffusion=tiny_sd_dir, token_length=40)
    report = convert_checkpoint(path, tmp_path / "ref", trust_pickle=True, stable_diffusion=tiny_sd_dir, token_length=8)
    assert report.ignored_entries == ["args", "epoch", "lr_scheduler", "optimizer"]
    _check_report(report, tmp_path / "ref", refer_model, junk, "text_encoder.")
    converted = VPDModelForReferringSegmentation.from_pretrained(tmp_path / "ref").eval()
    assert converted.config.token_length == 8
    from vpd_hf import VPDProcessor

    assert VPDProcessor.from_pretrained(tmp_path / "ref").token_length == 8
    pixels = _pixels(3)
    input_ids = torch.randint(0, refer_model.config.text_config["vocab_size"], (2, 8), generator=torch.Generator())
    with torch.no_grad():
        _assert_same(
            converted(pixel_values=pixels, input_ids=input_ids).logits,
            refer_model(pixel_values=pixels, input_ids=input_ids).logits,
        )


def test_convert_checkpoint_argument_errors(files, tiny_sd_dir, tmp_path):
    path = files["depth_st"][0]
    with pytest.raises(ValueError, match="dtype"):
        convert_checkpoint(path, tmp_path / "x", stable_diffusion=tiny_sd_dir, dtype="int8")
    with pytest.raises(ValueError, match="task"):
        convert_checkpoint(path, tmp_path / "x", stable_diffusion=tiny_sd_dir, task="panoptic")
    with pytest.raises(ValueError, match="scene_names"):
        convert_checkpoint(path, tmp_path / "x", stable_diffusion=tiny_sd_dir, scene_names=["kitchen", "office"])
    with pytest.raises(TypeError, match="class_names"):
        convert_checkpoint(path, tmp_path / "x", stable_diffusion=tiny_sd_dir, class_names="wall")
    with pytest.raises(TypeError, match="output_dir"):
        convert_checkpoint(path, None, stable_diffusion=tiny_sd_dir)


def test_dtype_and_unexpected_keys(files, tiny_sd_dir, tmp_path):
    official = files["depth_st"][1]
    extra = {**official, "encoder.extra_head.weight": torch.zeros(3)}
    save_file({k: v.contiguous() for k, v in extra.items()}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match="extra_head"):
        convert_checkpoint(tmp_path / "extra.safetensors", tmp_path / "x", stable_diffusion=tiny_sd_dir)
    report = convert_checkpoint(
        tmp_path / "extra.safetensors", tmp_path / "bf16", stable_diffusion=tiny_sd_dir, strict=False, dtype="bfloat16"
    )
    assert report.unexpected == ["encoder.extra_head.weight"]
    model = VPDModelForDepthEstimation.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert model.head.neck.out_layer[0].weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_vpd_checkpoint", REPO_ROOT / "scripts" / "convert_vpd_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_and_refusal(files, tiny_sd_dir, tmp_path, capsys):
    script = _load_script()
    with pytest.raises(SystemExit):
        script.main(["--help"])
    help_text = capsys.readouterr().out
    assert "Example" in help_text and "--trust-pickle" in help_text and "arbitrary code" in help_text
    code = script.main(["--checkpoint", str(files["depth"][0]), "--output", str(tmp_path / "x")])
    assert code == 2 and "trust" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_converts_a_tiny_file(files, tiny_sd_dir, tmp_path):
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "convert_vpd_checkpoint.py"),
        "--checkpoint",
        str(files["depth_st"][0]),
        "--output",
        str(tmp_path / "cli"),
        "--stable-diffusion",
        str(tiny_sd_dir),
        "--dtype",
        "float16",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "converted:" in result.stdout and "dropped:    2" in result.stdout
    report = json.loads((tmp_path / "cli" / "conversion_report.json").read_text())
    assert report["task"] == "depth" and report["unresolved"] == []
    model = VPDModelForDepthEstimation.from_pretrained(tmp_path / "cli")
    assert model.head.last_layer_depth[2].weight.dtype == torch.float16
