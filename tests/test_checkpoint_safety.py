"""Crash-safe training state: SIGKILLs at precise moments (also mid-checkpoint), broken checkpoints, crafted pickles.

Resume equality is asserted bitwise, so every run here trains with ONE thread: PyTorch's CPU backward is not bitwise
reproducible across runs with several threads (~1e-12, which AdamW amplifies). The killed runs are real processes
(forked from this one, so they skip the import cost of a fresh interpreter) that SIGKILL themselves at the points
`VPD_HF_TEST_KILL_AT` names; the two-process (DDP) variant is in tests/test_training_run.py.
"""

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from vpd_hf.training import TrainConfig
from vpd_hf.training.checkpointing import (
    COMPLETE_MARKER,
    KILL_ENV,
    CheckpointError,
    atomic_write_json,
    complete_checkpoints,
    load_checkpoint,
    validate_checkpoint,
)
from vpd_hf.training.launch import requested_num_processes, warn_if_not_distributed
from vpd_hf.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# 12 images in batches of 4: 3 steps per epoch, so 8 steps cross two epoch boundaries; a checkpoint every 2 steps.
BASE = {
    "task": "depth", "model": "tiny-random", "dataset": "synthetic", "synthetic_num_train": 12,
    "synthetic_num_eval": 2, "synthetic_size": 64, "crop_size": 64, "token_length": 8,
    "per_device_train_batch_size": 4, "per_device_eval_batch_size": 2, "max_steps": 8, "learning_rate": 1e-3,
    "unet_lr_mult": 1.0, "weight_decay": 0.01, "logging_steps": 1, "checkpointing_steps": 2,
    "checkpoints_total_limit": None, "eval_depth_windows": 1, "eval_flip": False,
}  # fmt: skip


def make_config(output_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, "output_dir": str(output_dir), **overrides})


def one_thread_train(config: TrainConfig) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train(config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.set_num_threads(threads)


def _child(config: TrainConfig, kill_at: str | None) -> None:
    os.environ.pop(KILL_ENV, None)
    if kill_at:
        os.environ[KILL_ENV] = kill_at
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    train(config)


def run_process(config: TrainConfig, kill_at: str | None = None) -> int:
    """Trains in a separate process; its exit code (-9 when it was SIGKILLed)."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(config, kill_at))
    process.start()
    process.join(300)
    assert process.exitcode is not None, "training process hung"
    return process.exitcode


def steps(output_dir: Path) -> list[int]:
    return [step for step, _ in complete_checkpoints(output_dir / "checkpoints")]


def assert_same_final_model(output_dir: Path, reference: Path) -> None:
    got, want = load_file(output_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    different = [key for key in want if not torch.equal(got[key], want[key])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def log_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "training_log.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len({e["step"] for e in entries}) == len(entries), "a step is logged twice"
    return {e["step"]: e["loss"] for e in entries}


def reseal(folder: Path) -> None:
    """Rewrites the completion marker's file sizes, i.e. a checkpoint whose files were changed by someone else."""
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    marker["files"] = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != COMPLETE_MARKER}
    (folder / COMPLETE_MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, with a complete checkpoint at steps 2, 4, 6 and 8."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    one_thread_train(make_config(output_dir))
    assert steps(output_dir) == [2, 4, 6, 8]
    return output_dir


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="vpd_hf.training")  # the choice of `latest` is logged at INFO


def copy_checkpoints(reference: Path, output_dir: Path, *which: int) -> Path:
    for step in which:
        shutil.copytree(
            reference / "checkpoints" / f"checkpoint_{step}", output_dir / "checkpoints" / f"checkpoint_{step}"
        )
    shutil.copy(reference / "training_log.jsonl", output_dir / "training_log.jsonl")
    return output_dir / "checkpoints"


