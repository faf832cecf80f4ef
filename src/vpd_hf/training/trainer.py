"""The accelerate training loop behind `scripts/train.py` (one process per device; `accelerate launch` for many)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..hub import model_card_from_run, push_to_hub, save_model_card
from . import checkpointing
from .checkpointing import TRAINING_STATE, atomic_write_json, kill_point, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import build_datasets, build_model_and_processor, load_raw_splits
from .evaluation import EvaluationOptions, evaluate
from .launch import enable_fsdp_on_cpu, use_cpu_for_distributed, warn_if_not_distributed
from .lora import add_unet_lora, cast_frozen_weights, merge_unet_lora, save_unet_lora
from .optimization import build_optimizer, build_scheduler, describe_groups
from .sharding import broadcast_from_main, end_run, unsharded_copy

logger = logging.getLogger("vpd_hf.training")

TRAINING_LOG = "training_log.jsonl"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops instead of training through it."""


def compact_state_names(model: torch.nn.Module) -> set[str]:
    """What a training checkpoint needs: the trainable parameters and the buffers (BatchNorm statistics, prompts).
    Frozen weights (VAE, a frozen text encoder, a LoRA-frozen UNet) come back from the model source on resume."""
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    persistent = set(model.state_dict())
    return names | {name for name, _ in model.named_buffers() if name in persistent}


def register_compact_checkpoints(accelerator: Any, model: torch.nn.Module) -> None:
    """Checkpoints keep only :func:`compact_state_names` (LoRA checkpoints: adapter + heads), and resume loads them
    into the model rebuilt from its source."""
    checkpointing.register_compact_checkpoints(accelerator, model, compact_state_names(accelerator.unwrap_model(model)))


def resolve_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint `config.resume_from_checkpoint` names (`latest`: the newest complete one), or None."""
    return checkpointing.resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)


def _truncate_training_log(log_path: Path, global_step: int) -> None:
    """On resume, drops the log lines of steps after the checkpoint (they are run again) and a line cut by a kill."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= global_step:
            kept.append(line)
    checkpointing.atomic_write_text(log_path, "".join(f"{line}\n" for line in kept))


def _batches_to_skip(state: dict[str, Any], num_processes: int, batch_size: int, checkpoint: Path) -> int:
    """The batches of the resumed epoch each process skips: the checkpoint's count per process, converted when the
    run resumes with another number of processes or per-process batch size (the same examples are skipped; the
    sampler's order does not depend on the process count). Checkpoints of older versions hold no process count."""
    saved_processes = state.get("num_processes", num_processes)
    saved_batch = state.get("per_device_train_batch_size", batch_size)
    examples = state["batches_in_epoch"] * saved_processes * saved_batch
    if examples % (num_processes * batch_size):
        raise ValueError(
            f"{checkpoint} was written {state['batches_in_epoch']} batches into its epoch by {saved_processes} "
            f"process(es) with `per_device_train_batch_size` {saved_batch} ({examples} examples): resume with a "
            f"process count x batch size ({num_processes} x {batch_size} now) that divides {examples}."
        )
    return examples // (num_processes * batch_size)


