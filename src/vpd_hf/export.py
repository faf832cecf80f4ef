"""Deployment: export a VPD model to ONNX and run the exported graph on ONNX Runtime or OpenVINO.

:func:`export_model` (behind `vpd-hf export`) writes to a folder:

* `model.onnx` (+ `model.onnx.data`, ONNX external data, when the weights exceed 2 GB): the model's single pass, traced
  by torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`) with a dynamic batch, height and width (height and
  width multiples of `config.pad_multiple`, 64). The cross-attention maps VPD concatenates to the UNet features are
  computed inside the graph (the capture processors are traced like any module).
* `config.json` (the model's `VPDConfig`: labels, test procedure), the processor's files (`preprocessor_config.json`,
  and the tokenizer for referring segmentation): resizing, normalisation and padding to a multiple of 64 stay in the
  processor, outside the graph.
* `export_info.json`: source model, task, opset, dtype, the graph's input/output names and shapes, export time, file
  sizes and package versions.

What each task's graph computes (see `EXPORTS`, one entry per task class):

* depth: `pixel_values (B, 3, H, W)` -> `predicted_depth (B, H, W)` (the model's forward with the mean scene prompt);
* segmentation: `pixel_values (B, 3, H, W)` -> `logits (B, num_labels, H/8, W/8)`, one whole-image pass. The configured
  test procedure (sliding windows, scales, flips) runs in Python around the graph, with the same code as the model
  (`vpd_hf.inference.masked_test_time_logits`); windows that are not multiples of 64 are zero-padded before the graph,
  as the model pads them internally.
* referring: `pixel_values (N, 3, H, W)` and `input_ids (N, token_length)` -> `logits (N, 2, H/8, W/8)`, one image
  per expression (the CLIP text encoder is in the graph). Several expressions about one image each encode the image
  (the PyTorch model encodes it once and shares the latents).

:class:`ExportedVPDModel` loads such a folder on a runtime and is called like the PyTorch model (`model(**batch)`
with the processor's output, returning the same output dataclass), so that `vpd_hf.prediction.Predictor` (`vpd-hf
predict --runtime onnxruntime|openvino`) shares the processor and post-processing with the PyTorch path. Images of
different own padded sizes in one batch run group by group, as the model does (`vpd_hf.batching`).

Adding a task class is one `EXPORTS` entry: the module to trace, its input/output names, and how the runtime's
outputs become the model's output dataclass.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batching import crop, merge, size_groups
from .configuration_vpd import VPDConfig
from .inference import is_single_pass, masked_test_time_logits, semantic_inference_options

ONNX_FILE = "model.onnx"
OPENVINO_FILE = "openvino_model.xml"
EXPORT_INFO_FILE = "export_info.json"
RUNTIMES = ("onnxruntime", "openvino")
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OPSET = 18
# ONNX protobuf files cannot exceed 2 GB: larger weights go to an external-data file beside the graph.
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# The example batch traced by the exporter: two images (a batch of 1 would be specialised to 1), of two different
# multiples of 64 (equal example sizes would be unified into one symbol).
EXAMPLE_BATCH, EXAMPLE_SIZE = 2, (128, 192)
VERSIONED_PACKAGES = ("torch", "transformers", "diffusers", "onnx", "onnxscript", "onnxruntime", "openvino", "vpd-hf")


# ---------------------------------------------------------------------------------------------------------------------
# What is traced, per task
# ---------------------------------------------------------------------------------------------------------------------


class _DepthGraph(nn.Module):
    """`pixel_values (B, 3, H, W)` -> `predicted_depth (B, H, W)` float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).predicted_depth.float()


class _SegmentationGraph(nn.Module):
    """`pixel_values (B, 3, H, W)` -> one whole-image pass's `logits (B, num_labels, H/8, W/8)` float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model._single_pass(pixel_values)[0].float()


class _ReferringGraph(nn.Module):
    """`pixel_values (N, 3, H, W)`, `input_ids (N, T)` -> `logits (N, 2, H/8, W/8)` float32, image `i` for text `i`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, input_ids=input_ids).logits.float()


