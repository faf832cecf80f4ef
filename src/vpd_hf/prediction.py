"""Batch prediction to files: images (paths, globs, folders) or a whole `datasets` split, sharded over the processes of
`accelerate launch`, resumable. Behind `vpd-hf predict`.

Per image `NAME` the output folder gets:

* depth: `NAME_depth.png` (colour map), `NAME_depth16.png` (16-bit PNG, millimetres);
* segmentation: `NAME_labels.png` (label indices, 8- or 16-bit), `NAME_overlay.png` (palette overlay with a legend);
* normals: `NAME_normals.png` (Marigold's colours), `NAME_normals.npy` (float32 unit normals `(3, H, W)`);
* referring: per expression `k`, `NAME_ref{k}_mask.png` (0/255) and `NAME_ref{k}_overlay.png`; `k` counts the
  expressions of that image over all runs into the folder, so a rerun with a new expression adds files.

A multi-task model (`VPDModelForDensePrediction`) asked for several tasks (`task="depth,segmentation,normals"` or
`"all"`: every task it has a head for) writes the files of each of them from one pass per image, with one manifest line
per image. A multi-task folder asked for one task is loaded as that task's single-task class (that head only).

A JSON-lines manifest (`predictions.jsonl`, or `predictions-{rank}-of-{world}.jsonl` per shard) lists what was written;
a rerun skips the items already in it (for referring segmentation: the (image, expression) pairs). An image that
cannot be read (corrupt, truncated, not an image) or that the model rejects is skipped and recorded in the manifest
with the reason (`{"id": ..., "skipped": "..."}`); the run goes on, and a rerun tries it again.

Arguments are checked before anything is loaded, without importing torch: :func:`check_model` says what a model
argument is when it is not a VPD checkpoint of the task (a missing folder, a Hub id that cannot be looked up offline, a
Stable Diffusion checkpoint, pickled weights, the checkpoint of another model or task).
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The keys of `modeling_vpd.TASK_MODEL_CLASSES` and the architecture names `save_pretrained` records for them (plus the
# segmentation alias), kept literal so that checking arguments needs no torch; a test keeps them in step.
TASKS = ("depth", "segmentation", "referring", "normals", "multitask")
# Where a model runs: PyTorch (a checkpoint), or a folder written by `vpd-hf export` on a CPU runtime (vpd_hf.export).
RUNTIMES = ("torch", "onnxruntime", "openvino")
TASK_ARCHITECTURES = {
    "VPDModelForDepthEstimation": "depth",
    "VPDModelForSegmentation": "segmentation",
    "VPDModelForSemanticSegmentation": "segmentation",
    "VPDModelForReferringSegmentation": "referring",
    "VPDModelForNormalEstimation": "normals",
    "VPDModelForDensePrediction": "multitask",
}
# The tasks one pass of a multi-task model serves (`configuration_vpd.DENSE_TASKS`), and what `task` may name: one task,
# a comma-separated list of dense tasks, or "all" (every task of the model).
DENSE_TASKS = ("depth", "segmentation", "normals")
ALL_TASKS = "all"
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What reading one image may raise: unidentifiable or truncated files (OSError, incl. PIL.UnidentifiedImageError),
# decompression bombs, and what some PIL decoders and `datasets` raise for broken data (ValueError, TypeError,
# SyntaxError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from paths, glob patterns and folders (their images, sorted), without duplicates."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            images = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise ValueError(f"`inputs`: {item!r} is not an image file, a folder or a glob matching images.")
            found += images
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError(f"`inputs` {list(map(str, inputs))} contain no images ({', '.join(IMAGE_SUFFIXES)}).")
    return unique


# -- checking arguments before loading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A checked VPD checkpoint: `reference` for `from_pretrained`; `local_files_only` when it is a folder or a Hub
    model served from the local cache (offline, or the Hub unreachable), so that loading never waits on the network."""

    reference: str
    task: str
    local_files_only: bool
    tasks: tuple[str, ...] = ()  # the tasks to predict (resolved from `task`; one pass serves them all)

    def __post_init__(self) -> None:
        if not self.tasks:
            object.__setattr__(self, "tasks", parse_tasks(self.task) or ())


