"""Training and evaluation of surface normals and of several dense tasks from one pass, on the tiny model: a few
steps through `scripts/train.py`'s code, every head and the UNet train, the loss weights reach the model, and the
evaluation equals metrics computed by hand from one pass (+ flip) per image."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vpd_hf
from vpd_hf.data import dense_dataset, normals_dataset
from vpd_hf.data.synthetic import SYNTHETIC_ID2LABEL
from vpd_hf.metrics import compute_depth_metrics, compute_mean_iou, compute_normal_metrics
from vpd_hf.training import TrainConfig
from vpd_hf.training.config import parse_config
from vpd_hf.training.data import class_names, load_raw_splits, tiny_model_overrides
from vpd_hf.training.trainer import train

SIZE = 64


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


def config(tmp_path, name, **overrides):
    values = {
        "model": "tiny-random", "dataset": "synthetic", "synthetic_num_train": 4, "synthetic_num_eval": 2,
        "synthetic_size": SIZE, "crop_size": SIZE, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
        "max_steps": 2, "learning_rate": 1e-3, "unet_lr_mult": 1.0, "weight_decay": 0.01, "logging_steps": 1,
        "output_dir": str(tmp_path / name),
    }  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def flip_averaged(model, pixel_values):
    """One pass over the image and its mirror: depth and segmentation probabilities averaged with the mirrored-back
    prediction; normals mirrored back (x negated), averaged and renormalised."""
    outputs = model(pixel_values=torch.cat([pixel_values, pixel_values.flip(-1)]))
    result = {}
    if getattr(outputs, "predicted_depth", None) is not None:
        depth = outputs.predicted_depth
        result["depth"] = (depth[0] + depth[1].flip(-1)) / 2
    if getattr(outputs, "logits", None) is not None:
        probabilities = F.interpolate(outputs.logits, size=pixel_values.shape[-2:], mode="bilinear").softmax(1)
        result["segmentation"] = (probabilities[0] + probabilities[1].flip(-1)).argmax(0)
    normals = outputs.predicted_normals
    if normals is not None:
        mirrored = normals[1].flip(-1) * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
        result["normals"] = F.normalize(normals[0] + mirrored, dim=0)
    return result


def test_multitask_training_trains_every_head_and_evaluates_each_task_from_one_pass(tmp_path):
    cfg = parse_config(
        ["--tasks", "normals", "depth", "segmentation", "--loss_weights", "0.5", "2", "1", "--output_dir",
         str(tmp_path / "multi"), "--synthetic_num_train", "4", "--synthetic_num_eval", "2", "--synthetic_size",
         str(SIZE), "--crop_size", str(SIZE), "--per_device_train_batch_size", "2", "--max_steps", "2",
         "--learning_rate", "1e-3", "--unet_lr_mult", "1", "--logging_steps", "1"]
    )  # fmt: skip
    assert cfg.task == "multitask" and cfg.tasks == ["depth", "segmentation", "normals"]
    result = train(cfg)
    assert result["global_step"] == 2 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result["history"])
    model = vpd_hf.VPDModelForDensePrediction.from_pretrained(cfg.output_dir).eval()
    assert model.config.task_loss_weights == {"depth": 2.0, "segmentation": 1.0, "normals": 0.5}

    # Every head and the UNet moved away from the initial model the trainer built (the tiny SD + fresh heads).
    trained = load_file(tmp_path / "multi" / "model.safetensors")
    initial = vpd_hf.VPDModelForDensePrediction.from_stable_diffusion(
        str(tmp_path / "multi" / "tiny-stable-diffusion"),
        tasks=cfg.tasks,
        class_names=class_names(SYNTHETIC_ID2LABEL),
        show_progress=False,
        **tiny_model_overrides("multitask"),
    ).state_dict()
    moved = {key.split(".")[0] for key in trained if not torch.equal(trained[key], initial[key])}
    assert len([k for k in trained if ".unet." in f".{k}" and not torch.equal(trained[k], initial[k])]) > 0
    assert len(moved) >= 3, moved

    metrics = result["metrics"]
    _, eval_raw, _ = load_raw_splits(cfg)
    items = dense_dataset(eval_raw, "eval", num_labels=model.config.num_labels)
    predictions = {"depth": [], "segmentation": [], "normals": []}
    with torch.no_grad():
        for item in items:
            for task, value in flip_averaged(model, item["pixel_values"][None]).items():
                predictions[task].append(value)
    depth = compute_depth_metrics(predictions["depth"], [item["depth_labels"] for item in items])
    segmentation = compute_mean_iou(predictions["segmentation"], [i["segmentation_labels"] for i in items], 8)
    normals = compute_normal_metrics(predictions["normals"], [item["normal_labels"] for item in items])
    for key in ("rmse", "abs_rel", "d1"):
        assert metrics[f"depth/{key}"] == pytest.approx(depth[key], rel=1e-5), key
    assert metrics["segmentation/overall_accuracy"] == pytest.approx(segmentation["overall_accuracy"], rel=1e-6)
    assert metrics["segmentation/mean_iou"] == pytest.approx(segmentation["mean_iou"], rel=1e-6, nan_ok=True)
    for key in ("mean", "median", "a11.25", "a30"):
        assert metrics[f"normals/{key}"] == pytest.approx(normals[key], rel=1e-5, abs=0.02), key
    assert metrics["normals/num_pixels"] == 2 * SIZE * SIZE


def test_normals_recipe_trains_and_its_evaluation_equals_the_hand_computation(tmp_path):
    cfg = config(tmp_path, "normals", recipe=None, task="normals", eval_flip=True)
    result = train(cfg)
    model = vpd_hf.VPDModelForNormalEstimation.from_pretrained(cfg.output_dir).eval()
    _, eval_raw, _ = load_raw_splits(cfg)
    items = normals_dataset(eval_raw, "eval")
    with torch.no_grad():
        predictions = [flip_averaged(model, item["pixel_values"][None])["normals"] for item in items]
    want = compute_normal_metrics(predictions, [item["labels"] for item in items])
    for key in ("mean", "rmse", "a11.25", "a22.5", "a30"):
        assert result["metrics"][key] == pytest.approx(want[key], rel=1e-5), key
    assert result["metrics"]["median"] == pytest.approx(want["median"], abs=0.02)
    recipe = parse_config(["--recipe", "nyu_normals"])
    assert recipe.task == "normals" and recipe.unet_lr_mult == 0.01 and recipe.lr_schedule == "rise_fall"
    multi = parse_config(["--recipe", "synthetic_multitask", "--loss_weights", "1", "0", "3"])
    assert multi.task_loss_weights == {"depth": 1.0, "segmentation": 0.0, "normals": 3.0}


def test_task_options_are_checked():
    with pytest.raises(ValueError, match="tasks"):
        TrainConfig(tasks=["depth", "referring"])
    with pytest.raises(ValueError, match="one non-negative weight per task"):
        TrainConfig(tasks=["depth", "normals"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="with `--tasks`"):
        TrainConfig(task="normals", loss_weights=[1.0])
    with pytest.raises(ValueError, match="not among `tasks`"):
        TrainConfig(task="segmentation", tasks=["depth", "normals"])
    assert TrainConfig(task="multitask").tasks == ["depth", "segmentation", "normals"]
    assert TrainConfig(tasks=["normals"]).task == "normals"
