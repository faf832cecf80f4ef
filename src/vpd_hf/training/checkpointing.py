"""Crash-safe resumable checkpoints on top of `Accelerator.save_state` / `load_state`.

A kill (pre-emption, OOM killer) may come at any moment, also while a checkpoint is being written. So:

* a checkpoint is written into `checkpoints/checkpoint_<step>.partial`; when every process has written its files, the
  main process writes `training_state.json`, fsyncs everything, writes the completion marker
  `checkpoint_complete.json` (file names and sizes) last and atomically, and only then renames the folder to
  `checkpoints/checkpoint_<step>`. `latest` only ever sees complete checkpoints; a `.partial` folder left by a kill is
  removed (with a log line) by the next save, so it never blocks one;
* `--checkpoints_total_limit` deletes old checkpoints only after the new one is complete (accelerate's own rotation
  deletes first and counts partial folders, so it is not used);
* resuming checks the marker, every file's size, `training_state.json` and that every pickle loads with
  `weights_only=True` *before* anything is loaded, and every failure names the folder, the file, what is wrong and
  what to do. No file of a checkpoint is ever unpickled with `weights_only=False`: the LR scheduler's state lives in
  `training_state.json` (accelerate's `register_for_checkpointing` objects are always unpickled with
  `weights_only=False`, so none is registered) and a `custom_checkpoint_*.pkl` in a folder is refused;
* a missing RNG-state file is an error (the run would no longer be reproducible) unless the user accepts it with
  `--resume_without_rng_state`.

The folder name does not matter for resuming: any folder holding a complete checkpoint (e.g. a copy named
`my-checkpoint`) resumes, its step is read from the files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from . import sharding

logger = logging.getLogger("vpd_hf.training")

TRAINING_STATE = "training_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINTS_DIR = "checkpoints"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
CHECKPOINT_FORMAT = 1
MODEL_FILE = sharding.MODEL_FILE  # "model.safetensors", as accelerate names it
RNG_FILE = "random_states_{}.pkl"
_STATE_KEYS = {"global_step": int, "epoch": int, "batches_in_epoch": int, "scheduler": dict}
_OUR_NAME = re.compile(r"^checkpoint_(\d+)$")
_RNG_NAME = re.compile(r"^random_states_\d+\.pkl$")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")

# Fault injection for the crash tests (never set in normal runs): `VPD_HF_TEST_KILL_AT=<point>[@<step>]` makes process
# 0 (or process `VPD_HF_TEST_KILL_RANK`) SIGKILL itself at that point (of the checkpoint of that optimiser step, or the
# first time it is reached).
KILL_ENV = "VPD_HF_TEST_KILL_AT"
KILL_RANK_ENV = "VPD_HF_TEST_KILL_RANK"
KILL_POINTS = (
    "train_step",  # after an optimiser step, before any checkpoint of that step
    "checkpoint_folder_created",  # the (empty) .partial folder exists
    "checkpoint_after_model_write",  # model.safetensors written, optimizer.bin not yet
    "checkpoint_after_accelerate_state",  # accelerate's files written, training_state.json not yet
    "checkpoint_before_marker",  # training_state.json written, the completion marker not yet
    "checkpoint_before_rename",  # complete, still named .partial
    "checkpoint_before_rotation",  # renamed, older checkpoints not yet deleted
)


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the folder, the file and what to do."""