def parse_tasks(task: str | Sequence[str]) -> tuple[str, ...] | None:
    """The tasks a `task` argument asks for: one task name, a comma-separated list (or a sequence) of dense tasks, or
    `"all"` (None: every task of the model). Raises a `ValueError` naming `task` otherwise."""
    names = [t.strip() for t in task.split(",")] if isinstance(task, str) else [str(t).strip() for t in task]
    if names in ([ALL_TASKS], ["multitask"]):
        return None
    allowed = f"one of {[*DENSE_TASKS, 'referring']}, a comma-separated list of {list(DENSE_TASKS)}, or 'all'"
    if not names or any(name not in (*DENSE_TASKS, "referring") for name in names) or len(set(names)) != len(names):
        raise ValueError(f"`task` must be {allowed}; got {task!r}.")
    if "referring" in names and len(names) > 1:
        raise ValueError(f"`task`: referring segmentation runs alone (its conditioning is the sentence); got {task!r}.")
    return tuple(name for name in (*DENSE_TASKS, "referring") if name in names)


def _looks_local(text: str) -> bool:
    """A path rather than a Hub id: what huggingface_hub rejects as a repo id (`./x`, `/x`, `a/b/c`, `x/`, `~/x`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return "\\" in text


def _hub_model_files(repo_id: str, name: str) -> tuple[set[str], Path | None]:
    """Top-level file names of Hub model `repo_id`, from the Hub (folder None) or, offline or when the Hub cannot be
    reached, from the local cache (its snapshot folder). One request without retries: a wrong id or a missing network
    is reported at once, not after transformers' minute of retries."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    reason = "offline mode is on (HF_HUB_OFFLINE)" if huggingface_hub.is_offline_mode() else None
    if reason is None:
        try:
            info = huggingface_hub.HfApi().model_info(repo_id, timeout=10)
            return {sibling.rfilename.split("/")[0] for sibling in info.siblings or []}, None
        except RepositoryNotFoundError:
            raise ValueError(
                f"{name} {repo_id!r} is neither a folder here nor a model on the Hub (a private or gated model needs "
                "`hf auth login`)."
            ) from None
        except HfHubHTTPError as error:
            raise ValueError(f"{name} {repo_id!r}: the Hub refused to list the model ({error}).") from None
        except Exception as error:  # the HTTP client's connection errors: the Hub cannot be reached
            reason = f"the Hub cannot be reached ({type(error).__name__}: {error})"
    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        raise ValueError(
            f"{name} {repo_id!r} is not a folder here, and as a Hub model id it is not in the local cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) while {reason}. Check the path, or download the model once "
            "while online."
        )
    folder = Path(cached).parent
    return {p.name for p in folder.iterdir()}, folder