def test_sigkill_at_every_moment_of_a_save_then_resume_reaches_the_uninterrupted_weights(reference, tmp_path):
    """One run killed seven times (before, during and after checkpoint writes, and between checkpoints), each time
    resumed with `latest`; it ends with exactly the weights and losses of the uninterrupted run. With
    `checkpoints_total_limit=1` the one complete checkpoint survives every kill during the next one's write."""
    out = tmp_path / "run"
    config = make_config(out, resume_from_checkpoint="latest", checkpoints_total_limit=1)
    checkpoints = out / "checkpoints"
    partial = checkpoints / "checkpoint_{}.partial"

    assert run_process(config, "checkpoint_folder_created@2") == -signal.SIGKILL
    assert steps(out) == [] and list(Path(str(partial).format(2)).iterdir()) == []

    assert run_process(config, "checkpoint_after_model_write@2") == -signal.SIGKILL  # over the empty leftover
    assert steps(out) == []
    assert {p.name for p in Path(str(partial).format(2)).iterdir()} == {"model.safetensors"}

    assert run_process(config, "checkpoint_before_marker@4") == -signal.SIGKILL
    assert steps(out) == [2] and (Path(str(partial).format(4)) / "training_state.json").is_file()
    assert not Path(str(partial).format(2)).exists()  # removed once checkpoint 2 was complete

    assert run_process(config, "checkpoint_before_rename@4") == -signal.SIGKILL
    assert steps(out) == [2]  # complete but still .partial: never picked
    assert (Path(str(partial).format(4)) / COMPLETE_MARKER).is_file()

    assert run_process(config, "train_step@5") == -signal.SIGKILL  # mid-epoch, between checkpoints
    assert steps(out) == [4] and not Path(str(partial).format(4)).exists()

    assert run_process(config, "checkpoint_after_accelerate_state@6") == -signal.SIGKILL
    assert steps(out) == [4]

    assert run_process(config, "checkpoint_before_rotation@6") == -signal.SIGKILL
    assert steps(out) == [4, 6]  # the limit is applied only after the new checkpoint is complete

    assert run_process(config) == 0
    assert steps(out) == [8] and sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_8"]
    assert_same_final_model(out, reference)
    assert log_losses(out) == log_losses(reference)  # bitwise: the same batches, augmentations and updates