def kill_point(point: str, step: int, process_index: int = 0) -> None:
    """SIGKILLs this process at `point` when `VPD_HF_TEST_KILL_AT` asks for it (crash tests only); the process is
    process 0 unless `VPD_HF_TEST_KILL_RANK` names another one."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted or process_index != int(os.environ.get(KILL_RANK_ENV, "0")):
        return
    name, _, at = wanted.partition("@")
    if name not in KILL_POINTS:
        raise ValueError(f"{KILL_ENV}={wanted!r}: unknown point {name!r}; known: {list(KILL_POINTS)}.")
    if name == point and (not at or int(at) == step):
        logger.warning("%s=%s: killing process %d now.", KILL_ENV, wanted, os.getpid())
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


# -- atomic files ------------------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform lets a folder be opened (Windows); the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` so that `path` holds either its old content or all of the new one, never a part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, value: Any, **kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(value, **kwargs))


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER
    }


# -- finding checkpoints -----------------------------------------------------------------------------------------------


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of `folder`, or None when there is none (or it cannot be read)."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return None
    return marker


def _is_partial(folder: Path) -> bool:
    return folder.name.endswith((PARTIAL_SUFFIX, REPLACED_SUFFIX))


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """`(global_step, folder)` of every complete checkpoint under `checkpoints_dir`, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for folder in checkpoints_dir.iterdir():
        if not folder.is_dir() or _is_partial(folder):
            continue
        marker = read_marker(folder)
        if marker is not None and isinstance(marker.get("global_step"), int):
            found.append((marker["global_step"], folder))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def incomplete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Folders under `checkpoints_dir` that are not complete checkpoints (interrupted saves, foreign folders)."""
    if not checkpoints_dir.is_dir():
        return []
    complete = {folder for _, folder in complete_checkpoints(checkpoints_dir)}
    return sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and p not in complete)


def _advice(folder: Path) -> str:
    parent = folder.parent
    others = [str(p) for _, p in reversed(complete_checkpoints(parent)) if p.resolve() != folder.resolve()]
    earlier = f" (complete ones next to it: {', '.join(others[:3])})" if others else ""
    return (
        f"Resume from another checkpoint with `--resume_from_checkpoint PATH`{earlier}, or start over without "
        "`--resume_from_checkpoint`."
    )


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The folder to resume from: `latest` (the newest complete checkpoint of `output_dir`) or a folder of any name.

    Logs the choice before anything is loaded; incomplete folders are skipped with a log line."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIR
        for folder in incomplete_checkpoints(checkpoints_dir):
            logger.warning("Skipping %s: not a complete checkpoint (no valid %s).", folder, COMPLETE_MARKER)
        found = complete_checkpoints(checkpoints_dir)
        if not found:
            logger.warning("No complete checkpoint in %s to resume from; starting from scratch.", checkpoints_dir)
            return None
        step, folder = found[-1]
        logger.info("Resuming from %s (the latest complete checkpoint, step %d).", folder, step)
        return folder
    folder = Path(resume_from_checkpoint).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"`resume_from_checkpoint` {folder} does not exist or is not a folder; pass `latest` or a checkpoint "
            f"folder (one holding {COMPLETE_MARKER}, e.g. OUTPUT_DIR/{CHECKPOINTS_DIR}/checkpoint_<step>)."
        )
    logger.info("Resuming from %s.", folder)
    return folder


# -- validating and loading --------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    """The informative line of an error (for torch's weights_only errors, the unpickler's own words)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines or [type(error).__name__])[0][:200]


def _load_pickle_safely(path: Path) -> Any:
    """`torch.load` with `weights_only=True` (accelerate's allow-list for numpy RNG states); mmap'd, so validating a
    large optimizer state does not read it into memory."""
    from accelerate.utils import load

    return load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))


def validate_checkpoint(folder: Path, num_processes: int, *, allow_missing_rng_state: bool = False) -> dict[str, Any]:
    """Checks that `folder` is a complete, intact checkpoint and returns its `training_state.json`.

    Raises:
        CheckpointError: naming the folder, the file, what is wrong and what to do.
    """
    advice = _advice(folder)
    marker = read_marker(folder)
    if marker is None:
        what = "is missing" if not (folder / COMPLETE_MARKER).exists() else "cannot be read"
        raise CheckpointError(
            f"{folder} is not a complete checkpoint: {COMPLETE_MARKER} {what} (it is written last, when a save has "
            f"finished: this save was interrupted, the folder was copied incompletely, or it is not a checkpoint "
            f"of this vpd_hf version). {advice}"
        )
    for name, size in marker["files"].items():
        path = folder / name
        if not path.is_file() and _RNG_NAME.match(name):
            continue  # reported below, where the user may accept it
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing (listed in {COMPLETE_MARKER}). {advice}")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{folder}: {name} has {actual} bytes but had {size} when the checkpoint was written (truncated or "
                f"modified, e.g. an incomplete copy). {advice}"
            )
    for path in sorted(folder.glob("custom_checkpoint_*.pkl")):
        raise CheckpointError(
            f"{folder}: {path.name} is refused. vpd_hf checkpoints hold no custom pickled state (the LR scheduler is "
            f"in {TRAINING_STATE}), and accelerate would unpickle this file with weights_only=False, which can run "
            f"code from it. If the checkpoint comes from an older vpd_hf, start over; otherwise delete the file only "
            f"if you know where it came from. {advice}"
        )
    state_path = folder / TRAINING_STATE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: {TRAINING_STATE} is not valid JSON ({error}). {advice}") from error
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{folder}: {TRAINING_STATE} must hold a JSON object, got {type(state).__name__}. {advice}"
        )
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            raise CheckpointError(f"{folder}: {TRAINING_STATE} has no `{key}` (incomplete or edited). {advice}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(
                f"{folder}: {TRAINING_STATE} `{key}` must be {kind.__name__}, got {state[key]!r}. {advice}"
            )
    missing_rng = [RNG_FILE.format(i) for i in range(num_processes) if not (folder / RNG_FILE.format(i)).is_file()]
    if missing_rng:
        message = (
            f"{folder}: {', '.join(missing_rng)} missing (the random-number state of "
            f"{'that process' if len(missing_rng) == 1 else 'those processes'}; e.g. the checkpoint was written by "
            "fewer processes): the resumed run would not be the run that was interrupted (other augmentations)."
        )
        if not allow_missing_rng_state:
            raise CheckpointError(
                f"{message} Pass `--resume_without_rng_state` to resume anyway with fresh random states. {advice}"
            )
        logger.warning("%s Resuming anyway (`resume_without_rng_state`); the run is not reproducible.", message)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in _PICKLE_SUFFIXES:
            try:
                _load_pickle_safely(path)
            except Exception as error:  # any failure means "cannot be loaded safely"
                # torch words every weights_only failure alike; a disallowed global is what code execution needs.
                unsafe = _UNSAFE_GLOBAL.search(str(error))
                what = (
                    f"was refused: it would call `{unsafe.group(1)}` when unpickled, i.e. run code (only tensors and "
                    "plain containers are accepted; resuming never unpickles with weights_only=False)"
                    if unsafe
                    else f"cannot be read, it is corrupt ({type(error).__name__}: {_first_line(error)})"
                )
                raise CheckpointError(f"{folder}: {path.relative_to(folder).as_posix()} {what}. {advice}") from error
    return state