def check_model(model: str | Path | ModelSource, task: str, name: str = "`model`") -> ModelSource:
    """
    Checks that `model` (a folder or a Hub id) is a VPD checkpoint of `task` that vpd_hf will load, before torch is
    imported, and raises a `ValueError` saying what it is otherwise: a folder that does not exist, a Hub id that
    cannot be looked up (offline and not cached), a Stable Diffusion checkpoint, a checkpoint with pickled weights only,
    the checkpoint of another model or of another VPD task. `name`: how errors call the argument.
    """
    if isinstance(model, ModelSource):
        return model
    requested = parse_tasks(task)
    task = ",".join(requested) if requested else ALL_TASKS
    text = str(model)
    path = Path(text).expanduser()
    described = f"{name} {text!r}"
    if path.is_dir():
        folder: Path | None = path
        files = {p.name for p in path.iterdir()}
        reference, local = str(path), True
    elif path.exists():
        raise ValueError(
            f"{described} is a file: give the folder `save_pretrained` wrote (config.json, model.safetensors)."
        )
    elif _looks_local(text):
        raise ValueError(f"{described}: no such folder.")
    else:
        files, folder = _hub_model_files(text, name)
        reference, local = text, folder is not None
    if "config.json" not in files:
        if "model_index.json" in files or "unet" in files:
            raise ValueError(
                f"{described} is a Stable Diffusion checkpoint, not a VPD model. Build a VPD model from it with "
                f"`{_class_hint(task)}.from_stable_diffusion({text!r})` and fine-tune it with `vpd-hf train --task "
                f"{task} ...` (the training recipes start from Stable Diffusion)."
            )
        raise ValueError(f"{described} has no config.json: it is not a model folder written by `save_pretrained`.")
    if folder is not None:
        config_file = folder / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(text, "config.json"))
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{described}: config.json cannot be read ({error}).") from None
    architectures = list(config.get("architectures") or [])
    listed = f" ({', '.join(architectures)})" if architectures else ""
    if config.get("model_type") != "vpd":
        raise ValueError(f"{described} holds a `{config.get('model_type')}` model{listed}, not a VPD model.")
    if not files.intersection(SAFETENSORS_FILES):
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"{described} holds pickled weights only ({', '.join(pickles)}): vpd_hf loads safetensors only, "
                "because unpickling a file can run arbitrary code. If you trust the file, convert it once with "
                f"`{_class_hint(task)}.from_pretrained(folder, use_safetensors=False).save_pretrained(new_folder)`."
            )
        raise ValueError(f"{described} has no weights: no {' or '.join(SAFETENSORS_FILES)}.")
    held = _held_tasks(config, architectures)
    if not architectures and requested:  # a folder saved without `architectures`: trust the request
        held = list(requested)
    if not held:
        raise ValueError(f"{described} holds no task head{listed}: give a {task} checkpoint.")
    if requested is None:
        requested = tuple(held)
    missing = [t for t in requested if t not in held]
    if missing:
        if len(held) == 1 and len(requested) == 1:
            other = held[0]
            raise ValueError(
                f"{described} holds a {other} model{listed}, not a {task} model: use `task` {other!r}, or a {task} "
                "checkpoint."
            )
        raise ValueError(
            f"{described} has no {' / '.join(missing)} head: its tasks are {held}{listed}. Ask `task` for some of "
            f"them ({','.join(held)} or 'all')."
        )
    return ModelSource(reference, ",".join(requested), local, tuple(requested))


def _held_tasks(config: dict[str, Any], architectures: list[str]) -> list[str]:
    """The tasks a saved VPD model has heads for: its class's task, or the `tasks` of a multi-task model's config."""
    for architecture in architectures:
        task = TASK_ARCHITECTURES.get(architecture)
        if task == "multitask":
            return [t for t in DENSE_TASKS if t in (config.get("tasks") or DENSE_TASKS)]
        if task is not None:
            return [task]
    return []


def _class_hint(task: str) -> str:
    return {"depth": "VPDModelForDepthEstimation", "segmentation": "VPDModelForSegmentation",
            "normals": "VPDModelForNormalEstimation", "referring": "VPDModelForReferringSegmentation"}.get(
        task, "VPDModelForDensePrediction")  # fmt: skip


