"""One backbone pass, several dense tasks: `VPDModelForDensePrediction`, `VPDConfig.tasks` and single-task classes
loading a multi-task folder."""

import json

import pytest
import torch
from transformers import AutoModelForDepthEstimation, AutoModelForNormalEstimation, AutoModelForSemanticSegmentation
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

import vpd_hf
from vpd_hf import (
    VPDConfig,
    VPDModelForDensePrediction,
    VPDModelForDepthEstimation,
    VPDModelForNormalEstimation,
    VPDModelForSegmentation,
)
from vpd_hf.batching import pad_batch
from vpd_hf.testing_utils import perturb_weights, tiny_segmentation_config, tiny_vpd_config

ALL_TASKS = ["depth", "segmentation", "normals"]
NUM_CLASSES = 5


def _pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _unit_normals(batch, height, width, seed=0):
    return torch.nn.functional.normalize(
        torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)), dim=1
    )


@pytest.fixture(scope="module")
def multitask_model():
    torch.manual_seed(0)
    model = VPDModelForDensePrediction(tiny_segmentation_config(tasks=ALL_TASKS)).eval()
    perturb_weights(model, 0.02, seed=3)  # BatchNorm statistics and heads away from their initialisation
    model.vpd.prompt_embeddings.normal_(generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture(scope="module")
def multitask_folder(multitask_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multitask")
    multitask_model.save_pretrained(folder)
    return folder


LABELS = {
    "depth": torch.rand(2, 64, 96, generator=torch.Generator().manual_seed(7)) + 0.5,
    "segmentation": torch.randint(0, NUM_CLASSES, (2, 64, 96), generator=torch.Generator().manual_seed(8)),
    "normals": _unit_normals(2, 64, 96, seed=9),
}


@pytest.fixture(scope="module")
def multitask_calls():
    """UNet and VAE-encoder calls during the forward of `multitask_output`."""
    return {"unet": 0, "vae": 0}


@pytest.fixture(scope="module")
def multitask_output(multitask_model, multitask_calls):
    backbone = multitask_model.vpd
    hooks = [
        getattr(backbone, name).register_forward_hook(
            lambda *_, name=name: multitask_calls.__setitem__(name, multitask_calls[name] + 1)
        )
        for name in ("unet", "vae")
    ]
    try:
        with torch.no_grad():
            return multitask_model(
                _pixels(2, 3, 64, 96),
                depth_labels=LABELS["depth"],
                segmentation_labels=LABELS["segmentation"],
                normal_labels=LABELS["normals"],
                output_attentions=True,
            )
    finally:
        for hook in hooks:
            hook.remove()


# -- configuration ----------------------------------------------------------------------------------------------------


def test_config_defaults_follow_the_tasks():
    segmentation = VPDConfig(tasks=["segmentation"], num_labels=150)
    assert (segmentation.num_prompts, segmentation.attention_resolutions) == (150, [32, 16])
    assert segmentation.conditioning == "class_prompts" and segmentation.context_tokens == 150
    depth = VPDConfig(tasks=["depth"])
    assert (depth.num_prompts, depth.attention_resolutions, depth.conditioning) == (27, [], "scene_prompt")
    normals = VPDConfig(tasks=["normals", "depth"])
    assert normals.tasks == ["depth", "normals"] and normals.context_tokens == 1
    multi = VPDConfig(tasks=["normals", "segmentation", "depth"], num_labels=3, task_loss_weights={"depth": 2})
    assert multi.tasks == ALL_TASKS and multi.num_prompts == 3 and multi.attention_resolutions == [32, 16]
    assert [multi.loss_weight(task) for task in ALL_TASKS] == [2.0, 1.0, 1.0]
    assert VPDConfig(tasks=["referring"]).num_prompts == 0


def test_configs_saved_without_tasks_still_load(tmp_path):
    for config, task in [(tiny_vpd_config(), "depth"), (tiny_segmentation_config(), "segmentation")]:
        saved = config.to_dict()
        saved.pop("tasks")
        (tmp_path / "config.json").write_text(json.dumps(saved))
        loaded = VPDConfig.from_pretrained(tmp_path)
        assert loaded.tasks == [task]
        assert (loaded.num_prompts, loaded.attention_resolutions) == (config.num_prompts, config.attention_resolutions)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tasks": []}, ValueError, "non-empty"),
        ({"tasks": ["depth", "depth"]}, ValueError, "distinct"),
        ({"tasks": ["depth", "pose"]}, ValueError, "`tasks`"),
        ({"tasks": "depth"}, TypeError, "`tasks` must be a list"),
        ({"tasks": ["depth", "referring"]}, ValueError, "referring segmentation cannot share"),
        ({"tasks": ["depth"], "task_loss_weights": {"normals": 1.0}}, ValueError, "not among `tasks`"),
        ({"tasks": ["depth"], "task_loss_weights": {"depth": -1.0}}, ValueError, "non-negative"),
    ],
)
def test_bad_tasks(kwargs, error, message):
    with pytest.raises(error, match=message):
        VPDConfig(**kwargs)