class _NormalsGraph(nn.Module):
    """`pixel_values (B, 3, H, W)` -> `predicted_normals (B, 3, H, W)` float32 (unit vectors, camera frame)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).predicted_normals.float()


def _full_resolution(model: ExportedVPDModel, name: str, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None):
    """Output `name` of the graph at the input resolution for a batch: images of different own padded sizes run as
    their groups (`vpd_hf.batching`)."""

    def run(images: torch.Tensor) -> torch.Tensor:
        return model.run(pixel_values=images)[name]

    groups = size_groups(pixel_mask, model.config.pad_multiple)
    if groups is None:
        return run(pixel_values)
    parts = [run(crop(pixel_values, group)) for group in groups]
    rows = [group.indices for group in groups]
    return merge(parts, rows, pixel_values.shape[0], size=tuple(pixel_values.shape[-2:]))


def _depth_outputs(model: ExportedVPDModel, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
    """`VPDModelForDepthEstimation.forward` (eval, no labels) on the graph."""
    from .modeling_vpd import VPDDepthEstimatorOutput

    predicted = _full_resolution(model, "predicted_depth", pixel_values, pixel_mask)
    return VPDDepthEstimatorOutput(predicted_depth=predicted, pixel_mask=pixel_mask)


def _normals_outputs(model: ExportedVPDModel, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
    """`VPDModelForNormalEstimation.forward` (eval, no labels) on the graph."""
    from .modeling_vpd import VPDNormalEstimatorOutput

    predicted = _full_resolution(model, "predicted_normals", pixel_values, pixel_mask)
    return VPDNormalEstimatorOutput(predicted_normals=predicted, pixel_mask=pixel_mask)


def _segmentation_outputs(model: ExportedVPDModel, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
    """Eval-mode `VPDModelForSegmentation.forward` on the graph: the configured test procedure at the input
    resolution, or the 1/8 logits of one pass (group by group) when the procedure is one whole pass."""
    from .modeling_vpd import VPDSemanticSegmenterOutput

    options = semantic_inference_options(model.config)
    if not is_single_pass(options):
        logits = masked_test_time_logits(model.dense_logits, pixel_values, pixel_mask, **options)
        return VPDSemanticSegmenterOutput(logits=logits, pixel_mask=pixel_mask)
    groups = size_groups(pixel_mask, model.config.pad_multiple)
    if groups is None:
        logits = model.single_pass_logits(pixel_values)
    else:
        height, width = pixel_values.shape[-2:]
        parts = [model.single_pass_logits(crop(pixel_values, group)) for group in groups]
        rows = [group.indices for group in groups]
        logits = merge(parts, rows, pixel_values.shape[0], size=(math.ceil(height / 8), math.ceil(width / 8)))
    return VPDSemanticSegmenterOutput(logits=logits, pixel_mask=pixel_mask)


def _referring_outputs(
    model: ExportedVPDModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    image_indices: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,  # not used, as by the model (padding tokens are not masked)
):
    """`VPDModelForReferringSegmentation.forward` on the graph: each expression with its image."""
    from .modeling_vpd import VPDModelForReferringSegmentation, VPDReferringSegmentationOutput

    if input_ids is None:
        raise ValueError("`input_ids` (the tokenized referring expressions) are required.")
    indices = VPDModelForReferringSegmentation._resolve_image_indices(
        image_indices, input_ids.shape[0], pixel_values.shape[0], pixel_values.device
    )
    images = pixel_values[indices]
    masks = None if pixel_mask is None else pixel_mask[indices]
    groups = size_groups(masks, model.config.pad_multiple)
    if groups is None:
        logits = model.run(pixel_values=images, input_ids=input_ids)["logits"]
    else:
        height, width = pixel_values.shape[-2:]
        parts = [model.run(pixel_values=crop(images, g), input_ids=input_ids[g.indices])["logits"] for g in groups]
        rows = [group.indices for group in groups]
        logits = merge(parts, rows, input_ids.shape[0], size=(math.ceil(height / 8), math.ceil(width / 8)))
    return VPDReferringSegmentationOutput(logits=logits, pixel_mask=masks)


@dataclass(frozen=True)
class ExportSpec:
    """How one task is exported and run: `model_class` (name in `modeling_vpd`), the `graph` module traced around it,
    its `inputs` / `outputs` names (graph order), `outputs_fn(exported_model, **batch)` -> the model's output
    dataclass from the processor's batch, and a `description` of what the graph computes (in export_info.json)."""

    model_class: str
    graph: type[nn.Module]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    outputs_fn: Callable[..., Any]
    description: str


