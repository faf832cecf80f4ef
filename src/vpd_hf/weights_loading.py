"""Reading a checkpoint tensor by tensor, so that loading with a cast stays within the size of the loaded model.

transformers reads safetensors through a memory map on Linux. When `from_pretrained(dtype=...)` casts, every page of
the file is touched and stays resident (file-backed) until loading ends: loading the SD-1.5-sized model in bfloat16
from its 3.5 GB float32 checkpoint peaked at 5.6 GB, for a 1.75 GB model. Read with `pread` instead (the backend
transformers itself uses on Windows and MPS), each tensor is copied into memory, cast, and its float32 copy freed:
the peak is the cast model plus one tensor.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedConfig
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

# `from_pretrained` arguments the tensor-by-tensor path handles like transformers does; any other one (device maps,
# quantisation, variants, config overrides, ...) leaves loading to transformers.
HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "proxies",
    "_commit_hash",
)
PASSED_KWARGS = (
    "config",
    "adapter_kwargs",
    "use_safetensors",
    "dtype",
    "output_loading_info",
    "_from_pipeline",
    "_from_auto",
    "trust_remote_code",
)


def casts_on_load(pretrained_model_name_or_path: Any, model_args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether this `from_pretrained` call is a plain load with an explicit floating `dtype` (a cast to do)."""
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    return (
        pretrained_model_name_or_path is not None
        and not model_args
        and isinstance(dtype, torch.dtype)
        and dtype.is_floating_point
        and set(kwargs) <= {*HUB_KWARGS, *PASSED_KWARGS}
        and kwargs.get("use_safetensors") in (None, True)  # only safetensors are read here
        and (kwargs.get("config") is None or isinstance(kwargs["config"], PreTrainedConfig))
        # the Auto classes pass `adapter_kwargs={"revision": None}` (for PEFT adapter folders, which have no weights)
        and not any(value is not None for value in (kwargs.get("adapter_kwargs") or {}).values())
    )


def safetensors_files(pretrained_model_name_or_path: Any, hub_kwargs: dict[str, Any]) -> list[str] | None:
    """The local paths of a checkpoint's safetensors file(s) (downloaded when a Hub id), or None when it has none."""
    options = {
        **hub_kwargs,
        "_raise_exceptions_for_missing_entries": False,
        "_raise_exceptions_for_connection_errors": False,
    }
    single = cached_file(pretrained_model_name_or_path, SAFE_WEIGHTS_NAME, **options)
    if single is not None:
        return [single]
    index = cached_file(pretrained_model_name_or_path, SAFE_WEIGHTS_INDEX_NAME, **options)
    if index is None:
        return None
    with open(index, encoding="utf-8") as file:
        shards = sorted(set(json.load(file)["weight_map"].values()))
    paths = [cached_file(pretrained_model_name_or_path, shard, **options) for shard in shards]
    return None if any(path is None for path in paths) else paths


@contextlib.contextmanager
def pread_state_dict(files: list[str]) -> Iterator[dict[str, Any]]:
    """Lazy `{key: slice}` over `files`, read with `pread` when a slice is materialised; closed on exit."""
    with contextlib.ExitStack() as stack:
        state_dict: dict[str, Any] = {}
        for path in files:
            reader = stack.enter_context(safe_open(path, framework="pt", device="cpu", backend="pread"))
            state_dict.update({key: reader.get_slice(key) for key in reader.keys()})  # noqa: SIM118 (not a dict)
        yield state_dict


__all__ = ["casts_on_load", "pread_state_dict", "safetensors_files"]
