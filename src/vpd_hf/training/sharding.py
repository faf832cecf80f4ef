"""FSDP2 runs that save and resume like single-process runs.

accelerate's FSDP checkpoints (`pytorch_model_fsdp.bin`, or torch DCP folders whose metadata is pickled) only resume
under FSDP. Here a sharded run writes the files a single-process run writes, gathered from every shard:

* `model.safetensors`: the trainable weights and the buffers (LoRA: adapters + heads), full tensors, written by the
  main process (`torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True)`);
* `optimizer.bin`: the optimiser state in `torch.optim.Optimizer.state_dict()` layout (parameters numbered in
  parameter-group order), full tensors, written by the main process, read back with `weights_only=True`;
* `random_states_<rank>.pkl`: accelerate's RNG state of every process.

So a checkpoint saved by N FSDP processes resumes with 1 process or with N (tested), or under DDP (the same layout); the
completion marker, validation and kill tests of `checkpointing.py` apply unchanged. The gathered state passes through
the main process's memory once per checkpoint: fine for the ~1 B-parameter UNets here (SD 1.5/2.x, SDXL's 2.6 B with
a LoRA checkpoint), not a design for 100 B-parameter models.

The final model is saved from an unsharded copy (:func:`unsharded_copy`) built on the main process from the gathered
state: `save_pretrained`, LoRA saving and merging then run exactly as in a single-process run (saving the FSDP2 module
itself would record torch's dynamic `FSDP<Model>` class in `config.json`'s `auto_map`, and its LoRA weights are
shards).
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def end_run(accelerator: Any) -> None:
    """Ends a run (accelerate's `end_training`: trackers, then the process group) once its modules are released.

    FSDP2's modules hold the process group inside reference cycles. Left to the interpreter's exit, they are collected
    after the group was destroyed and while the interpreter is being torn down, and gloo then aborts the process
    (`terminate called without an active exception`, seen after 3 of 5 SD-size LoRA runs). Callers drop their own
    references first; this drops the accelerator's and collects the cycles while the interpreter is whole."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def broadcast_from_main(model: torch.nn.Module, device: torch.device | str = "cpu") -> int:
    """Copies every parameter and buffer of the main process's `model` to the other processes; returns the number of
    tensors sent. Call it before FSDP2 sharding: `fully_shard` keeps each process's own slice of its own weights (no
    `sync_module_states` as in DDP or FSDP1), so randomly initialised layers (heads, TextAdapter) built with different
    random states on different processes would be mixed shard by shard. Tensors pass through `device` (NCCL cannot
    send CPU tensors)."""
    import torch.distributed as dist

    count = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            staged = tensor.data.to(device)
            dist.broadcast(staged, src=0)
            if staged.data_ptr() != tensor.data.data_ptr():
                tensor.data.copy_(staged)
            count += 1
    return count


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_parameter_names(model: torch.nn.Module, optimizer: Any) -> list[str]:
    """The names of the optimiser's parameters in parameter-group order: index `i` of a plain `state_dict()`."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    ordered = []
    for group in _inner_optimizer(optimizer).param_groups:
        for parameter in group["params"]:
            if id(parameter) not in names:
                raise ValueError("An optimiser parameter is not a parameter of the model (prepared separately?).")
            ordered.append(names[id(parameter)])
    return ordered


def named_to_indexed(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A name-keyed optimiser state (`get_optimizer_state_dict`) in `Optimizer.state_dict()` layout."""
    index = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def indexed_to_named(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`named_to_indexed` (for `set_optimizer_state_dict`)."""
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[int(i)]: value for i, value in state["state"].items()}, "param_groups": groups}


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def save_sharded_state(
    accelerator: Any,
    folder: Path,
    model: torch.nn.Module,
    optimizer: Any,
    keep: set[str],
    after_model_write: Callable[[], None] | None = None,
) -> None:
    """Writes the state of an FSDP run into `folder` in the single-process layout (module docstring). Every process
    must call it (the gathers are collectives); only the main process writes the model and optimiser files."""
    from accelerate.checkpointing import save_accelerator_state
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model, options=_options(cpu_offload=True))  # full on rank 0, {} elsewhere
    if accelerator.is_main_process:
        compact = {name: value.contiguous() for name, value in model_state.items() if name in keep}
        save_file(compact, folder / MODEL_FILE, metadata={"format": "pt"})
    del model_state
    if after_model_write is not None:
        after_model_write()
    optimizer_state = get_optimizer_state_dict(model, _inner_optimizer(optimizer), options=_options(cpu_offload=True))
    if accelerator.is_main_process:
        torch.save(
            named_to_indexed(optimizer_state, optimizer_parameter_names(model, optimizer)), folder / OPTIMIZER_FILE
        )
    del optimizer_state
    # accelerate's RNG files (and sampler states, none here), as `save_state` writes them.
    save_accelerator_state(str(folder), [], [], [], accelerator._dataloaders, accelerator.process_index,
                           accelerator.step, accelerator.scaler)  # fmt: skip


def load_sharded_state(
    accelerator: Any, folder: Path, model: torch.nn.Module, optimizer: Any, keep: set[str]
) -> tuple[list[str], list[str]]:
    """Loads a checkpoint in the single-process layout (written by any number of processes) into an FSDP model and
    its optimiser; every process reads the files and keeps its shard. Returns `(missing, unexpected)` model keys
    (missing: of `keep` only)."""
    from accelerate.checkpointing import load_accelerator_state
    from accelerate.utils import load
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = {name[len("module.") :] if name.startswith("module.") else name: value
             for name, value in load_file(folder / MODEL_FILE).items()}  # fmt: skip
    own = {name for name, _ in model.named_parameters()} | set(model.state_dict())
    unexpected = sorted(set(state) - own)
    missing = sorted(keep - set(state))
    if missing or unexpected:
        return missing, unexpected
    set_model_state_dict(model, state, options=_options(strict=False))
    indexed = load(folder / OPTIMIZER_FILE, map_location="cpu")
    named = indexed_to_named(indexed, optimizer_parameter_names(model, optimizer))
    set_optimizer_state_dict(model, _inner_optimizer(optimizer), named, options=_options())
    override = load_accelerator_state(str(folder), [], [], [], accelerator._dataloaders, accelerator.process_index,
                                      accelerator.scaler)  # fmt: skip
    if "step" in override:
        accelerator.step = override["step"]
    return [], []


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (FSDP2 swaps a sharded module's class for a dynamic `FSDP<Class>` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) copy of the FSDP2 `model` holding the gathered full `state_dict` (main process only).

    Built on the meta device (no second initialisation), with the UNet LoRA adapter when the model has one; the
    weights are the tensors of `state_dict` (no copy), non-persistent buffers (never sharded) come from `model`."""
    from .lora import has_unet_lora

    base = unsharded_class(model)
    with torch.device("meta"):
        plain = base(copy.deepcopy(model.config))
        if has_unet_lora(model):
            plain.vpd.unet.add_adapter(copy.deepcopy(model.vpd.unet.peft_config["default"]))
    plain.load_state_dict(state_dict, strict=True, assign=True)
    sources = dict(model.named_buffers())
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            module = plain.get_submodule(owner) if owner else plain
            module._buffers[leaf] = sources[name].detach().clone()
    for name, parameter in plain.named_parameters():
        if parameter.is_meta:
            raise RuntimeError(f"{name} was not in the gathered state dict of the sharded model.")
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for name, parameter in plain.named_parameters():
        parameter.requires_grad_(name in trainable)
    return plain.train(model.training)


__all__ = [
    "broadcast_from_main",
    "end_run",
    "indexed_to_named",
    "is_fsdp",
    "load_sharded_state",
    "named_to_indexed",
    "optimizer_parameter_names",
    "save_sharded_state",
    "unsharded_class",
    "unsharded_copy",
]
