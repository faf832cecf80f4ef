"""Training setup: recipe parameter groups and schedules, configuration, LoRA."""

import math

import pytest
import torch

import vpd_hf
from vpd_hf.testing_utils import tiny_referring_config, tiny_segmentation_config, tiny_vpd_config
from vpd_hf.training import (
    TrainConfig,
    add_unet_lora,
    load_recipe,
    load_unet_lora,
    lr_factor_fn,
    merge_unet_lora,
    parameter_groups,
    parse_config,
    save_unet_lora,
)
from vpd_hf.training.trainer import compact_state_names


def group_of(groups, name):
    return next(g for g in groups if name in g["param_names"])


def test_segmentation_groups_follow_mmcv_custom_keys():
    model = vpd_hf.VPDModelForSegmentation(tiny_segmentation_config())
    groups = parameter_groups(model, "segmentation", lr=8e-5, weight_decay=1e-3)
    attention_norm = group_of(groups, "vpd.unet.down_blocks.1.attentions.0.norm.weight")
    block_norm = group_of(groups, "vpd.unet.up_blocks.2.attentions.1.transformer_blocks.0.norm3.bias")
    resnet_norm = group_of(groups, "vpd.unet.down_blocks.1.resnets.0.norm1.weight")  # ldm: in_layers.0
    unet_conv = group_of(groups, "vpd.unet.conv_in.weight")
    head = group_of(groups, "head.conv_seg.weight")
    head_bn = group_of(groups, "head.scale_heads.0.0.bn.weight")
    assert attention_norm is block_norm and (attention_norm["lr"], attention_norm["weight_decay"]) == (8e-5, 0.0)
    assert resnet_norm is unet_conv and unet_conv["lr"] == pytest.approx(8e-6) and unet_conv["weight_decay"] == 1e-3
    assert head is head_bn and (head["lr"], head["weight_decay"]) == (8e-5, 1e-3)
    assert group_of(groups, "vpd.text_adapter.gamma") is head
    grouped = {name for g in groups for name in g["param_names"]}
    assert not any(".vae." in name for name in grouped)
    assert grouped == {name for name, p in model.named_parameters() if p.requires_grad}


def test_depth_groups_follow_the_ldm_constructor():
    model = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config())
    groups = parameter_groups(model, "depth", lr=5e-4, weight_decay=0.1)
    unet_weight = group_of(groups, "vpd.unet.down_blocks.0.resnets.0.conv1.weight")
    unet_bias = group_of(groups, "vpd.unet.down_blocks.0.resnets.0.conv1.bias")
    assert unet_weight["lr"] == pytest.approx(5e-6) and unet_weight["weight_decay"] == 0.1
    assert unet_bias["lr"] == pytest.approx(5e-6) and unet_bias["weight_decay"] == 0.0
    assert group_of(groups, "vpd.unet.down_blocks.0.resnets.0.norm1.weight") is unet_bias  # 1-D: no decay
    gamma = group_of(groups, "vpd.text_adapter.gamma")
    assert (gamma["lr"], gamma["weight_decay"]) == (5e-4, 0.0)
    head_weight = group_of(groups, "head.neck.out_layer.0.weight")
    assert (head_weight["lr"], head_weight["weight_decay"]) == (5e-4, 0.1)


def test_referring_groups_keep_the_unet_at_full_rate_and_skip_the_frozen_text_encoder():
    model = vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config())
    groups = parameter_groups(model, "referring", lr=5e-5, weight_decay=1e-2)
    norm = group_of(groups, "vpd.unet.mid_block.attentions.0.transformer_blocks.0.norm1.weight")
    conv = group_of(groups, "vpd.unet.mid_block.resnets.0.norm2.weight")
    assert (norm["lr"], norm["weight_decay"]) == (5e-5, 0.0) and (conv["lr"], conv["weight_decay"]) == (5e-5, 1e-2)
    assert group_of(groups, "decoder.bn1_4.weight")["weight_decay"] == 1e-2  # "bn" is not a norm name
    assert not any(name.startswith("text_encoder.") for g in groups for name in g["param_names"])
    documented = parameter_groups(model, "referring", lr=5e-5, weight_decay=1e-2, unet_lr_mult=0.01)
    assert group_of(documented, "vpd.unet.conv_in.weight")["lr"] == pytest.approx(5e-7)


def test_a_trainable_vae_is_refused():
    model = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config())
    model.vpd.vae.requires_grad_(True)
    with pytest.raises(ValueError, match="VAE must stay frozen"):
        parameter_groups(model, "depth", lr=1e-3, weight_decay=0.0)


def official_depth_lr(step, iterations_per_half, max_lr, min_lr):
    """The official loop's formula, with its 1-based global step."""
    if step < iterations_per_half:
        return (max_lr - min_lr) * (step / iterations_per_half) ** 0.9 + min_lr
    return max(min_lr, (min_lr - max_lr) * (step / iterations_per_half - 1) ** 0.9 + max_lr)


