"""Registration of VPD with transformers' Auto classes and pipelines, done when it is needed rather than at import.

`import vpd_hf` used to import torch, diffusers and transformers' model machinery (5-7 s) only to call
`AutoConfig.register(...)`. The classes cannot be registered without importing them (and so torch), so the registration
now runs at the first moment it can matter:

* as soon as one of transformers' Auto modules (`transformers.models.auto.*`) or `transformers.pipelines` has been
  imported, which happens before any `AutoModel*.from_pretrained` / `pipeline(...)` call can look VPD up;
* as soon as one of vpd_hf's own class modules has been imported (so `register_for_auto_class` is in place before a
  VPD model or processor is saved);
* immediately at `import vpd_hf` when one of those is already imported.

The hook is a `sys.meta_path` finder that watches the modules of transformers, diffusers and vpd_hf and learns when
each of them has finished executing. Registration imports transformers' Auto modules, diffusers and vpd_hf's class
modules, so it must not run while any of those is half-initialised (e.g. when `modeling_auto` finishes while
`transformers.pipelines`, which imported it, is still running): it is deferred until the outermost watched import of
the thread has finished. After it ran once the finder answers every request with "not mine" at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# Modules whose completed import means VPD must be registered now.
_TRIGGER_PREFIXES = ("transformers.models.auto.", "transformers.pipelines")
_TRIGGER_MODULES = frozenset(
    {
        "transformers.pipelines",
        "vpd_hf.configuration_vpd",
        "vpd_hf.modeling_vpd",
        "vpd_hf.image_processing_vpd",
        "vpd_hf.processing_vpd",
        "vpd_hf.pipelines",
    }
)
# Top-level packages whose modules the registration imports (or which import transformers' Auto modules while they
# run): none of them may be half-initialised when it runs.
_WATCHED_PACKAGES = frozenset({"transformers", "diffusers", "vpd_hf"})

_lock = threading.RLock()
_local = threading.local()  # `depth`: watched module executions in progress in this thread
_pending = False  # a trigger was imported but the registration had to wait
_running = False
_done = False
_error: BaseException | None = None


def _is_trigger(name: str) -> bool:
    return name in _TRIGGER_MODULES or name.startswith(_TRIGGER_PREFIXES)


def _is_watched(name: str) -> bool:
    return name.partition(".")[0] in _WATCHED_PACKAGES


def _half_initialised(exclude: str | None) -> list[str]:
    """Watched modules still executing (e.g. imported before the finder was installed, or in another thread).
    `importlib` marks a module's spec `_initializing` while its code runs; the package `vpd_hf` itself is exempt: the
    registration only imports its submodules, which Python allows while the package initialises."""
    busy = []
    for name, module in list(sys.modules.items()):
        if name == exclude or name == "vpd_hf" or not _is_watched(name):
            continue
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            busy.append(name)
    return busy


def register() -> None:
    """Registers the VPD config, models, processors and pipelines with transformers (idempotent)."""
    import logging

    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForDepthEstimation,
        AutoModelForNormalEstimation,
        AutoModelForSemanticSegmentation,
        AutoProcessor,
    )
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

    from .configuration_vpd import VPDConfig
    from .image_processing_vpd import VPDImageProcessor
    from .modeling_vpd import (
        VPDModel,
        VPDModelForDensePrediction,
        VPDModelForDepthEstimation,
        VPDModelForNormalEstimation,
        VPDModelForReferringSegmentation,
        VPDModelForSegmentation,
    )
    from .pipelines import register_pipelines
    from .processing_vpd import VPDProcessor

    AutoConfig.register(VPDConfig.model_type, VPDConfig, exist_ok=True)
    AutoModel.register(VPDConfig, VPDModel, exist_ok=True)
    AutoModelForDepthEstimation.register(VPDConfig, VPDModelForDepthEstimation, exist_ok=True)
    AutoModelForSemanticSegmentation.register(VPDConfig, VPDModelForSegmentation, exist_ok=True)
    AutoModelForNormalEstimation.register(VPDConfig, VPDModelForNormalEstimation, exist_ok=True)
    AutoProcessor.register(VPDConfig, VPDProcessor, exist_ok=True)
    AutoImageProcessor.register(VPDConfig, image_processor_classes={"pil": VPDImageProcessor}, exist_ok=True)
    # VPD has no video processor. Declaring that (an empty mapping) matters: transformers' pipelines probe for one,
    # derive a remote-code reference from the image processor's `auto_map`, and without a local entry ask the user
    # whether to trust remote code that does not exist. (`AutoVideoProcessor.register` itself needs torchvision.)
    VIDEO_PROCESSOR_MAPPING.register(VPDConfig, {}, exist_ok=True)

    # Saved checkpoints also carry `auto_map` and the code, for users who load them with `trust_remote_code=True`.
    VPDConfig.register_for_auto_class()
    VPDModel.register_for_auto_class("AutoModel")
    VPDModelForDepthEstimation.register_for_auto_class("AutoModelForDepthEstimation")
    VPDModelForSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
    VPDModelForNormalEstimation.register_for_auto_class("AutoModelForNormalEstimation")
    # transformers has no Auto class for multi-task dense prediction (only its single-task classes are mapped, as for
    # Tipsv2DptForDensePrediction); remote-code users load it through AutoModel.
    VPDModelForDensePrediction.register_for_auto_class("AutoModel")
    # transformers has no Auto class for referring segmentation; remote-code users load it through AutoModel.
    VPDModelForReferringSegmentation.register_for_auto_class("AutoModel")
    VPDProcessor.register_for_auto_class()
    VPDImageProcessor.register_for_auto_class()
    register_pipelines()  # referring-image-segmentation, and mixed-size batches in depth/image-segmentation
    logging.getLogger(__name__).debug("VPD registered with transformers' Auto classes and pipelines")


def ensure_registered(exclude: str | None = None) -> bool:
    """Runs :func:`register` once, unless a watched module is half-initialised (then it stays pending and the next
    completed watched import retries). Returns whether VPD is registered. Never raises: it runs inside other
    packages' imports, which a failure here must not break; the error is kept and reported as a warning (using a VPD
    class then raises the real import error)."""
    global _pending, _running, _done, _error
    if _done:
        return _error is None
    # Non-blocking: another thread registering may be waiting for a module lock this thread holds.
    if not _lock.acquire(blocking=False):
        return False
    try:
        if _done or _running:
            return _done and _error is None
        if _half_initialised(exclude):
            _pending = True
            return False
        _running = True
        try:
            register()
        except Exception as error:  # see the docstring: never break the import that triggered this
            _error = error
            warnings.warn(f"vpd_hf could not register VPD with transformers: {error!r}", RuntimeWarning, stacklevel=2)
        _done, _pending = True, False
        return _error is None
    finally:
        _running = False
        _lock.release()


def _completed(name: str) -> None:
    """Called when the code of watched module `name` has run without error."""
    global _pending
    if _is_trigger(name):
        _pending = True
    if _pending and not _done and getattr(_local, "depth", 0) == 0:
        ensure_registered(exclude=name)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it and wraps the `exec_module` of the watched modules' loaders
    to learn when each has finished executing."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if _done or not _is_watched(fullname) or getattr(_local, "finding", False):
            return None
        _local.finding = True  # finders below may import (e.g. setuptools' editable finder): don't recurse
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            _local.finding = False
        loader = spec.loader if spec is not None else None
        # Only per-module loader instances (source, bytecode, extension files) are wrapped; a class used as loader
        # (BuiltinImporter, FrozenImporter) is shared by every module it loads.
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: ModuleType, _original: Any = original, _name: str = fullname) -> None:
            _local.depth = getattr(_local, "depth", 0) + 1
            try:
                _original(module)
            finally:
                _local.depth -= 1
            _completed(_name)

        loader.exec_module = exec_module  # an instance attribute: the loader's class (isinstance checks) is unchanged
        return spec


_watcher: _Watcher | None = None


def install() -> None:
    """Installs the watcher (once per process) and registers at once if transformers' Auto machinery or a VPD class
    module is already imported."""
    global _watcher
    if _watcher is None:
        _watcher = _Watcher()
        sys.meta_path.insert(0, _watcher)
    if any(_is_trigger(name) for name in list(sys.modules)):
        ensure_registered()


__all__ = ["ensure_registered", "install", "register"]