def _model_inputs(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    accepted = set(inspect.signature(model.forward).parameters)
    return {key: value for key, value in batch.items() if key in accepted and isinstance(value, torch.Tensor)}


def _epoch_setter(dataset: Any):
    setter = getattr(dataset, "set_epoch", None)
    if setter is None:
        from .. import data

        setter = getattr(data, "set_epoch", None)
        return None if setter is None else (lambda epoch: setter(dataset, epoch))
    return setter


def train(config: TrainConfig) -> dict[str, Any]:
    r"""
    Fine-tunes the VPD model of `config.task` and saves it (with its processor) into `config.output_dir`.

    Returns:
        `{"metrics": final evaluation metrics, "global_step": int, "output_dir": str, "history": [(step, loss), ...]}`.
    """
    result, accelerator = _train(config)
    end_run(accelerator)  # after `_train` returned: its model, optimizer and batches are unreferenced by then
    return result


def _train(config: TrainConfig) -> tuple[dict[str, Any], Any]:
    """`train`'s run; returns its result and the accelerator, whose run `train` ends."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed

    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        # Checkpoint naming and rotation are ours (checkpointing.py): accelerate's rotation deletes the oldest
        # checkpoint before the new one is written and counts interrupted ones.
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Several processes started by torchrun on a machine without GPU: one gloo group on CPU (otherwise each
        # process would train alone into the same folder).
        cpu=use_cpu_for_distributed(),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    enable_fsdp_on_cpu(accelerator)  # `cpu_fsdp.yaml`: accelerate drops FSDP on CPU, this puts it back
    warn_if_not_distributed(accelerator)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and config.lora_frozen_dtype:
        raise ValueError(
            "`lora_frozen_dtype` is not supported under FSDP (FSDP2 gathers a block's parameters in one dtype); its "
            "mixed precision (`mixed_precision=bf16`) already computes the frozen base in bf16."
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)

    train_raw, eval_raw, id2label = load_raw_splits(config)
    model, processor = build_model_and_processor(config, id2label, accelerator)
    if config.lora_rank:
        add_unet_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
        if config.lora_frozen_dtype:
            if accelerator.mixed_precision != config.lora_frozen_dtype:
                raise ValueError(
                    f"`lora_frozen_dtype={config.lora_frozen_dtype}` needs `mixed_precision={config.lora_frozen_dtype}` "
                    f"(autocast), got {accelerator.mixed_precision!r}."
                )
            cast_frozen_weights(model, torch.bfloat16 if config.lora_frozen_dtype == "bf16" else torch.float16)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    train_dataset, eval_dataset = build_datasets(config, train_raw, eval_raw, model, processor)
    from ..data import collate_fn

    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_dataset,
        batch_size=config.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=config.num_workers,
        generator=generator,
    )
    # Segmentation is evaluated one image at a time, as the official test: predictions go back to each image's size.
    eval_batch = 1 if config.task == "segmentation" else config.per_device_eval_batch_size
    eval_loader = DataLoader(eval_dataset, batch_size=eval_batch, collate_fn=collate_fn, num_workers=config.num_workers)

    optimizer = build_optimizer(
        model,
        config.task,
        config.learning_rate,
        config.weight_decay,
        config.unet_lr_mult,
        betas=tuple(config.adam_betas),
        fused=True if accelerator.device.type == "cuda" else None,
    )
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # BatchNorm statistics over the global batch, under DDP and FSDP alike (SyncBatchNorm is CUDA-only: on CPU
        # each process normalises its own micro-batch, as one process does with gradient accumulation).
        model.convert_sync_batchnorm()
    if fsdp and accelerator.num_processes > 1:
        broadcast_from_main(model, accelerator.device)  # one model on every process before each keeps its shard
    keep = compact_state_names(model)  # what checkpoints hold (the names survive FSDP2's sharding)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    if len(train_loader) == 0:  # batches are kept full (drop_last): an epoch would have no step and never end
        raise ValueError(
            f"The training split has {len(train_dataset)} examples, fewer than one batch of "
            f"`per_device_train_batch_size` {config.per_device_train_batch_size} x {accelerator.num_processes} "
            "process(es); lower the batch size or use more data."
        )
    steps_per_epoch = max(1, math.ceil(len(train_loader) / config.gradient_accumulation_steps))
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch
    scheduler = build_scheduler(
        optimizer,
        config.lr_schedule,
        total_steps,
        warmup_steps=config.warmup_steps,
        warmup_ratio=config.warmup_ratio,
        power=config.lr_power,
        min_lr_ratio=config.min_lr_ratio,
    )
    # Stepped once per optimiser update by this loop (accelerate's prepared scheduler would step once per process).
    # Its state is saved in training_state.json, not with `register_for_checkpointing`: accelerate unpickles those
    # objects with weights_only=False, i.e. a checkpoint could run code on resume.
    if not fsdp:  # under FSDP, sharding.py gathers the same files from the shards
        register_compact_checkpoints(accelerator, model)
    options = EvaluationOptions.from_config(config)

    global_step, start_epoch, skip_batches = 0, 0, 0
    checkpoint = resolve_checkpoint(config)  # logs the folder it chose before anything is loaded
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, scheduler, allow_missing_rng_state=config.resume_without_rng_state,
                                model=model, optimizer=optimizer, keep=keep)  # fmt: skip
        global_step, start_epoch = state["global_step"], state["epoch"]
        skip_batches = _batches_to_skip(
            state, accelerator.num_processes, config.per_device_train_batch_size, checkpoint
        )
        logger.info(
            "Resumed from %s at step %d (epoch %d, batch %d).", checkpoint, global_step, start_epoch, skip_batches
        )

    if config.report_to != "none":
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.to_dict().items()
        }
        accelerator.init_trackers("vpd_hf", config=flat)
    if accelerator.is_main_process:
        logger.info(
            "Training %s for %d steps (%d per epoch) on %d process(es); parameter groups: %s",
            config.task, total_steps, steps_per_epoch, accelerator.num_processes,
            describe_groups(optimizer.optimizer.param_groups if hasattr(optimizer, "optimizer") else optimizer.param_groups),
        )  # fmt: skip

    history: list[tuple[int, float]] = []
    log_path = output_dir / TRAINING_LOG
    if accelerator.is_main_process and checkpoint is None and log_path.exists():
        log_path.unlink()
    elif accelerator.is_main_process and checkpoint is not None:
        _truncate_training_log(log_path, global_step)
    progress = tqdm(
        total=total_steps, initial=global_step, desc="Training", disable=not accelerator.is_local_main_process
    )
    running, running_count, grad_norm = 0.0, 0, math.nan
    epoch, start_step, stopping = start_epoch, global_step, False
    started = time.perf_counter()
    while global_step < total_steps:
        model.train()
        train_loader.set_epoch(epoch)
        setter = _epoch_setter(train_dataset)
        if setter is not None:
            setter(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        batches_in_epoch = skip_batches
        skip_batches = 0
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**_model_inputs(accelerator.unwrap_model(model), batch)).loss
                finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1))
                if bool((finite < 1).any()):
                    raise NonFiniteLossError(
                        f"Non-finite loss at optimiser step {global_step + 1} (epoch {epoch}, batch {batches_in_epoch}); "
                        "lower the learning rate, check the data, or use bf16 instead of fp16."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # The norm of the averaged gradient is logged: a run whose gradients were summed over processes
                    # instead of averaged shows it (AdamW alone would hide it). Clipped only with `max_grad_norm`.
                    if config.max_grad_norm:
                        norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    else:
                        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            running += float(accelerator.gather(loss.detach().reshape(1)).mean())
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            global_step += 1
            progress.update(1)
            if global_step % config.logging_steps == 0 or global_step == total_steps:
                mean_loss = running / running_count
                running, running_count = 0.0, 0
                history.append((global_step, mean_loss))
                lr = scheduler.get_last_lr()
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{max(lr):.2e}")
                accelerator.log({"train/loss": mean_loss, "train/lr": max(lr)}, step=global_step)
                if accelerator.is_main_process:
                    with log_path.open("a") as handle:
                        entry = {"step": global_step, "loss": mean_loss, "lr": max(lr), "grad_norm": grad_norm}
                        handle.write(json.dumps(entry) + "\n")
            kill_point("train_step", global_step, accelerator.process_index)
            stopping = config.stop_after_steps is not None and global_step - start_step >= config.stop_after_steps
            if stopping or (config.checkpointing_steps and global_step % config.checkpointing_steps == 0):
                state = {"global_step": global_step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                         "scheduler": scheduler.state_dict(), "num_processes": accelerator.num_processes,
                         "per_device_train_batch_size": config.per_device_train_batch_size}  # fmt: skip
                save_checkpoint(accelerator, output_dir, global_step, state, config.checkpoints_total_limit, optimizer,
                                model=model, keep=keep)  # fmt: skip
            if config.eval_steps and global_step % config.eval_steps == 0 and global_step < total_steps:
                metrics = evaluate(model, eval_loader, config.task, options, accelerator)
                accelerator.log(
                    {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=global_step
                )
                logger.info("step %d: %s", global_step, _summary(metrics))
            if global_step >= total_steps or stopping:
                break
        if stopping:
            break
        epoch += 1
    progress.close()
    if stopping and global_step < total_steps:
        logger.info("Stopped after %d steps (step %d of %d); resume with --resume_from_checkpoint latest.",
                    global_step - start_step, global_step, total_steps)  # fmt: skip
        stopped = {"metrics": None, "global_step": global_step, "output_dir": str(output_dir), "history": history}
        return stopped, accelerator
    elapsed = time.perf_counter() - started

    metrics = evaluate(model, eval_loader, config.task, options, accelerator)
    accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=global_step)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model) if fsdp else None  # a collective: every rank gathers
    if accelerator.is_main_process:
        if fsdp:  # the saving below (LoRA adapter, merge, save_pretrained) runs on an unsharded copy
            unwrapped = unsharded_copy(unwrapped, state_dict)
        if config.lora_rank:
            save_unet_lora(unwrapped, output_dir / "lora")
            if config.merge_lora:
                merge_unet_lora(unwrapped)
            else:  # the saved model is the base UNet + trained heads; `load_unet_lora` adds the adapter back
                unwrapped.vpd.unet.unload_lora()
            unwrapped.float()  # frozen weights kept in bf16/fp16 during training are saved in float32
        unwrapped.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        summary = {"metrics": metrics, "global_step": global_step, "train_seconds": elapsed,
                   "num_processes": accelerator.num_processes, "protocol": dataclasses.asdict(options),
                   "config": config.to_dict()}  # fmt: skip
        atomic_write_json(output_dir / "all_results.json", summary, indent=2, default=str)
        save_model_card(model_card_from_run(output_dir, repo_id=config.hub_model_id), output_dir)
        logger.info("Final metrics: %s; model saved to %s", _summary(metrics), output_dir)
    if config.push_to_hub and accelerator.is_main_process:
        _push(config, output_dir)
    result = {"metrics": metrics, "global_step": global_step, "output_dir": str(output_dir), "history": history}
    return result, accelerator


def _summary(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _push(config: TrainConfig, output_dir: Path) -> None:
    push_to_hub(output_dir, config.hub_model_id, commit_message="Upload VPD model trained with vpd_hf")


__all__ = [
    "TRAINING_STATE",
    "NonFiniteLossError",
    "compact_state_names",
    "register_compact_checkpoints",
    "resolve_checkpoint",
    "train",
]