def test_depth_rise_and_fall_schedule_matches_the_official_formula():
    total = 50 * 24  # 24 "epochs" of 50 iterations: half = 12 epochs
    factor = lr_factor_fn("rise_fall", total, power=0.9, min_lr_ratio=3e-5 / 5e-4)
    for step in (0, 1, 100, 599, 600, 601, 1000, 1199):
        assert factor(step) * 5e-4 == pytest.approx(official_depth_lr(step + 1, 600, 5e-4, 3e-5), rel=1e-9)
    assert max(factor(s) for s in range(total)) == pytest.approx(1.0, abs=2e-3)


def test_segmentation_and_referring_schedules():
    warm = lr_factor_fn("poly_warmup", 80000, warmup_steps=1500, warmup_ratio=1e-6, power=1.0)
    assert warm(0) == pytest.approx(1e-6)  # mmcv linear warm-up starts at warmup_ratio x regular lr
    assert warm(750) == pytest.approx((1 - 750 / 80000) * (1 - 0.5 * (1 - 1e-6)))
    assert warm(1500) == pytest.approx(1 - 1500 / 80000) and warm(80000) == 0.0
    refer = lr_factor_fn("poly", 1000, power=0.9)
    assert refer(0) == 1.0 and refer(500) == pytest.approx(0.5**0.9) and refer(1000) == 0.0
    assert lr_factor_fn("constant", 10)(7) == 1.0
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        lr_factor_fn("cosine", 10)


def test_recipes_carry_the_paper_settings():
    depth = load_recipe("nyu_depth")
    assert (depth["learning_rate"], depth["min_lr_ratio"] * depth["learning_rate"]) == (5e-4, pytest.approx(3e-5))
    assert (depth["weight_decay"], depth["num_epochs"], depth["crop_size"], depth["unet_lr_mult"]) == (
        0.1,
        25,
        480,
        0.01,
    )
    seg = load_recipe("ade20k_segmentation")
    assert (seg["learning_rate"], seg["weight_decay"], seg["max_steps"], seg["warmup_steps"]) == (
        8e-5,
        1e-3,
        80000,
        1500,
    )
    assert seg["per_device_train_batch_size"] * 8 == 16 and seg["unet_lr_mult"] == 0.1
    refer = load_recipe("refcoco_referring")
    assert (refer["learning_rate"], refer["weight_decay"], refer["num_epochs"], refer["lr_power"]) == (
        5e-5,
        1e-2,
        40,
        0.9,
    )
    assert refer["per_device_train_batch_size"] * 8 == 32 and refer["token_length"] == 40


def test_command_line_overrides_the_recipe(tmp_path):
    config = parse_config(["--recipe", "nyu_depth", "--learning_rate", "1e-3", "--model_overrides", '{"max_depth": 20}',
                           "--lora_targets", "to_q", "to_v", "--gradient_checkpointing", "true"])  # fmt: skip
    assert config.task == "depth" and config.learning_rate == 1e-3 and config.num_epochs == 25
    assert config.model_overrides == {"max_depth": 20} and config.lora_targets == ["to_q", "to_v"]
    assert config.gradient_checkpointing is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1.0\nmystery_option: 3\n")
    with pytest.raises(ValueError, match="unknown options \\['mystery_option'\\]"):
        parse_config(["--recipe", str(bad)])
    with pytest.raises(ValueError, match="`task` must be one of"):
        TrainConfig(task="panoptic")
    with pytest.raises(ValueError, match="`report_to` must be"):
        TrainConfig(report_to="mlflow")


def test_lora_adapts_only_the_unet_and_merges_exactly(tmp_path):
    torch.manual_seed(0)
    model = vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config())
    add_unet_lora(model, rank=4)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if "lora_" in name}
    assert lora and all(name.startswith("vpd.unet.") for name in lora)
    assert not any("lora_" in name for name, _ in model.named_parameters() if not name.startswith("vpd.unet."))
    assert trainable - lora == {
        name for name, _ in model.named_parameters() if name.startswith(("decoder.", "vpd.text_adapter."))
    }
    # Checkpoints keep the adapter, heads and buffers only: a fraction of the model.
    kept = compact_state_names(model)
    state = model.state_dict()
    kept_size = sum(state[n].numel() for n in kept)
    assert kept_size < 0.2 * sum(v.numel() for v in state.values())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    ids = torch.randint(0, 700, (2, 8))
    with torch.no_grad():
        adapted = model(pixel_values=pixels, input_ids=ids).logits
    save_unet_lora(model, tmp_path / "lora")
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    # The saved adapter, loaded into a fresh copy of the base model, reproduces the adapted outputs.
    reloaded = vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config())
    base_state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    reloaded.load_state_dict(base_state)
    load_unet_lora(reloaded, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels, input_ids=ids).logits, adapted)
    merge_unet_lora(model)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels, input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(adapted.sum()))