def test_lora_run_killed_during_a_checkpoint_write_resumes_to_the_same_adapter(tmp_path):
    lora = {"lora_rank": 4, "max_steps": 4, "resume_from_checkpoint": "latest"}
    assert run_process(make_config(tmp_path / "full", **lora)) == 0
    out = tmp_path / "killed"
    assert run_process(make_config(out, **lora), "checkpoint_after_model_write@4") == -signal.SIGKILL
    assert steps(out) == [2]
    assert run_process(make_config(out, **lora)) == 0
    assert_same_final_model(out, tmp_path / "full")
    got = load_file(out / "lora" / "adapter_model.safetensors")
    want = load_file(tmp_path / "full" / "lora" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_an_empty_checkpoint_folder_left_by_a_kill_does_not_block_the_next_save(reference, tmp_path, caplog):
    """Finding 1: a kill right after `checkpoint_N` was created; every later save of N failed with 'already exists'."""
    out = tmp_path / "run"
    checkpoints = copy_checkpoints(reference, out, 2)
    (checkpoints / "checkpoint_4").mkdir()  # what the old layout left
    (checkpoints / "checkpoint_6.partial").mkdir()  # what a kill leaves now
    one_thread_train(make_config(out, resume_from_checkpoint="latest"))
    assert steps(out) == [2, 4, 6, 8]
    assert f"Replacing {checkpoints / 'checkpoint_4'}" in caplog.text
    assert f"Removing {checkpoints / 'checkpoint_6.partial'}" in caplog.text
    assert_same_final_model(out, reference)


def test_a_checkpoint_with_a_zero_byte_training_state_is_not_complete(reference, tmp_path, caplog):
    """Finding 2: training_state.json cut to 0 bytes by a kill; that checkpoint counted as complete and resume died
    with a bare JSONDecodeError. Now `latest` skips it (no marker) and resumes from the one before."""
    out = tmp_path / "run"
    checkpoints = copy_checkpoints(reference, out, 2, 4)
    broken = checkpoints / "checkpoint_4"
    (broken / COMPLETE_MARKER).unlink()
    (broken / "training_state.json").write_text("")
    one_thread_train(make_config(out, resume_from_checkpoint="latest"))
    assert f"Skipping {broken}: not a complete checkpoint" in caplog.text
    assert f"Resuming from {checkpoints / 'checkpoint_2'}" in caplog.text
    assert_same_final_model(out, reference)


@pytest.mark.parametrize(
    ("damage", "file", "what"),
    [
        ("truncate", "model.safetensors", "truncated"),
        ("truncate", "optimizer.bin", "truncated"),
        ("truncate", "training_state.json", "truncated"),
        ("garbage", "training_state.json", "is not valid JSON"),
        ("drop_key", "training_state.json", "has no `global_step`"),
        ("garbage", "optimizer.bin", "cannot be read"),
        ("remove", COMPLETE_MARKER, "is not a complete checkpoint"),
    ],
)
def test_every_broken_file_is_named_with_what_to_do(reference, tmp_path, damage, file, what):
    """Finding 3 (files): errors name the folder, the file, the damage and the way out, before anything is loaded."""
    checkpoints = copy_checkpoints(reference, tmp_path / "run", 2, 4)
    folder = checkpoints / "checkpoint_4"
    path = folder / file
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":  # same size, resealed: the marker no longer vouches for the content
        path.write_bytes(b"{" + bytes(path.stat().st_size - 1))
        reseal(folder)
    elif damage == "drop_key":
        state = json.loads(path.read_text())
        del state["global_step"]
        path.write_text(json.dumps(state))
        reseal(folder)
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as error:
        validate_checkpoint(folder, num_processes=1)
    message = str(error.value)
    assert str(folder) in message and what in message and "--resume_from_checkpoint PATH" in message
    assert file in message
    assert str(checkpoints / "checkpoint_2") in message  # the complete checkpoint to fall back to


def test_scheduler_state_with_foreign_keys_is_refused_before_loading(reference, tmp_path):
    """`LambdaLR.load_state_dict` copies every key of the JSON onto the scheduler: only its own keys are accepted."""
    folder = copy_checkpoints(reference, tmp_path / "run", 4) / "checkpoint_4"
    state = json.loads((folder / "training_state.json").read_text())
    state["scheduler"]["optimizer"] = "not an optimizer"
    (folder / "training_state.json").write_text(json.dumps(state))
    reseal(folder)

    class NeverLoads:
        num_processes = 1

        def load_state(self, folder):
            raise AssertionError("loaded despite a foreign scheduler key")

    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]), lambda s: 1.0)
    with pytest.raises(
        CheckpointError, match=r"checkpoint_4: training_state.json `scheduler` has unknown keys \['optimizer'\]"
    ):
        load_checkpoint(NeverLoads(), folder, scheduler)


def test_rotation_keeps_the_new_checkpoint_when_an_earlier_run_went_further(reference, tmp_path, caplog):
    """Resumed from checkpoint 4 while checkpoint 8 of the earlier run exists: with a limit of 1 the new checkpoint 6
    is kept (not deleted as 'older than 8'), checkpoint 8 is left alone with a warning, checkpoint 4 is rotated away."""
    out = tmp_path / "run"
    checkpoints = copy_checkpoints(reference, out, 4, 8)
    config = make_config(out, resume_from_checkpoint=str(checkpoints / "checkpoint_4"), checkpoints_total_limit=1)
    result = one_thread_train(dataclasses.replace(config, stop_after_steps=2))
    assert result["global_step"] == 6 and steps(out) == [6, 8]
    assert "`--resume_from_checkpoint latest` would pick them" in caplog.text


def test_latest_logs_its_choice_before_loading_and_load_errors_name_the_file(reference, tmp_path, caplog):
    """Finding 3 (end to end): a model.safetensors whose header is garbage (size unchanged) fails inside the load."""
    out = tmp_path / "run"
    folder = copy_checkpoints(reference, out, 4) / "checkpoint_4"
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.write(b"\xff" * 8)  # the header length
    with pytest.raises(CheckpointError, match=r"checkpoint_4: model.safetensors cannot be read") as error:
        train(make_config(out, resume_from_checkpoint="latest"))
    assert "--resume_from_checkpoint PATH" in str(error.value)
    assert f"Resuming from {folder} (the latest complete checkpoint, step 4)" in caplog.text