def test_single_task_class_refuses_a_config_without_its_head():
    with pytest.raises(ValueError, match=r"needs a depth head.*'segmentation', 'normals'"):
        VPDModelForDepthEstimation(tiny_segmentation_config(tasks=["segmentation", "normals"]))


# -- one pass ---------------------------------------------------------------------------------------------------------


def test_one_unet_and_vae_call_per_forward_with_all_losses(multitask_output, multitask_calls):
    out = multitask_output
    assert multitask_calls == {"unet": 1, "vae": 1}
    assert out.predicted_depth.shape == (2, 64, 96) and out.logits.shape == (2, NUM_CLASSES, 8, 12)
    assert out.predicted_normals.shape == (2, 3, 64, 96)
    torch.testing.assert_close(out.predicted_normals.norm(dim=1), torch.ones(2, 64, 96))
    assert torch.allclose(out.loss, out.depth_loss + out.segmentation_loss + out.normals_loss)
    assert [tuple(maps.shape) for maps in out.attentions] == [(2, NUM_CLASSES, 4, 8), (2, NUM_CLASSES, 2, 4)]
    assert bool((out.predicted_depth > 0).all()) and bool((out.predicted_depth < 10).all())


def test_partial_labels_train_only_their_heads_and_never_the_vae():
    torch.manual_seed(0)
    model = VPDModelForDensePrediction(tiny_segmentation_config(tasks=ALL_TASKS, task_loss_weights={"normals": 3.0}))
    model.train()
    out = model(_pixels(2, 3, 64, 64), normal_labels=_unit_normals(2, 64, 64))
    assert out.depth_loss is None and out.segmentation_loss is None
    assert torch.equal(out.loss, 3.0 * out.normals_loss)
    out.loss.backward()

    def grads(module):
        return [p.grad for p in module.parameters() if p.requires_grad]

    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads(model.normals_head.last_layer_normals))
    assert all(
        g is None for g in grads(model.depth_head) + grads(model.segmentation_head) + grads(model.segmentation_neck)
    )
    assert all(p.grad is None and not p.requires_grad for p in model.vpd.vae.parameters())
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads(model.vpd.unet))


# -- saving and loading -----------------------------------------------------------------------------------------------


def test_save_load_is_bit_identical(multitask_model, multitask_folder):
    loaded = VPDModelForDensePrediction.from_pretrained(multitask_folder)
    saved, original_config = loaded.config.to_dict(), multitask_model.config.to_dict()
    saved.pop("_name_or_path"), original_config.pop("_name_or_path")
    assert loaded.config.tasks == ALL_TASKS and saved == original_config
    original = multitask_model.state_dict()
    assert original.keys() == loaded.state_dict().keys()
    assert all(torch.equal(original[key], value) for key, value in loaded.state_dict().items())


@pytest.mark.parametrize(
    ("cls", "auto_class", "task", "output_name"),
    [
        (VPDModelForDepthEstimation, AutoModelForDepthEstimation, "depth", "predicted_depth"),
        (VPDModelForSegmentation, AutoModelForSemanticSegmentation, "segmentation", "logits"),
        (VPDModelForNormalEstimation, AutoModelForNormalEstimation, "normals", "predicted_normals"),
    ],
)
def test_single_task_classes_load_the_multitask_folder(
    cls, auto_class, task, output_name, multitask_folder, multitask_output, tmp_path
):
    logger = transformers_logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(logger) as captured:
        model = cls.from_pretrained(multitask_folder).eval()
        auto_model = auto_class.from_pretrained(multitask_folder)
    assert captured.out == ""  # no report of the other heads' weights (nor of missing ones)
    assert type(auto_model) is cls and model.tasks == [task] and model.config.conditioning == "class_prompts"
    assert all(torch.equal(value, auto_model.state_dict()[key]) for key, value in model.state_dict().items())
    with torch.no_grad():
        out = model(_pixels(2, 3, 64, 96), labels=LABELS[task])
    got, want = getattr(out, output_name), getattr(multitask_output, output_name)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5 * float(want.max() - want.min())
    torch.testing.assert_close(out.loss, getattr(multitask_output, f"{task}_loss"))
    if task == "normals":  # the tensor-by-tensor path of a cast load (`vpd_hf.weights_loading`) renames as well
        cast = cls.from_pretrained(multitask_folder, dtype=torch.bfloat16).state_dict()
        assert all(torch.equal(value.to(cast[key].dtype), cast[key]) for key, value in model.state_dict().items())
    if task == "depth":  # saved again, it is a plain single-task checkpoint under its own names
        model.save_pretrained(tmp_path)
        again = cls.from_pretrained(tmp_path)
        assert all(torch.equal(value, again.state_dict()[key]) for key, value in model.state_dict().items())


