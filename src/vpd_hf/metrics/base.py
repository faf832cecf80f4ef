"""What the offline metrics share: reading predictions/references, and an `evaluate.Metric` that keeps statistics."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

import numpy as np
import torch


def _import_evaluate_library() -> ModuleType:
    """The `evaluate` library, also when a single-file module named `evaluate.py` comes first on `sys.path` — as
    `scripts/evaluate.py` does for every script run from that folder (Python puts the script's folder first)."""
    loaded = sys.modules.get("evaluate")
    if loaded is not None and hasattr(loaded, "Metric"):
        return loaded
    search = list(sys.path)
    while True:
        spec = importlib.machinery.PathFinder.find_spec("evaluate", search)
        if spec is None:
            raise ImportError("The `evaluate` library is required by vpd_hf.metrics: `pip install evaluate`.")
        if spec.submodule_search_locations:  # a package: the library
            break
        shadow = os.path.dirname(os.path.abspath(spec.origin))
        search = [entry for entry in search if os.path.abspath(entry or os.curdir) != shadow]
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate"] = module
    spec.loader.exec_module(module)
    return module


evaluate = _import_evaluate_library()


def as_map_list(values: Any, name: str) -> list[Any]:
    """A `(H, W)` map, a `(N, H, W)` batch (array or tensor) or a sequence of maps, as a list of maps."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim == 2:
            return [values]
        if values.ndim == 3:
            return list(values)
        raise ValueError(
            f"`{name}` must be a (H, W) map, a (N, H, W) batch or a list of maps, got shape {values.shape}."
        )
    if values is None:
        raise ValueError(f"`{name}` is required.")
    return list(values)


def paired_maps(predictions: Any, references: Any) -> list[tuple[Any, Any]]:
    preds, refs = as_map_list(predictions, "predictions"), as_map_list(references, "references")
    if len(preds) != len(refs):
        raise ValueError(f"Got {len(preds)} predictions for {len(refs)} references.")
    return list(zip(preds, refs, strict=True))


class StatisticsMetric(evaluate.Metric):
    r"""
    An `evaluate.Metric` that reduces each (prediction, reference) pair to a few numbers when it is added, so that
    evaluate's cache (and its multi-process gathering through `num_process` / `process_id`) holds those statistics
    instead of the maps. Subclasses define `_info` (the statistic columns), `_statistics` and `_compute`.
    """

    def _statistics(self, pairs: list[tuple[Any, Any]]) -> dict[str, list]:
        """Columns of statistics (one row per pair) matching the features of `_info`."""
        raise NotImplementedError

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Adds a batch of predictions and their references (each pair is reduced to its statistics at once)."""
        if kwargs:
            raise ValueError(f"Unexpected inputs {sorted(kwargs)}; pass `predictions` and `references`.")
        super().add_batch(**self._statistics(paired_maps(predictions, references)))

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """Adds one prediction and its reference."""
        self.add_batch(predictions=[prediction], references=[reference], **kwargs)

    def compute(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> dict[str, Any] | None:
        """The metrics of everything added (and of `predictions` / `references` if given)."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        return super().compute(**kwargs)


__all__ = ["StatisticsMetric", "as_map_list", "evaluate", "paired_maps"]