def load_checkpoint(
    accelerator: Any,
    folder: Path,
    scheduler: Any,
    *,
    allow_missing_rng_state: bool = False,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    keep: set[str] | None = None,
) -> dict[str, Any]:
    """Validates `folder` (:func:`validate_checkpoint`), then restores model, optimiser, RNG (accelerate) and the LR
    scheduler; returns the training state (`global_step`, `epoch`, `batches_in_epoch`). Under FSDP pass the prepared
    `model`, `optimizer` and the state names a checkpoint holds (`keep`): the single-process files are loaded into
    the shards (`sharding.py`)."""
    state = validate_checkpoint(folder, accelerator.num_processes, allow_missing_rng_state=allow_missing_rng_state)
    # `LambdaLR.load_state_dict` copies every key onto the scheduler: accept only the keys a scheduler has.
    unknown = sorted(set(state["scheduler"]) - set(scheduler.state_dict()))
    if unknown:
        raise CheckpointError(
            f"{folder}: {TRAINING_STATE} `scheduler` has unknown keys {unknown[:5]} (written for another scheduler, "
            f"or edited). {_advice(folder)}"
        )
    try:
        if sharding.is_fsdp(accelerator):
            missing, unexpected = sharding.load_sharded_state(accelerator, folder, model, optimizer, keep)
            if missing or unexpected:
                raise CheckpointError(_mismatch(folder, missing, unexpected))
        else:
            accelerator.load_state(str(folder))
        scheduler.load_state_dict(state["scheduler"])
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"{folder}: loading failed ({type(error).__name__}: {_first_line(error)}). {_advice(folder)}"
        ) from error
    return state


def _mismatch(folder: Path, missing: list[str], unexpected: list[str]) -> str:
    return (
        f"{folder}: {MODEL_FILE} does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}): it "
        f"was written for another model or LoRA setting. {_advice(folder)}"
    )


def register_compact_checkpoints(accelerator: Any, model: torch.nn.Module, keep: set[str]) -> None:
    """Checkpoints keep only the state names in `keep` (the trainable weights and the buffers), and resume loads them
    into the model rebuilt from its source (frozen weights come back from there)."""

    def strip(name: str) -> str:
        return name[len("module.") :] if name.startswith("module.") else name

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for index, state in enumerate(weights):
            weights[index] = {key: value for key, value in state.items() if strip(key) in keep}

    def load_hook(models: list, input_dir: str) -> None:
        path = Path(input_dir) / MODEL_FILE
        while models:
            target = accelerator.unwrap_model(models.pop())
            try:
                state = {strip(k): v for k, v in load_file(path).items()}
            except Exception as error:
                raise CheckpointError(
                    f"{input_dir}: {MODEL_FILE} cannot be read ({type(error).__name__}: {error}). "
                    f"{_advice(Path(input_dir))}"
                ) from error
            result = target.load_state_dict(state, strict=False)
            missing = [name for name in result.missing_keys if name in keep]
            if missing or result.unexpected_keys:
                raise CheckpointError(_mismatch(Path(input_dir), missing, result.unexpected_keys))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# -- saving ------------------------------------------------------------------------------------------------------------


def _remove(folder: Path, why: str) -> None:
    logger.warning("Removing %s (%s).", folder, why)
    shutil.rmtree(folder, ignore_errors=True)