def resolve_device(device: str | None, name: str = "`device`") -> torch.device:
    """`device` as a `torch.device` (default: CUDA when available), checked to exist on this machine."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"{name} {device!r} is not a device name torch knows (cpu, cuda, cuda:1, mps): {error}"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"{name} {device!r}: CUDA is not available here (torch {torch.__version__}, {built}). "
                             "Use `cpu`, or leave the device out to take CUDA only when there is one.")  # fmt: skip
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {device!r}: MPS is not available here. Use `cpu`.")
    return resolved


def _dataset_configs(path: Path) -> list[str]:
    """Configuration names of a local dataset folder: those its README declares (the Hub's `configs:` metadata), else
    its sub-folders of parquet files (`data/` is the default layout, not a configuration)."""
    readme = path / "README.md"
    if readme.is_file():
        from huggingface_hub import metadata_load

        declared = (metadata_load(readme) or {}).get("configs") or []
        names = sorted({c["config_name"] for c in declared if isinstance(c, dict) and c.get("config_name")})
        if names:
            return names
    return sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != "data" and any(p.glob("*.parquet")))


def check_dataset(dataset: str | Path, dataset_config: str | None) -> None:
    """Checks a local dataset folder and its configuration before `datasets` builds it (a folder of several
    configurations read as one fails deep inside `datasets` with a schema error). A Hub id is left to `datasets`,
    which names the configurations itself when one is missing."""
    text = str(dataset)
    path = Path(text).expanduser()
    if not path.is_dir():
        if path.exists():
            raise ValueError(f"`dataset` {text!r} is a file: give a dataset folder or a Hub dataset id.")
        if _looks_local(text):
            raise ValueError(f"`dataset` {text!r}: no such folder.")
        return
    configs = _dataset_configs(path)
    if dataset_config is None and len(configs) > 1:
        raise ValueError(f"`dataset` {text!r} has several configurations {configs}: choose one with `dataset_config`.")
    if dataset_config is not None and configs and dataset_config not in configs:
        raise ValueError(f"`dataset_config` {dataset_config!r} is not a configuration of {text!r}: {configs}.")


class Predictor:
    """A VPD model + processor that predicts batches of PIL images and writes the results (see the module doc).
    `model`: a folder, a Hub id or a :class:`ModelSource` from :func:`check_model`. `task`: one task, several dense
    tasks (`"depth,segmentation,normals"`) or `"all"` (every task of a multi-task model), served by one pass. With
    `runtime` `onnxruntime` or `openvino`, `model` is a folder written by `vpd-hf export`
    (`vpd_hf.export.ExportedVPDModel`, called like the model) and `task` its one task."""

    def __init__(self, task: str, model: str | Path | ModelSource, device: str | None = None,
                 dtype: torch.dtype | None = None, runtime: str = "torch"):  # fmt: skip
        if runtime not in RUNTIMES:
            raise ValueError(f"`runtime` must be one of {list(RUNTIMES)}, got {runtime!r}.")
        self.runtime = runtime
        if runtime != "torch":
            self.task, self.tasks = task, [task]
            self._load_exported(model, device, dtype)
            return
        source = check_model(model, task)  # before torch: a wrong argument is reported at once
        self.device = resolve_device(device)
        from .modeling_vpd import TASK_MODEL_CLASSES

        self.tasks = list(source.tasks)
        self.task = self.tasks[0] if len(self.tasks) == 1 else "multitask"
        # `use_safetensors=True`: never unpickle (check_model has said why for a folder or a Hub model it listed).
        loading = {"local_files_only": source.local_files_only}
        model_class = TASK_MODEL_CLASSES[self.task]
        self.model = model_class.from_pretrained(source.reference, dtype=dtype, use_safetensors=True, **loading)
        self.model = self.model.to(self.device).eval().use_fast_memory_format()
        self._load_processor(source.reference, loading)

    def _load_exported(self, model: str | Path | ModelSource, device: str | None, dtype: torch.dtype | None) -> None:
        """`runtime` onnxruntime / openvino: the folder `vpd-hf export` wrote; `dtype` bfloat16 is OpenVINO's bf16
        inference precision."""
        import torch

        from .export import ExportedVPDModel

        if device not in (None, "cpu"):
            raise ValueError(f"`device` {device!r}: the {self.runtime} runtime runs on the CPU; leave it out.")
        precisions = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16"}
        if dtype not in precisions:
            raise ValueError(f"`dtype` {dtype}: the {self.runtime} runtime runs at float32 or (OpenVINO) bfloat16.")
        reference = model.reference if isinstance(model, ModelSource) else str(model)
        self.model = ExportedVPDModel(reference, self.runtime, task=self.task, precision=precisions[dtype])
        self.device = torch.device("cpu")
        self._load_processor(reference, {"local_files_only": True})

    def _load_processor(self, reference: str, loading: dict[str, Any]) -> None:
        from .image_processing_vpd import VPDImageProcessor
        from .processing_vpd import VPDProcessor

        processor_class = VPDProcessor if self.task == "referring" else VPDImageProcessor
        self.processor = processor_class.from_pretrained(reference, **loading)
        self.image_processor = self.processor.image_processor if self.task == "referring" else self.processor

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        if self.runtime != "torch":  # an exported graph takes float32 whatever it computes in
            return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items() if isinstance(v, torch.Tensor)}  # fmt: skip

    def predict(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]] | None = None) -> list[Any]:
        """Depth maps `(H, W)` / label maps `(H, W)` / unit normals `(3, H, W)` / per image a list of boolean masks
        `(H, W)` (one per text); for several tasks, per image a dict task -> its prediction (from one pass)."""
        import torch

        with torch.no_grad():
            return self._predict(images, texts)

    def _predict(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]] | None) -> list[Any]:
        sizes = [image.size[::-1] for image in images]
        if self.task == "referring":
            if texts is None or len(texts) != len(images) or any(len(t) == 0 for t in texts):
                raise ValueError("Referring segmentation needs at least one expression per image (`texts`).")
            batch = self.processor(images=list(images), text=[list(t) for t in texts], return_tensors="pt")
            outputs = self.model(**self._inputs(batch))
            indices = batch["image_indices"].tolist()
            masks = self.processor.post_process_referring_segmentation(outputs, [sizes[i] for i in indices])
            per_image: list[list[Any]] = [[] for _ in images]
            for index, result in zip(indices, masks, strict=True):
                per_image[index].append(result["mask"].cpu())
            return per_image
        batch = self.image_processor(images=list(images), return_tensors="pt")
        outputs = self.model(**self._inputs(batch))  # one pass for every task
        processor, per_task = self.image_processor, {}
        if "depth" in self.tasks:
            results = processor.post_process_depth_estimation(outputs, target_sizes=sizes)
            per_task["depth"] = [r["predicted_depth"].float().cpu() for r in results]
        if "segmentation" in self.tasks:
            per_task["segmentation"] = [
                m.cpu() for m in processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            ]
        if "normals" in self.tasks:
            results = processor.post_process_normal_estimation(outputs, target_sizes=sizes)
            per_task["normals"] = [r["predicted_normals"].cpu() for r in results]
        if len(self.tasks) == 1:
            return per_task[self.task]
        return [{task: per_task[task][index] for task in self.tasks} for index in range(len(images))]

    def write(self, image: Image.Image, prediction: Any, output_dir: Path, name: str,
              texts: Sequence[str] | None = None, first_index: int = 0) -> list[str]:  # fmt: skip
        """Writes the files of one prediction and returns their names. Referring: the masks of `texts` are numbered
        from `first_index` (the number of expressions of this image already in the folder)."""
        from .visualization import (
            colorize_depth,
            depth_to_uint16_png,
            overlay_mask,
            overlay_segmentation,
            visualize_normals,
        )

        written: dict[str, Image.Image] = {}
        arrays: dict[str, np.ndarray] = {}
        predictions = prediction if isinstance(prediction, dict) else {self.task: prediction}
        if "depth" in predictions:
            written[f"{name}_depth.png"] = colorize_depth(predictions["depth"])
            written[f"{name}_depth16.png"] = depth_to_uint16_png(predictions["depth"])
        if "segmentation" in predictions:
            labels = predictions["segmentation"].numpy()
            dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
            written[f"{name}_labels.png"] = Image.fromarray(labels.astype(dtype))
            written[f"{name}_overlay.png"] = overlay_segmentation(image, labels, self.model.config.id2label)
        if "normals" in predictions:
            written[f"{name}_normals.png"] = visualize_normals(predictions["normals"])
            arrays[f"{name}_normals.npy"] = predictions["normals"].float().numpy()
        if self.task == "referring":
            for k, (mask, text) in enumerate(zip(prediction, texts or [], strict=True), start=first_index):
                array = mask.numpy()
                written[f"{name}_ref{k}_mask.png"] = Image.fromarray((array * 255).astype(np.uint8))
                written[f"{name}_ref{k}_overlay.png"] = overlay_mask(image, array, caption=text)
        for file, picture in written.items():
            picture.save(output_dir / file)
        for file, array in arrays.items():
            np.save(output_dir / file, array, allow_pickle=False)
        return [*written, *arrays]


@dataclass
class _Item:
    """One image to predict: `load` returns it (a file is opened, a dataset row decoded, only when its batch comes);
    `texts`: its expressions (referring); `source`: what the manifest names as its input (a file path)."""

    id: str
    load: Callable[[], Any]
    texts: list[str] | None = None
    source: str | None = None


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _done(manifests: Iterable[Path]) -> dict[str, list[str]]:
    """What the manifests record as written: item id -> its expressions written (referring; else empty). Lines of
    skipped items do not count (a rerun tries them again), nor a line cut by an interruption."""
    done: dict[str, list[str]] = {}
    for manifest in manifests:
        if not manifest.is_file():
            continue
        for line in manifest.read_text().splitlines():
            try:
                entry = json.loads(line)
                item_id = entry["id"]
            except (ValueError, KeyError, TypeError):
                continue
            if "skipped" in entry:
                continue
            texts = done.setdefault(item_id, [])
            texts += [t for t in entry.get("texts") or [] if t not in texts]
    return done


def _read(item: _Item) -> Image.Image:
    image = item.load()
    if not isinstance(image, Image.Image):
        raise TypeError(f"not an image: {type(image).__name__}")
    return image.convert("RGB")  # decodes the whole file: a truncated one raises here


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _predict_isolating(predictor: Predictor, jobs: list[tuple[Any, Image.Image]],
                       texts: list[list[str]] | None) -> list[Any]:  # fmt: skip
    """Predictions for the images of `jobs`; when the model or processor rejects the batch (ValueError/TypeError:
    an input it cannot take), each image is tried alone, so that one bad image costs only itself: its entry is then
    the error instead of a prediction."""
    try:
        return predictor.predict([image for _, image in jobs], texts)
    except (ValueError, TypeError) as error:
        if len(jobs) == 1:
            return [error]
        return [
            _predict_isolating(predictor, [job], None if texts is None else [texts[i]])[0] for i, job in enumerate(jobs)
        ]


def _run(predictor: Predictor, items: list[_Item], done: dict[str, list[str]], output_dir: Path, manifest: Path,
         batch_size: int, progress: bool, description: str) -> dict[str, Any]:  # fmt: skip
    """Predicts what `done` does not hold yet, in batches, appending to `manifest`. Returns the counts: `total`
    items, `predicted` in this run, `already_done` before it, `skipped` (unreadable or rejected), and
    `skipped_items`: id -> reason."""
    from tqdm.auto import tqdm

    referring = predictor.task == "referring"
    todo: list[tuple[_Item, list[str] | None, int]] = []  # item, expressions to predict, number of the first one
    for item in items:
        if referring:
            written = done.get(item.id, [])
            new = [t for t in dict.fromkeys(item.texts or []) if t not in written]
            if new:
                todo.append((item, new, len(written)))
        elif item.id not in done:
            todo.append((item, None, 0))
    skipped: dict[str, str] = {}
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=description, disable=not progress)
    with manifest.open("a") as log:

        def record(entry: dict[str, Any]) -> None:
            log.write(json.dumps(entry) + "\n")
            log.flush()  # an interrupted run keeps every finished line

        def skip(item: _Item, texts: list[str] | None, error: BaseException) -> None:
            skipped[item.id] = _reason(error)
            logger.warning("Skipped %s%s: %s", item.id, f" ({item.source})" if item.source else "", skipped[item.id])
            record({"id": item.id, **({"input": item.source} if item.source else {}),
                    **({"texts": texts} if texts else {}), "skipped": skipped[item.id]})  # fmt: skip

        for batch in _batches(todo, batch_size):
            loaded = []
            for job in batch:
                try:
                    loaded.append((job, _read(job[0])))
                except UNREADABLE_IMAGE_ERRORS as error:
                    skip(job[0], job[1], error)
            texts = [job[1] for job, _ in loaded] if referring else None
            predictions = _predict_isolating(predictor, loaded, texts) if loaded else []
            for ((item, item_texts, first), image), prediction in zip(loaded, predictions, strict=True):
                if isinstance(prediction, Exception):
                    skip(item, item_texts, prediction)
                    continue
                files = predictor.write(image, prediction, output_dir, item.id, item_texts, first)
                record({"id": item.id, **({"input": item.source} if item.source else {}), "files": files,
                        **({"texts": item_texts} if item_texts else {})})  # fmt: skip
            bar.update(len(batch))
    bar.close()
    return {"total": len(items), "predicted": len(todo) - len(skipped), "already_done": len(items) - len(todo),
            "skipped": len(skipped), "skipped_items": skipped}  # fmt: skip


def predict_files(
    task: str,
    model: str | Path | ModelSource,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    texts: Sequence[str] | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Predicts every image of `inputs` (paths, globs, folders) into `output_dir`; `texts`: the expressions asked
    about every image (referring segmentation). Unreadable images are skipped and reported, not fatal. Returns the
    counts (`total`, `predicted`, `already_done`, `skipped`) and `skipped_items` (id -> reason). `runtime`:
    `onnxruntime` / `openvino` run a folder written by `vpd-hf export` (see `vpd_hf.export`)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if task == "referring" and not texts:
        raise ValueError("`texts`: referring segmentation needs at least one expression (`--text`).")
    paths = collect_images(inputs)
    names = _unique_names(paths)
    predictor = Predictor(task, model, device, dtype, runtime)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    items = [
        _Item(name, (lambda p=path: Image.open(p)), list(texts) if texts else None, str(path))
        for name, path in zip(names, paths, strict=True)
    ]
    manifest = output / "predictions.jsonl"
    return _run(predictor, items, _done([manifest]), output, manifest, batch_size, progress, f"Predicting {task}")


def _unique_names(paths: list[Path]) -> list[str]:
    """File stems, made unique with the parent folder's name where two images share one."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def predict_dataset(
    task: str,
    model: str | Path | ModelSource,
    dataset: str | Path,
    output_dir: str | Path,
    split: str = "validation",
    dataset_config: str | None = None,
    image_column: str = "image",
    text_column: str = "answer",
    batch_size: int = 1,
    max_samples: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    device: str | None = None,
    runtime: str = "torch",
) -> dict[str, Any]:
    """
    Predicts a `datasets` split (Hub id or local folder) into `output_dir`. Under `accelerate launch` each process
    takes a contiguous shard of the split and writes its own manifest `predictions-{rank}-of-{world}.jsonl`; files are
    named by the row index, so a rerun with any number of processes skips what is done. `device`: for a
    single-process run only (accelerate gives each process its own). `runtime`: as in :func:`predict_files`. Returns
    what :func:`predict_files` returns.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    check_dataset(dataset, dataset_config)
    if runtime == "torch":
        source = check_model(model, task)
    else:
        from .export import check_export

        check_export(model, task)
        source = model
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .data.loading import load_splits

    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU; Accelerator reads it, PartialState has to be told.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu")
    if device is not None and state.num_processes > 1:
        raise ValueError(f"`device` {device!r}: a run of {state.num_processes} processes uses one device per process "
                         "(chosen by accelerate); leave it out.")  # fmt: skip
    splits = load_splits(dataset, dataset_config)
    if split not in splits:
        raise ValueError(f"`split` {split!r} is not a split of {dataset!r}: {sorted(splits)}.")
    rows = splits[split]
    if image_column not in rows.column_names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of the split: {rows.column_names}.")
    if task == "referring" and text_column not in rows.column_names:
        raise ValueError(f"`text_column` {text_column!r} is not a column of the split: {rows.column_names}.")
    total = len(rows) if max_samples is None else min(len(rows), max_samples)
    shard = list(range(total))[state.process_index :: state.num_processes]
    width = max(6, len(str(total)))
    if runtime == "torch":
        device = device or str(state.device)  # cuda:{local rank} per process
    predictor = Predictor(task, source, device, dtype, runtime)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)

    def load(index: int) -> Callable[[], Any]:
        return lambda: rows[index][image_column]

    def texts(index: int) -> list[str] | None:
        if task != "referring":
            return None
        value = rows[index][text_column]
        return [value] if isinstance(value, str) else list(value)

    items = [_Item(f"{index:0{width}d}", load(index), texts(index)) for index in shard]
    # One manifest for all processes would need locking; each rank writes its own, and all of them count as done.
    manifest = output / f"predictions-{state.process_index}-of-{state.num_processes}.jsonl"
    done = _done(output.glob("predictions-*-of-*.jsonl"))
    return _run(predictor, items, done, output, manifest, batch_size, progress and state.is_local_main_process,
                f"Predicting {task} [{state.process_index + 1}/{state.num_processes}]")  # fmt: skip


__all__ = [
    "IMAGE_SUFFIXES",
    "RUNTIMES",
    "TASKS",
    "ModelSource",
    "Predictor",
    "check_dataset",
    "check_model",
    "collect_images",
    "parse_tasks",
    "predict_dataset",
    "predict_files",
    "resolve_device",
]
