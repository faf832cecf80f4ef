"""How many processes a run was launched with, and CPU-only multi-process runs (gloo).

Two accelerate pitfalls on machines without a GPU:

* `accelerate launch --cpu --num_processes 2` starts ONE process (the `--cpu` launcher ignores the count);
* `accelerate launch --multi_gpu --num_processes 2` starts two processes through torchrun, but accelerate only makes
  them one distributed run on CPU when `ACCELERATE_USE_CPU` is set (a `use_cpu: true` in a MULTI_GPU config file is
  not passed on to the processes): without it, each process trains alone on the same output folder.

:func:`use_cpu_for_distributed` makes the second case work (torchrun started several processes and there is no
accelerator device: the processes join one gloo group on CPU), which is what `configs/accelerate/cpu_ddp.yaml` relies
on; :func:`warn_if_not_distributed` reports the first case (and any other launch whose process count was lost).

FSDP on CPU (`configs/accelerate/cpu_fsdp.yaml`): with `cpu=True` accelerate makes the run `MULTI_CPU` and drops the
FSDP plugin the launcher asked for (`ACCELERATE_USE_FSDP`); :func:`enable_fsdp_on_cpu` puts it back, so `prepare`
shards the model with FSDP2 (`fully_shard` on a CPU device mesh, gloo) exactly as it does on GPUs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("vpd_hf.training")

_NUM_PROCESSES = re.compile(r"^--num[_-]processes(?:=(\d+))?$")


def _has_accelerator_device() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _world_size(environ: Mapping[str, str]) -> int:
    try:
        return int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def use_cpu_for_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the run must be told `cpu=True` to become distributed: several processes were started (torchrun's
    `WORLD_SIZE`) on a machine without an accelerator device."""
    environ = os.environ if environ is None else environ
    return _world_size(environ) > 1 and not _has_accelerator_device()


def fsdp_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the launcher asked for FSDP (`distributed_type: FSDP` in the accelerate config)."""
    environ = os.environ if environ is None else environ
    return environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def enable_fsdp_on_cpu(accelerator: Any) -> bool:
    """Makes a CPU multi-process run (:func:`use_cpu_for_distributed`) whose launcher asked for FSDP an FSDP run.

    accelerate ignores FSDP when `cpu=True` (only GPU-like distributed types become FSDP); the plugin is built from the
    same environment variables accelerate reads, and its mixed precision set as accelerate would. Returns True when it
    switched the run to FSDP."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state  # AcceleratorState: one shared dict for every instance
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def _parent_command_line() -> list[str]:
    """The launcher's command line (`accelerate launch ...` runs the script as its child); empty when unknown."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or no access
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_accelerate_launch(argv: Sequence[str]) -> bool:
    """`accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`."""
    names = [Path(part).name for part in argv[:3]]
    return (
        ("accelerate" in names and "launch" in argv)
        or "accelerate-launch" in names
        or ("accelerate.commands.launch" in argv[:3])
    )


def requested_num_processes(
    environ: Mapping[str, str] | None = None, launcher_argv: Sequence[str] | None = None
) -> tuple[int, str]:
    """The number of processes asked for, and where it was read: torchrun's `WORLD_SIZE`, or `--num_processes N`
    on the command line of an `accelerate launch` parent process. `(1, "")` when nothing asked for more."""
    environ = os.environ if environ is None else environ
    argv = _parent_command_line() if launcher_argv is None else list(launcher_argv)
    requested, source = 1, ""
    if _world_size(environ) > 1:
        requested, source = _world_size(environ), f"WORLD_SIZE={environ['WORLD_SIZE']}"
    if _is_accelerate_launch(argv):
        for index, part in enumerate(argv):
            match = _NUM_PROCESSES.match(part)
            if not match:
                continue
            value = match.group(1) or (argv[index + 1] if index + 1 < len(argv) else "")
            if value.isdigit() and int(value) > requested:
                requested, source = int(value), f"`accelerate launch {part}{'' if match.group(1) else ' ' + value}`"
            break
    return requested, source


def warn_if_not_distributed(accelerator: Any, environ: Mapping[str, str] | None = None,
                            launcher_argv: Sequence[str] | None = None) -> bool:  # fmt: skip
    """Logs a warning (and returns True) when more processes were asked for than this run has."""
    requested, source = requested_num_processes(environ, launcher_argv)
    if requested <= accelerator.num_processes:
        return False
    logger.warning(
        "%d processes were asked for (%s) but this run is not distributed: it has %d process(es) (accelerate "
        "distributed type %s). `accelerate launch --cpu` always starts one process; on CPU use "
        "`accelerate launch --config_file configs/accelerate/cpu_ddp.yaml` (or `ACCELERATE_USE_CPU=true accelerate "
        "launch --multi_gpu --num_processes N`).",
        requested, source, accelerator.num_processes, accelerator.distributed_type,
    )  # fmt: skip
    return True


__all__ = [
    "enable_fsdp_on_cpu",
    "fsdp_requested",
    "requested_num_processes",
    "use_cpu_for_distributed",
    "warn_if_not_distributed",
]