def rotate_checkpoints(checkpoints_dir: Path, total_limit: int | None, newest: Path | None = None) -> None:
    """Deletes leftovers of interrupted saves and, beyond `total_limit`, the oldest complete checkpoints named
    `checkpoint_<step>` (folders of other names are the user's and are never deleted). Call it only once the newest
    checkpoint (`newest`, never deleted) is complete; checkpoints of later steps than it (left by an earlier run that
    went further before this one resumed from an older checkpoint) are kept, with a warning."""
    for folder in sorted(checkpoints_dir.iterdir()):
        if folder.is_dir() and _is_partial(folder):
            _remove(folder, "left by an interrupted checkpoint save")
    found = complete_checkpoints(checkpoints_dir)
    newest_step = next((step for step, folder in found if folder == newest), None)
    if newest_step is not None:
        later = [str(folder) for step, folder in found if step > newest_step]
        if later:
            logger.warning(
                "Checkpoints of later steps than %s exist (%s, from an earlier run): `--resume_from_checkpoint "
                "latest` would pick them; delete them if this run replaces them.", newest, ", ".join(later),
            )  # fmt: skip
        found = [(step, folder) for step, folder in found if step <= newest_step]
    if total_limit is None:
        return
    ours = [(step, folder) for step, folder in found if _OUR_NAME.match(folder.name) and folder != newest]
    keep = max(total_limit, 1) - (1 if newest_step is not None else 0)
    for _, folder in ours[: max(0, len(ours) - keep)]:
        _remove(folder, f"checkpoints_total_limit={total_limit}")


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    global_step: int,
    training_state: Mapping[str, Any],
    total_limit: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    model: torch.nn.Module | None = None,
    keep: set[str] | None = None,
) -> Path:
    """Writes a resumable checkpoint of step `global_step` to `output_dir/checkpoints/checkpoint_<step>` so that it
    appears there only once complete (see the module docstring). Every process must call it. Under FSDP pass the
    prepared `model`, `optimizer` and the state names to keep (`keep`): the shards are gathered into the files a
    single process writes (`sharding.py`)."""
    checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIR
    final = checkpoints_dir / f"checkpoint_{global_step}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    rank = accelerator.process_index
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            _remove(partial, "left by an interrupted checkpoint save")
        partial.mkdir()
    accelerator.wait_for_everyone()
    kill_point("checkpoint_folder_created", global_step, rank)
    handle = None
    if sharding.is_fsdp(accelerator):
        sharding.save_sharded_state(accelerator, partial, model, optimizer, keep,
                                    after_model_write=lambda: kill_point("checkpoint_after_model_write", global_step, rank))  # fmt: skip
    elif os.environ.get(KILL_ENV) and optimizer is not None:
        # accelerate writes the model first and asks the optimiser for its state next: this is the moment in between.
        handle = getattr(optimizer, "optimizer", optimizer).register_state_dict_pre_hook(
            lambda _: kill_point("checkpoint_after_model_write", global_step, rank)
        )
    try:
        if not sharding.is_fsdp(accelerator):
            accelerator.save_state(str(partial))
    finally:
        if handle is not None:
            handle.remove()
    kill_point("checkpoint_after_accelerate_state", global_step, rank)
    accelerator.wait_for_everyone()  # every process has written its files (its RNG state, FSDP shards)
    if accelerator.is_main_process:
        atomic_write_json(partial / TRAINING_STATE, dict(training_state))
        kill_point("checkpoint_before_marker", global_step, rank)
        _fsync_tree(partial)  # the marker must never reach the disk before the files it vouches for
        marker = {
            "format": CHECKPOINT_FORMAT,
            "global_step": global_step,
            "num_processes": accelerator.num_processes,
            "files": _file_sizes(partial),
        }
        atomic_write_json(partial / COMPLETE_MARKER, marker, indent=1)
        kill_point("checkpoint_before_rename", global_step, rank)
        if final.exists():  # e.g. resumed from an earlier checkpoint of the same run: the new one replaces it
            replaced = final.with_name(final.name + REPLACED_SUFFIX)
            shutil.rmtree(replaced, ignore_errors=True)
            logger.warning("Replacing %s with the new checkpoint of step %d.", final, global_step)
            os.rename(final, replaced)
            os.rename(partial, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(partial, final)
        _fsync_dir(checkpoints_dir)
        logger.info("Saved checkpoint %s (step %d).", final, global_step)
        kill_point("checkpoint_before_rotation", global_step, rank)
        rotate_checkpoints(checkpoints_dir, total_limit, newest=final)
    accelerator.wait_for_everyone()
    return final


__all__ = [
    "COMPLETE_MARKER",
    "KILL_ENV",
    "KILL_POINTS",
    "KILL_RANK_ENV",
    "TRAINING_STATE",
    "CheckpointError",
    "atomic_write_json",
    "atomic_write_text",
    "complete_checkpoints",
    "load_checkpoint",
    "register_compact_checkpoints",
    "resolve_checkpoint",
    "rotate_checkpoints",
    "save_checkpoint",
    "validate_checkpoint",
]
