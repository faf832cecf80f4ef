"""Batch prediction to files: images (paths, globs, folders) or a whole `datasets` split, sharded over the processes of
`accelerate launch`, resumable. Behind `vpd-hf predict`.

Per image `NAME` the output folder gets:

* depth: `NAME_depth.png` (colour map), `NAME_depth16.png` (16-bit PNG, millimetres);
* segmentation: `NAME_labels.png` (label indices, 8- or 16-bit), `NAME_overlay.png` (palette overlay with a legend);
* referring: per expression `k`, `NAME_ref{k}_mask.png` (0/255) and `NAME_ref{k}_overlay.png`.

A JSON-lines manifest (`predictions.jsonl`, or `predictions-{rank}-of-{world}.jsonl` per shard) lists what was written;
a rerun skips the items already in it.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .modeling_vpd import TASK_MODEL_CLASSES

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TASKS = tuple(TASK_MODEL_CLASSES)


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


class Predictor:
    """A VPD model + processor that predicts batches of PIL images and writes the results (see the module doc)."""

    def __init__(self, task: str, model: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
        import vpd_hf

        if task not in TASKS:
            raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
        self.task = task
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = TASK_MODEL_CLASSES[task].from_pretrained(str(model), dtype=dtype).to(self.device).eval()
        processor_class = vpd_hf.VPDProcessor if task == "referring" else vpd_hf.VPDImageProcessor
        self.processor = processor_class.from_pretrained(str(model))
        self.image_processor = self.processor.image_processor if task == "referring" else self.processor

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items() if isinstance(v, torch.Tensor)}  # fmt: skip

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]] | None = None) -> list[Any]:
        """Depth maps `(H, W)` / label maps `(H, W)` / per image a list of boolean masks `(H, W)` (one per text)."""
        sizes = [image.size[::-1] for image in images]
        if self.task == "referring":
            if texts is None or len(texts) != len(images) or any(len(t) == 0 for t in texts):
                raise ValueError("Referring segmentation needs at least one expression per image (`texts`).")
            batch = self.processor(images=list(images), text=[list(t) for t in texts], return_tensors="pt")
            outputs = self.model(**self._inputs(batch))
            indices = batch["image_indices"].tolist()
            masks = self.processor.post_process_referring_segmentation(outputs, [sizes[i] for i in indices])
            per_image: list[list[torch.Tensor]] = [[] for _ in images]
            for index, result in zip(indices, masks, strict=True):
                per_image[index].append(result["mask"].cpu())
            return per_image
        batch = self.image_processor(images=list(images), return_tensors="pt")
        outputs = self.model(**self._inputs(batch))
        if self.task == "depth":
            results = self.image_processor.post_process_depth_estimation(outputs, target_sizes=sizes)
            return [r["predicted_depth"].float().cpu() for r in results]
        return [m.cpu() for m in self.image_processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)]

    def write(self, image: Image.Image, prediction: Any, output_dir: Path, name: str,
              texts: Sequence[str] | None = None) -> list[str]:  # fmt: skip
        """Writes the files of one prediction and returns their names."""
        from .visualization import colorize_depth, depth_to_uint16_png, overlay_mask, overlay_segmentation

        written: dict[str, Image.Image] = {}
        if self.task == "depth":
            written[f"{name}_depth.png"] = colorize_depth(prediction)
            written[f"{name}_depth16.png"] = depth_to_uint16_png(prediction)
        elif self.task == "segmentation":
            labels = prediction.numpy()
            dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
            written[f"{name}_labels.png"] = Image.fromarray(labels.astype(dtype))
            written[f"{name}_overlay.png"] = overlay_segmentation(image, labels, self.model.config.id2label)
        else:
            for k, (mask, text) in enumerate(zip(prediction, texts or [], strict=True)):
                array = mask.numpy()
                written[f"{name}_ref{k}_mask.png"] = Image.fromarray((array * 255).astype(np.uint8))
                written[f"{name}_ref{k}_overlay.png"] = overlay_mask(image, array, caption=text)
        for file, picture in written.items():
            picture.save(output_dir / file)
        return list(written)


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _done(manifest: Path) -> set[str]:
    if not manifest.is_file():
        return set()
    done = set()
    for line in manifest.read_text().splitlines():
        try:
            done.add(json.loads(line)["id"])
        except (ValueError, KeyError):
            continue  # a line cut by an interruption: that item is predicted again
    return done


def _run(predictor: Predictor, items: list[tuple[str, Any, list[str] | None]], done: set[str], output_dir: Path,
         manifest: Path, batch_size: int, progress: bool, description: str) -> dict[str, int]:  # fmt: skip
    """`items`: (id, image loader or PIL image, texts). Predicts those whose id is not in `done`, in batches, and
    appends them to `manifest`."""
    from tqdm.auto import tqdm

    todo = [item for item in items if item[0] not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=description, disable=not progress)
    with manifest.open("a") as log:
        for batch in _batches(todo, batch_size):
            images = [(load() if callable(load) else load).convert("RGB") for _, load, _ in batch]
            texts = [t for _, _, t in batch] if predictor.task == "referring" else None
            predictions = predictor.predict(images, texts)
            for (item_id, _, item_texts), image, prediction in zip(batch, images, predictions, strict=True):
                files = predictor.write(image, prediction, output_dir, item_id, item_texts)
                log.write(json.dumps({"id": item_id, "files": files, **({"texts": item_texts} if item_texts else {})}))
                log.write("\n")
                log.flush()
            bar.update(len(batch))
    bar.close()
    return {"total": len(items), "predicted": len(todo), "skipped": len(items) - len(todo)}


def predict_files(
    task: str,
    model: str | Path,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    texts: Sequence[str] | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Predicts every image of `inputs` (paths, globs, folders) into `output_dir`; `texts`: the expressions asked
    about every image (referring segmentation). Returns counts of items predicted and skipped (already done)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if task == "referring" and not texts:
        raise ValueError("`texts`: referring segmentation needs at least one expression (`--text`).")
    paths = collect_images(inputs)
    names = _unique_names(paths)
    predictor = Predictor(task, model, device, dtype)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    items = [
        (name, (lambda p=path: Image.open(p)), list(texts) if texts else None)
        for name, path in zip(names, paths, strict=True)
    ]
    manifest = output / "predictions.jsonl"
    return _run(predictor, items, _done(manifest), output, manifest, batch_size, progress, f"Predicting {task}")


def _unique_names(paths: list[Path]) -> list[str]:
    """File stems, made unique with the parent folder's name where two images share one."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def predict_dataset(
    task: str,
    model: str | Path,
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
) -> dict[str, int]:
    """
    Predicts a `datasets` split (Hub id or local folder) into `output_dir`. Under `accelerate launch` each process
    takes a contiguous shard of the split and writes its own manifest `predictions-{rank}-of-{world}.jsonl`; files are
    named by the row index, so a rerun with any number of processes skips what is done.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .data.loading import load_splits

    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU; Accelerator reads it, PartialState has to be told.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
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
    predictor = Predictor(task, model, str(state.device), dtype)  # cuda:{local rank} per process
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)

    def load(index: int):
        return lambda: rows[index][image_column]

    def texts(index: int) -> list[str] | None:
        if task != "referring":
            return None
        value = rows[index][text_column]
        return [value] if isinstance(value, str) else list(value)

    items = [(f"{index:0{width}d}", load(index), texts(index)) for index in shard]
    # One manifest for all processes would need locking; each rank writes its own, and all of them count as done.
    manifest = output / f"predictions-{state.process_index}-of-{state.num_processes}.jsonl"
    done = set().union(*(_done(m) for m in output.glob("predictions-*-of-*.jsonl")))
    return _run(predictor, items, done, output, manifest, batch_size, progress and state.is_local_main_process,
                f"Predicting {task} [{state.process_index + 1}/{state.num_processes}]")  # fmt: skip


__all__ = ["IMAGE_SUFFIXES", "Predictor", "collect_images", "predict_dataset", "predict_files"]
