"""End-to-end training on tiny models and synthetic scenes: resume, LoRA, evaluation, two-process DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import vpd_hf
from vpd_hf.data import depth_dataset, referring_dataset, segmentation_dataset
from vpd_hf.inference import shifted_window_depth
from vpd_hf.metrics import compute_depth_metrics, compute_mean_iou, compute_referring_metrics
from vpd_hf.training import TrainConfig, load_unet_lora
from vpd_hf.training.data import load_raw_splits
from vpd_hf.training.evaluation import evaluate_checkpoint
from vpd_hf.training.trainer import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


def config(tmp_path, name, **overrides):
    values = {
        "task": "depth",
        "model": "tiny-random",
        "dataset": "synthetic",
        "synthetic_num_train": 16,
        "synthetic_num_eval": 4,
        "synthetic_size": 64,
        "crop_size": 64,
        "token_length": 8,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 2,
        "max_steps": 8,
        "learning_rate": 1e-3,
        "unet_lr_mult": 1.0,
        "weight_decay": 0.01,
        "logging_steps": 2,
        "eval_segmentation_mode": "whole",
        "output_dir": str(tmp_path / name),
    }
    values.update(overrides)
    return TrainConfig(**values)


def test_interrupted_and_resumed_training_matches_an_uninterrupted_run(tmp_path):
    """8 steps over two epochs of 4 batches; the interrupted run stops after step 4 mid-schedule and resumes."""
    full = train(config(tmp_path, "full"))
    first = train(config(tmp_path, "resumed", stop_after_steps=4))
    assert first["metrics"] is None and first["global_step"] == 4
    second = train(config(tmp_path, "resumed", resume_from_checkpoint="latest"))
    assert second["global_step"] == 8
    uninterrupted = dict(full["history"])
    resumed = dict(first["history"]) | dict(second["history"])
    assert resumed.keys() == uninterrupted.keys() == {2, 4, 6, 8}
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), step
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # Checkpoints hold the trainable weights and buffers only (no frozen VAE).
    checkpoint = load_file(next((tmp_path / "resumed" / "checkpoints").glob("checkpoint_*")) / "model.safetensors")
    assert not any(".vae." in key for key in checkpoint) and any(".unet." in key for key in checkpoint)


def test_lora_training_saves_small_checkpoints_and_an_adapter(tmp_path):
    plain = train(config(tmp_path, "lora", lora_rank=4, max_steps=4, checkpointing_steps=2))
    merged = train(config(tmp_path, "merged", lora_rank=4, max_steps=4, merge_lora=True))
    out = tmp_path / "lora"
    checkpoint = load_file(next((out / "checkpoints").glob("checkpoint_*")) / "model.safetensors")
    full = load_file(out / "model.safetensors")
    assert any("lora_A" in key for key in checkpoint)
    assert not any(key.startswith("vpd.unet.") and "lora" not in key for key in checkpoint)
    assert sum(v.numel() for v in checkpoint.values()) < 0.1 * sum(v.numel() for v in full.values())
    assert {p.name for p in (out / "lora").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert not any("lora" in key for key in full)  # the saved model is the base UNet + trained heads
    base = vpd_hf.VPDModelForDepthEstimation.from_pretrained(out).eval()
    load_unet_lora(base, out / "lora")
    merged_model = vpd_hf.VPDModelForDepthEstimation.from_pretrained(tmp_path / "merged").eval()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            base(pixels).predicted_depth, merged_model(pixels).predicted_depth, rtol=1e-4, atol=1e-4
        )
    assert plain["metrics"]["rmse"] == pytest.approx(merged["metrics"]["rmse"], rel=1e-3)


def test_non_finite_loss_stops_training_with_the_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss at optimiser step \d+ \(epoch"):
        train(config(tmp_path, "nan", learning_rate=1e30, max_steps=3, weight_decay=0.0, lr_schedule="constant"))


def test_a_training_split_smaller_than_one_batch_is_an_error_not_an_endless_loop(tmp_path):
    with pytest.raises(ValueError, match="training split has 2 examples, fewer than one batch"):
        train(config(tmp_path, "small", synthetic_num_train=2, per_device_train_batch_size=4, max_steps=2))


@pytest.mark.parametrize("task", ["depth", "segmentation", "referring"])
def test_evaluation_equals_metrics_computed_by_hand(tmp_path, task):
    size = 96 if task == "referring" else 64  # synthetic referents need enough visible pixels
    trained = config(tmp_path, task, task=task, max_steps=2, synthetic_size=size, crop_size=size)
    train(trained)
    # Segmentation without the flip average here: the hand computation below is one plain pass per image.
    evaluation = config(tmp_path, task, task=task, model=trained.output_dir, synthetic_size=size, crop_size=size,
                        eval_flip=task != "segmentation")  # fmt: skip
    report = tmp_path / f"{task}.json"
    metrics = evaluate_checkpoint(evaluation, str(report))
    assert json.loads(report.read_text())["metrics"] == json.loads(json.dumps(metrics))

    model_class = {"depth": vpd_hf.VPDModelForDepthEstimation, "segmentation": vpd_hf.VPDModelForSegmentation,
                   "referring": vpd_hf.VPDModelForReferringSegmentation}[task]  # fmt: skip
    model = model_class.from_pretrained(trained.output_dir).eval()
    _, eval_raw, _ = load_raw_splits(evaluation)
    with torch.no_grad():
        if task == "depth":
            items = depth_dataset(eval_raw, "eval", scene_column="scene", scene_names=model.config.prompt_names)
            predictions, references = [], []
            for item in items:
                depth = shifted_window_depth(
                    lambda views, ids=item["scene_ids"]: (
                        model(views, scene_ids=ids.expand(views.shape[0])).predicted_depth
                    ),
                    item["pixel_values"][None],
                )
                predictions.append(depth[0])
                references.append(item["labels"])
            want = compute_depth_metrics(predictions, references)
            for key in ("rmse", "abs_rel", "d1", "silog"):
                assert metrics[key] == pytest.approx(want[key], rel=1e-6), key
        elif task == "segmentation":
            items = segmentation_dataset(
                eval_raw, "eval", img_scale=(4 * size, size), num_labels=model.config.num_labels
            )
            predictions = []
            for item in items:
                logits = model.dense_logits(item["pixel_values"][None])
                logits = torch.nn.functional.interpolate(logits, size=item["labels"].shape, mode="bilinear")
                predictions.append(logits[0].argmax(0))
            want = compute_mean_iou(predictions, [item["labels"] for item in items], model.config.num_labels)
            assert metrics["mean_iou"] == pytest.approx(want["mean_iou"], rel=1e-6, nan_ok=True)
            assert metrics["overall_accuracy"] == pytest.approx(want["overall_accuracy"], rel=1e-6)
        else:
            processor = vpd_hf.VPDProcessor.from_pretrained(trained.output_dir)
            items = referring_dataset(eval_raw, "eval", processor.tokenizer, token_length=8, image_size=size)
            predictions, references = [], []
            for item in items:
                logits = model(pixel_values=item["pixel_values"][None], input_ids=item["input_ids"][None]).logits
                up = torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
                predictions.append(up[0].argmax(0) == 1)
                references.append(item["labels"] == 1)
            want = compute_referring_metrics(predictions, references)
            assert metrics["num_expressions"] == want["num_expressions"] == len(items)
            for key in ("overall_iou", "mean_iou", "precision@0.5"):
                assert metrics[key] == pytest.approx(want[key], rel=1e-6), key


def _launch(launcher: list[str], arguments: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch LAUNCHER scripts/train.py ARGUMENTS` (no ACCELERATE_USE_CPU: the config must do)."""
    environ = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    script = str(ROOT / "scripts" / "train.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, script, *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**environ, **env}, cwd=tmp_path)


def _train_arguments(task: str, output_dir: Path, *extra: str) -> list[str]:
    size = "96" if task == "referring" else "64"
    return [
        "--task", task, "--model", "tiny-random", "--dataset", "synthetic", "--synthetic_num_train", "16",
        "--synthetic_num_eval", "4", "--synthetic_size", size, "--crop_size", size, "--token_length", "8",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--eval_segmentation_mode", "whole",
        "--output_dir", str(output_dir), "--logging_steps", "1", *extra,
    ]  # fmt: skip


CPU_DDP = ["--config_file", str(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml")]


@pytest.mark.parametrize("task", ["segmentation", "referring"])
def test_two_process_ddp_on_cpu(tmp_path, task):
    """The shipped `configs/accelerate/cpu_ddp.yaml`, as is: two CPU processes (gloo) for a few steps of each task."""
    result = _launch(CPU_DDP, _train_arguments(task, tmp_path / task, "--max_steps", "3"), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / task / "all_results.json").read_text())
    assert summary["global_step"] == 3 and summary["metrics"] and summary["num_processes"] == 2
    log = [json.loads(line) for line in (tmp_path / task / "training_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]  # written once (main process), losses averaged over ranks
    assert "2 process(es)" in result.stderr


def test_two_process_ddp_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path):
    """Depth under DDP: rank 0 is SIGKILLed after the processes' files of checkpoint 4 are written but before the
    completion marker; the relaunch resumes from checkpoint 2 (both ranks' RNG states) and finishes."""
    out = tmp_path / "depth"
    arguments = _train_arguments("depth", out, "--max_steps", "4", "--checkpointing_steps", "2",
                                 "--resume_from_checkpoint", "latest")  # fmt: skip
    killed = _launch(CPU_DDP, arguments, tmp_path, VPD_HF_TEST_KILL_AT="checkpoint_before_marker@4")
    assert killed.returncode != 0 and "VPD_HF_TEST_KILL_AT=checkpoint_before_marker@4" in killed.stderr
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in (checkpoints / "checkpoint_2").iterdir()) == [
        "checkpoint_complete.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
        "random_states_1.pkl", "training_state.json",
    ]  # fmt: skip
    partial = checkpoints / "checkpoint_4.partial"
    assert {"random_states_0.pkl", "random_states_1.pkl", "training_state.json"} <= {p.name for p in partial.iterdir()}
    assert not (partial / "checkpoint_complete.json").exists()
    resumed = _launch(CPU_DDP, arguments, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Resuming from {checkpoints / 'checkpoint_2'}" in resumed.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_2", "checkpoint_4"]
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 4
    log = [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]  # the steps after checkpoint 2 that the killed run logged are not repeated


def test_a_cpu_launch_of_two_processes_warns_that_it_runs_one(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process: the trainer says so and points to the config."""
    launcher = ["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    result = _launch(launcher, _train_arguments("depth", tmp_path / "one", "--max_steps", "1"), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes were asked for (`accelerate launch --num_processes 2`)" in result.stderr
    assert "configs/accelerate/cpu_ddp.yaml" in result.stderr and "1 process(es)" in result.stderr


def test_quickstart_script_writes_its_report_pictures_and_a_reloadable_model(tmp_path):
    """The README's main job, shortened: the real run's numbers are in the README, not asserted here."""
    command = [
        sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--output", str(tmp_path), "--steps", "4",
        "--num-train", "16", "--num-eval", "4", "--size", "64", "--batch-size", "4", "--examples", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "depth"
    report = json.loads((out / "results.json").read_text())
    assert report["steps"] == 4 and report["metrics"]["rmse"] > 0 and report["baseline"]["rmse"] > 0
    assert "mean-depth baseline" in result.stderr and "RMSE" in result.stderr
    from PIL import Image

    examples = Image.open(out / "examples.png")
    assert examples.mode == "RGB" and examples.width >= 3 * 64 and examples.height >= 2 * 64
    assert Image.open(out / "training_curve.png").size[0] > 100
    model = vpd_hf.VPDModelForDepthEstimation.from_pretrained(out / "model")
    assert model.config.num_prompts == 27


def test_lora_with_frozen_weights_in_bf16_trains_and_saves_float32(tmp_path):
    with pytest.raises(ValueError, match="needs `mixed_precision=bf16`"):
        train(config(tmp_path, "mismatch", lora_rank=4, lora_frozen_dtype="bf16", mixed_precision="no"))
    AcceleratorState._reset_state(reset_partial_state=True)  # a new process would start with a fresh state
    result = train(config(tmp_path, "bf16", lora_rank=4, lora_frozen_dtype="bf16", mixed_precision="bf16", max_steps=2))
    assert math.isfinite(result["history"][-1][1]) and math.isfinite(result["metrics"]["rmse"])
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {value.dtype for value in saved.values() if value.is_floating_point()} == {torch.float32}
    adapter = load_file(tmp_path / "bf16" / "lora" / "adapter_model.safetensors")
    assert {value.dtype for value in adapter.values()} == {torch.float32}