# -- mixed sizes ------------------------------------------------------------------------------------------------------


def test_new_outputs_are_batch_invariant(multitask_model, multitask_output):
    """The first image of `multitask_output` (64x96) batched with a smaller one: each runs at its own padded size, and
    its outputs are those it has alone (or with an image of its size)."""
    images = [_pixels(2, 3, 64, 96)[0], _pixels(3, 40, 60, seed=2)]
    masks = [torch.ones(image.shape[-2:], dtype=torch.long) for image in images]
    pixels, pixel_mask = pad_batch(images, masks)
    with torch.no_grad():
        batched = multitask_model(pixels, pixel_mask=pixel_mask)
        alone = multitask_model(images[1][None])
    expected = [(multitask_output, 0), (alone, 0)]
    for index, (image, (reference, row)) in enumerate(zip(images, expected, strict=True)):
        height, width = image.shape[-2:]
        torch.testing.assert_close(batched.predicted_depth[index, :height, :width], reference.predicted_depth[row])
        torch.testing.assert_close(
            batched.predicted_normals[index, :, :height, :width], reference.predicted_normals[row]
        )
        cells = (-(-height // 8), -(-width // 8))
        torch.testing.assert_close(batched.logits[index, :, : cells[0], : cells[1]], reference.logits[row])
    assert torch.equal(batched.pixel_mask, pixel_mask)


# -- bad inputs -------------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument(multitask_model):
    pixels = _pixels(1, 3, 64, 64)
    with pytest.raises(ValueError, match="`depth_labels` must have the shape"):
        multitask_model(pixels, depth_labels=torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match=r"`normal_labels` must have the shape of the prediction, \(1, 3, 64, 64\)"):
        multitask_model(pixels, normal_labels=torch.rand(1, 64, 64))
    with pytest.raises(TypeError, match="`segmentation_labels` must be an integer tensor"):
        multitask_model(pixels, segmentation_labels=torch.rand(1, 64, 64))
    with pytest.raises(TypeError, match="`normal_labels` must be a float tensor"):
        multitask_model(pixels, normal_labels=torch.ones(1, 3, 64, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="`scene_ids`: this model is conditioned on its class prompts"):
        multitask_model(pixels, scene_ids=[0])
    depth_normals = VPDModelForDensePrediction(tiny_vpd_config(tasks=["depth", "normals"])).eval()
    with pytest.raises(ValueError, match=r"`segmentation_labels` given, but this model has no segmentation head"):
        depth_normals(pixels, segmentation_labels=torch.zeros(1, 64, 64, dtype=torch.long))
    out = depth_normals(pixels, scene_ids=[3])  # scene-prompt conditioning: one token per image
    assert out.logits is None and out.predicted_depth.shape == (1, 64, 64)


def test_from_stable_diffusion_builds_the_shared_conditioning(tiny_sd_dir):
    from vpd_hf.testing_utils import TINY_DEPTH_HEAD, TINY_SEGMENTATION_HEAD

    names = ["wall", "floor", "sphere"]
    model = VPDModelForDensePrediction.from_stable_diffusion(
        tiny_sd_dir, class_names=names, show_progress=False, **TINY_DEPTH_HEAD, **TINY_SEGMENTATION_HEAD
    )
    assert model.config.tasks == ALL_TASKS and model.config.semantic_inference_mode == "whole"
    assert model.config.prompt_names == names and model.config.id2label == dict(enumerate(names))
    segmentation = VPDModelForSegmentation.from_stable_diffusion(
        tiny_sd_dir, class_names=names, show_progress=False, **TINY_SEGMENTATION_HEAD
    )
    # Same class prompts, same imported UNet, whichever class built them.
    assert torch.equal(model.vpd.prompt_embeddings, segmentation.vpd.prompt_embeddings)
    assert torch.equal(model.vpd.unet.conv_in.weight, segmentation.vpd.unet.conv_in.weight)
    with pytest.raises(ValueError, match="`scene_names` does not apply"):
        VPDModelForDensePrediction.from_stable_diffusion(tiny_sd_dir, scene_names=["a"])
    with pytest.raises(ValueError, match="has no depth head"):
        VPDModelForDepthEstimation.from_stable_diffusion(tiny_sd_dir, tasks=["normals"])
    assert vpd_hf.TASK_MODEL_CLASSES["multitask"] is VPDModelForDensePrediction