def test_a_complete_checkpoint_in_a_folder_of_any_name_resumes(reference, tmp_path):
    """Finding 4: `my-checkpoint` failed with `invalid literal for int()`."""
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "checkpoint_6", tmp_path / "my-checkpoint")
    result = one_thread_train(make_config(out, resume_from_checkpoint=str(tmp_path / "my-checkpoint")))
    assert result["global_step"] == 8 and [s for s, _ in result["history"]] == [7, 8]
    assert_same_final_model(out, reference)


def test_a_missing_rng_state_is_an_error_unless_accepted(reference, tmp_path, caplog):
    """Finding 5: it resumed silently (exit 0, no message)."""
    out = tmp_path / "run"
    folder = copy_checkpoints(reference, out, 6) / "checkpoint_6"
    (folder / "random_states_0.pkl").unlink()
    reseal(folder)
    config = make_config(out, resume_from_checkpoint=str(folder))
    with pytest.raises(CheckpointError, match=r"random_states_0.pkl missing.*--resume_without_rng_state"):
        train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train(make_config(out, resume_from_checkpoint=str(folder), resume_without_rng_state=True))
    assert result["global_step"] == 8
    assert "random_states_0.pkl missing" in caplog.text and "not reproducible" in caplog.text


class _RunsCode:
    """Unpickling this creates a marker file: the proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("file", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_resuming_never_runs_code_from_a_checkpoint_file(reference, tmp_path, file):
    """Finding 6: accelerate unpickled custom_checkpoint_0.pkl (the scheduler) with weights_only=False."""
    out = tmp_path / "run"
    folder = copy_checkpoints(reference, out, 2, 4) / "checkpoint_4"
    marker = tmp_path / "code_ran"
    torch.save({"state": _RunsCode(marker)}, folder / file)
    reseal(folder)  # a crafted checkpoint comes with a matching marker
    with pytest.raises(CheckpointError) as error:
        train(make_config(out, resume_from_checkpoint="latest"))
    assert not marker.exists(), "code from the checkpoint ran"
    message = str(error.value)
    assert f"{folder}: {file}" in message and "refused" in message and "--resume_from_checkpoint PATH" in message
    # The refusal is not an artefact of the test: the same file does run its code when unpickled without the guard.
    torch.load(folder / file, weights_only=False)
    assert marker.exists()


def test_training_state_and_results_are_written_atomically(reference, tmp_path, monkeypatch):
    """No JSON of a run is written in place: what a kill can leave is the old file or the new one."""
    path = tmp_path / "training_state.json"
    atomic_write_json(path, {"global_step": 2})

    def killed(fd):  # the moment after the new bytes were written, before they replace the old file
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"global_step": 4, "padding": "x" * 100_000})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"global_step": 2}

    state = json.loads((reference / "checkpoints" / "checkpoint_4" / "training_state.json").read_text())
    assert state["global_step"] == 4 and state["scheduler"]["last_epoch"] == 4
    assert not list(reference.rglob(".*.tmp-*"))
    marker = json.loads((reference / "checkpoints" / "checkpoint_4" / COMPLETE_MARKER).read_text())
    on_disk = {p.name: p.stat().st_size for p in (reference / "checkpoints" / "checkpoint_4").iterdir()}
    assert marker["files"] == {k: v for k, v in on_disk.items() if k != COMPLETE_MARKER}
    assert not any(name.endswith(".pkl") and name.startswith("custom") for name in on_disk)


def test_requested_process_count_is_read_from_the_launcher(caplog):
    argv = [sys.executable, "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "train.py"]
    assert requested_num_processes({}, argv) == (2, "`accelerate launch --num_processes 2`")
    assert requested_num_processes({}, ["accelerate", "launch", "--num_processes=3", "x.py"])[0] == 3
    assert requested_num_processes({}, ["python", "-m", "accelerate.commands.launch", "--num_processes", "2"])[0] == 2
    assert requested_num_processes({"WORLD_SIZE": "4"}, [])[0] == 4
    assert requested_num_processes({}, ["python", "train.py", "--num_processes", "2"]) == (1, "")

    class OneProcess:
        num_processes, distributed_type = 1, "NO"

    assert warn_if_not_distributed(OneProcess(), {}, argv)
    assert "2 processes were asked for" in caplog.text and "configs/accelerate/cpu_ddp.yaml" in caplog.text
    assert not warn_if_not_distributed(OneProcess(), {}, ["python", "train.py"])