# One entry per exportable task class (the task names of `modeling_vpd.TASK_MODEL_CLASSES`).
EXPORTS: dict[str, ExportSpec] = {
    "depth": ExportSpec(
        "VPDModelForDepthEstimation",
        _DepthGraph,
        ("pixel_values",),
        ("predicted_depth",),
        _depth_outputs,
        "the model's forward with the mean scene prompt: depth (B, H, W) in metres",
    ),
    "segmentation": ExportSpec(
        "VPDModelForSegmentation",
        _SegmentationGraph,
        ("pixel_values",),
        ("logits",),
        _segmentation_outputs,
        "one whole-image pass: logits (B, num_labels, H/8, W/8); the test procedure runs around the graph",
    ),
    "normals": ExportSpec(
        "VPDModelForNormalEstimation",
        _NormalsGraph,
        ("pixel_values",),
        ("predicted_normals",),
        _normals_outputs,
        "the model's forward: unit surface normals (B, 3, H, W) in the camera frame (Marigold's convention)",
    ),
    "referring": ExportSpec(
        "VPDModelForReferringSegmentation",
        _ReferringGraph,
        ("pixel_values", "input_ids"),
        ("logits",),
        _referring_outputs,
        "one image per expression: logits (N, 2, H/8, W/8)",
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


def _task_of(model: nn.Module) -> str:
    from . import modeling_vpd

    for task, spec in EXPORTS.items():
        if isinstance(model, getattr(modeling_vpd, spec.model_class)):
            return task
    raise TypeError(f"`model`: {type(model).__name__} has no ONNX export; exportable: {list(EXPORTS)}.")


def _task_of_folder(model: str | Path) -> str:
    """The task of a saved checkpoint, from the architectures its config.json records."""
    from .prediction import TASK_ARCHITECTURES

    path = Path(model) / "config.json"
    if not path.is_file():
        raise ValueError(f"`model` {str(model)!r} has no config.json: give `task`, or a folder save_pretrained wrote.")
    architectures = json.loads(path.read_text()).get("architectures") or []
    tasks = [TASK_ARCHITECTURES[a] for a in architectures if a in TASK_ARCHITECTURES]
    if not tasks:
        raise ValueError(f"`model` {str(model)!r} records no VPD task head ({architectures}): give `task`.")
    return tasks[0]


def _example_inputs(task: str, config: VPDConfig) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.rand(EXAMPLE_BATCH, 3, *EXAMPLE_SIZE, generator=generator) * 2 - 1}
    if "input_ids" in EXPORTS[task].inputs:
        vocab = int((config.text_config or {}).get("vocab_size", 2))
        inputs["input_ids"] = torch.randint(0, vocab, (EXAMPLE_BATCH, config.token_length), generator=generator)
    return inputs


def _dynamic_shapes(task: str, multiple: int) -> dict[str, dict[int, Any]]:
    """Batch, height and width dynamic; height and width multiples of `multiple`; token length static."""
    Dim = torch.export.Dim
    batch = Dim.DYNAMIC  # a named Dim with min=1 conflicts with the exporter's 0/1 specialisation guard
    shapes: dict[str, dict[int, Any]] = {
        "pixel_values": {0: batch, 2: multiple * Dim("height_blocks", min=1), 3: multiple * Dim("width_blocks", min=1)}
    }
    if "input_ids" in EXPORTS[task].inputs:
        shapes["input_ids"] = {0: batch}
    return shapes


def _value_infos(values, names: dict[str, str]) -> list[dict[str, Any]]:
    """Name, dtype and shape of graph inputs/outputs; the exporter's symbols (`s12`) replaced by `names`."""
    import onnx

    def readable(dim: str) -> str:
        return re.sub(r"\bs\d+\b", lambda match: names.get(match.group(0), match.group(0)), dim)

    infos = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [readable(d.dim_param) if d.dim_param else d.dim_value for d in tensor.shape.dim]
        infos.append({"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                      "shape": shape})  # fmt: skip
    return infos


def _versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def export_model(
    model: str | Path | nn.Module,
    output_dir: str | Path,
    task: str | None = None,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    processor: Any = None,
    optimize: bool = False,
    openvino_ir: bool = False,
) -> dict[str, Any]:
    r"""
    Exports a VPD model to ONNX in `output_dir` (see the module doc) and returns what `export_info.json` records.

    Args:
        model: a folder or Hub id of a saved VPD checkpoint (its processor is exported too), or a loaded model.
        task: `depth`, `segmentation` or `referring` (default: the checkpoint's / model's own).
        opset: the ONNX opset (18 or newer: the dynamo exporter's range).
        dtype: `fp32`, `fp16` or `bf16`: the dtype of the exported weights and compute (as `from_pretrained(dtype=)`:
            the VAE stays in float32 for fp16). Inputs and outputs stay float32. ONNX Runtime's CPU provider has no
            bf16 `Conv` (a bf16 export loads on OpenVINO only): for bf16 on the CPU, run the fp32 export on OpenVINO
            at bf16 precision.
        processor: the processor to save with a loaded `model` (with a folder: its own).
        optimize: run onnxscript's graph optimiser (constant folding, redundant-op removal) on the export. Off by
            default: it adds minutes and gigabytes on an SD-size graph, and both runtimes optimise the graph when
            they load it.
        openvino_ir: also save OpenVINO's IR (`openvino_model.xml/.bin`, from `openvino.convert_model`), which
            `ExportedVPDModel(runtime="openvino")` then reads instead of the ONNX file.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"`dtype` must be one of {list(EXPORT_DTYPES)}, got {dtype!r}.")
    if not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ValueError(f"`opset` must be an integer >= {DEFAULT_OPSET} (the dynamo exporter's range), got {opset!r}.")
    source = None
    if isinstance(model, nn.Module):
        own_task = _task_of(model)
        if task is not None and task != own_task:
            raise ValueError(f"`task` {task!r}: the model is a {own_task} model ({type(model).__name__}).")
        task = own_task
        loaded = model
        if EXPORT_DTYPES[dtype] != next(p.dtype for p in loaded.parameters() if p.is_floating_point()):
            loaded = loaded.to(EXPORT_DTYPES[dtype])
    else:
        from .modeling_vpd import TASK_MODEL_CLASSES
        from .prediction import check_model

        if task is None:
            task = _task_of_folder(model) if Path(model).is_dir() else "depth"
        if task not in EXPORTS:
            raise ValueError(f"`task` must be one of {list(EXPORTS)}, got {task!r}.")
        source = check_model(model, task)
        loaded = TASK_MODEL_CLASSES[task].from_pretrained(
            source.reference, dtype=EXPORT_DTYPES[dtype], use_safetensors=True, local_files_only=source.local_files_only
        )
        if processor is None:
            from .image_processing_vpd import VPDImageProcessor
            from .processing_vpd import VPDProcessor

            processor_class = VPDProcessor if task == "referring" else VPDImageProcessor
            processor = processor_class.from_pretrained(source.reference, local_files_only=source.local_files_only)
    spec = EXPORTS[task]
    config = loaded.config
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    graph = spec.graph(loaded.eval()).eval()
    inputs = _example_inputs(task, config)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in loaded.buffers())
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(
            graph, (), kwargs=inputs, dynamic_shapes=_dynamic_shapes(task, config.pad_multiple), strict=False
        )
        onnx_program = torch.onnx.export(
            program, (), kwargs=inputs, dynamo=True, opset_version=opset, input_names=list(spec.inputs),
            output_names=list(spec.outputs), optimize=optimize, verbose=False,
        )  # fmt: skip
    for old in (ONNX_FILE, ONNX_FILE + ".data"):
        (output / old).unlink(missing_ok=True)
    onnx_program.save(str(output / ONNX_FILE), external_data=weight_bytes >= EXTERNAL_DATA_BYTES)
    export_seconds = time.perf_counter() - start
    if openvino_ir:
        import openvino

        openvino.save_model(openvino.convert_model(output / ONNX_FILE), output / OPENVINO_FILE, compress_to_fp16=False)
    config.save_pretrained(output)
    if processor is not None:
        processor.save_pretrained(output)

    import onnx

    proto = onnx.load(str(output / ONNX_FILE), load_external_data=False)
    image_dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]  # pixel_values
    symbols = {}
    for dim, name in zip(image_dims, ("batch", None, "height_blocks", "width_blocks"), strict=True):
        symbol = re.search(r"s\d+", dim)
        if name and symbol:
            symbols[symbol.group(0)] = name
    files = sorted(p.name for p in output.iterdir() if p.name.startswith(("model.onnx", "openvino_model")))
    info = {
        "task": task,
        "model_class": spec.model_class,
        "source_model": str(model) if source is not None else getattr(loaded, "name_or_path", "") or None,
        "opset": opset,
        "dtype": dtype,
        "inputs": _value_infos(proto.graph.input, symbols),
        "outputs": _value_infos(proto.graph.output, symbols),
        "size_multiple": config.pad_multiple,
        "graph": spec.description,
        "export_seconds": round(export_seconds, 2),
        "files": {name: (output / name).stat().st_size for name in files},
        "versions": _versions(),
    }
    (output / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Runtimes
# ---------------------------------------------------------------------------------------------------------------------


def check_export(folder: str | Path, task: str | None = None, name: str = "`model`") -> dict[str, Any]:
    """The `export_info.json` of an export folder, checked: a `ValueError` for a missing folder, a folder without an
    ONNX file (e.g. a PyTorch checkpoint), or the export of another task than `task`."""
    path = Path(folder).expanduser()
    described = f"{name} {str(folder)!r}"
    if not path.is_dir():
        raise ValueError(
            f"{described}: no such folder (an exported model is a local folder written by `vpd-hf export`)."
        )
    if not (path / ONNX_FILE).is_file():
        hint = ""
        if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
            hint = (
                f" It holds a PyTorch checkpoint: export it first with `vpd-hf export --model {folder} --output DIR`."
            )
        raise ValueError(f"{described} has no {ONNX_FILE}: it is not a folder written by `vpd-hf export`.{hint}")
    try:
        info = json.loads((path / EXPORT_INFO_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{described}: {EXPORT_INFO_FILE} cannot be read ({error}); re-export the model.") from None
    if info.get("task") not in EXPORTS:
        raise ValueError(f"{described}: {EXPORT_INFO_FILE} names no known task ({info.get('task')!r}).")
    if task is not None and info["task"] != task:
        raise ValueError(
            f"{described} holds an exported {info['task']} model, not a {task} model: use `task` {info['task']!r}, "
            f"or a {task} export."
        )
    return info


def _missing_runtime(runtime: str) -> ImportError:
    return ImportError(f"`runtime` {runtime!r} is not installed: `pip install 'vpd-hf[deploy]'` (or `pip install "
                       f"{runtime}`).")  # fmt: skip


class _OnnxRuntimeSession:
    """An ONNX Runtime CPU session: numpy feeds in, the outputs (graph order) out."""

    def __init__(self, path: Path, precision: str, num_threads: int | None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise _missing_runtime("onnxruntime") from None
        if precision != "fp32":
            raise ValueError(
                f"`precision` {precision!r}: ONNX Runtime computes in the dtype the graph was exported in; export with "
                "`dtype`, or run a bf16 precision on OpenVINO."
            )
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: not the constant folder's notes on nodes it leaves to run time
        # No busy-waiting between calls: spinning intra-op threads take the cores from whatever runs next (measured
        # on a 2-core CPU: an eager PyTorch call alternated with ONNX Runtime calls ran many times slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class _OpenVINOSession:
    """An OpenVINO CPU model compiled at `precision` (f32 or bf16), with dynamic shapes, or with `static_shapes` one
    compilation per input shape (reshaped to it: OpenVINO's fast path for a fixed size), cached."""

    def __init__(self, path: Path, precision: str, num_threads: int | None, static_shapes: bool) -> None:
        try:
            import openvino
        except ImportError:
            raise _missing_runtime("openvino") from None
        self.core = openvino.Core()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"`precision` must be 'fp32' or 'bf16' on OpenVINO, got {precision!r}.")
        if precision == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ValueError("`precision` 'bf16': this CPU has no bf16 support (AVX512-BF16 / AMX) that OpenVINO uses.")
        self.model = self.core.read_model(str(path))
        self.properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if num_threads:
            self.properties["INFERENCE_NUM_THREADS"] = num_threads
        self.static_shapes = static_shapes
        self.compiled: dict[Any, Any] = {}

    def _compiled(self, feeds: dict[str, np.ndarray]) -> Any:
        key = tuple((name, array.shape) for name, array in feeds.items()) if self.static_shapes else None
        if key not in self.compiled:
            model = self.model
            if self.static_shapes:
                model = model.clone()
                model.reshape({name: list(array.shape) for name, array in feeds.items()})
            self.compiled[key] = self.core.compile_model(model, "CPU", self.properties)
        return self.compiled[key]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled = self._compiled(feeds)
        results = compiled(feeds)
        return [np.asarray(results[port]) for port in compiled.outputs]


class ExportedVPDModel:
    r"""
    A model exported by :func:`export_model`, run on ONNX Runtime or OpenVINO (CPU) and called like the PyTorch model:
    `model(**processor_batch)` returns the task's output dataclass (`predicted_depth` / `logits` as the PyTorch model
    in eval mode; no hidden states or attention maps).

    Args:
        folder: the export folder.
        runtime: `onnxruntime` or `openvino` (OpenVINO reads `openvino_model.xml` when the export saved one, else the
            ONNX file).
        task: the task expected (a `ValueError` for another task's export); default: the export's.
        precision: `fp32` or, on OpenVINO, `bf16` (`INFERENCE_PRECISION_HINT`; needs a CPU with bf16 support).
        static_shapes: OpenVINO: compile once per input shape, reshaped to it (faster for a fixed size).
        num_threads: intra-op threads (default: the runtime's, all cores).
    """

    def __init__(
        self,
        folder: str | Path,
        runtime: str = "onnxruntime",
        task: str | None = None,
        precision: str = "fp32",
        static_shapes: bool = False,
        num_threads: int | None = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"`runtime` must be one of {list(RUNTIMES)}, got {runtime!r}.")
        self.info = check_export(folder, task)
        self.folder = Path(folder)
        self.task = self.info["task"]
        self.spec = EXPORTS[self.task]
        self.runtime, self.precision = runtime, precision
        self.config = VPDConfig.from_pretrained(self.folder)
        if runtime == "onnxruntime":
            self.session: Any = _OnnxRuntimeSession(self.folder / ONNX_FILE, precision, num_threads)
        else:
            ir = self.folder / OPENVINO_FILE
            path = ir if ir.is_file() else self.folder / ONNX_FILE
            self.session = _OpenVINOSession(path, precision, num_threads, static_shapes)

    def __repr__(self) -> str:
        return f"ExportedVPDModel(task={self.task!r}, runtime={self.runtime!r}, precision={self.precision!r})"

    def _check(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        expected = self.spec.inputs
        if set(inputs) != set(expected):
            raise TypeError(f"The exported {self.task} graph takes {list(expected)}, got {sorted(inputs)}.")
        pixel_values = inputs["pixel_values"]
        if not isinstance(pixel_values, (torch.Tensor, np.ndarray)):
            raise TypeError(f"`pixel_values` must be a torch.Tensor or numpy array, got {type(pixel_values).__name__}.")
        multiple = self.config.pad_multiple
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != 3 or shape[0] == 0:
            raise ValueError(f"`pixel_values` must have shape (batch, 3, height, width), got {shape}.")
        if shape[2] % multiple or shape[3] % multiple or 0 in shape[2:]:
            raise ValueError(
                f"`pixel_values` height and width must be positive multiples of {multiple} for the exported graph, got "
                f"{shape[2]}x{shape[3]}: pad the images (VPDImageProcessor does, with `do_pad=True`)."
            )
        feeds = {"pixel_values": np.ascontiguousarray(_numpy(pixel_values), dtype=np.float32)}
        if "input_ids" in expected:
            ids = _numpy(inputs["input_ids"])
            if ids.ndim != 2 or ids.shape != (shape[0], self.config.token_length) or ids.dtype.kind not in "iu":
                raise ValueError(
                    f"`input_ids` must be integers of shape ({shape[0]}, {self.config.token_length}) (one expression "
                    f"per image, `token_length` tokens), got {ids.dtype} {tuple(ids.shape)}."
                )
            feeds["input_ids"] = np.ascontiguousarray(ids, dtype=np.int64)
        return feeds

    def run(self, **inputs: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """One call of the exported graph: its inputs by name (see the module doc), its outputs by name, float32 CPU
        tensors. Heights and widths must be multiples of 64 (the processor pads to them)."""
        results = self.session(self._check(inputs))
        return {
            name: torch.from_numpy(np.asarray(value)) for name, value in zip(self.spec.outputs, results, strict=True)
        }

    # -- segmentation: the graph as the model's `logits_fn`s -------------------------------------------------------

    def single_pass_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Segmentation: `(B, C, ceil(H / 8), ceil(W / 8))` logits of one pass of images of any size, zero-padded at the
        bottom/right to a multiple of 64 first (as `VPDModel.encode_images` pads them)."""
        height, width = pixel_values.shape[-2:]
        multiple = self.config.pad_multiple
        padded = F.pad(pixel_values, (0, -width % multiple, 0, -height % multiple))
        logits = self.run(pixel_values=padded)["logits"]
        return logits[..., : math.ceil(height / 8), : math.ceil(width / 8)]

    def dense_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Segmentation: one pass, `(B, C, H, W)` logits at the input resolution (`VPDModelForSegmentation.dense_logits`
        on the graph)."""
        from .modeling_vpd import VPDModelForSegmentation

        return VPDModelForSegmentation._to_input_resolution(
            self.single_pass_logits(pixel_values), pixel_values.shape[-2:]
        )

    def __call__(self, output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                 labels: Any = None, **batch: Any) -> Any:  # fmt: skip
        """The task's output dataclass for a processor batch (`pixel_values`, `pixel_mask`, and for referring
        `input_ids`, `image_indices`)."""
        if output_hidden_states or output_attentions:
            raise ValueError("The exported graph returns the task output only: no hidden states or attention maps.")
        if labels is not None:
            raise ValueError("`labels`: an exported model runs inference only (no loss).")
        batch = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
        return self.spec.outputs_fn(self, **batch)


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.float().numpy() if value.is_floating_point() else value.numpy()  # bf16 has no numpy dtype
    return np.asarray(value)


__all__ = ["EXPORTS", "RUNTIMES", "ExportSpec", "ExportedVPDModel", "check_export", "export_model"]
