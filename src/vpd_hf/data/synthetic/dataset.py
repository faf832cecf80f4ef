"""Samples and datasets of the synthetic scenes: :func:`generate_scene`, :class:`SyntheticScenes`, COCO RLE, the
parquet layouts and :func:`save_synthetic_dataset` / the command line."""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..normals import encode_normals
from .raycast import _check_size
from .render import SyntheticScene, render_layout
from .scene import SCENE_TYPES, SYNTHETIC_ID2LABEL, sample_layout

if TYPE_CHECKING:  # imported inside the dataset functions: rendering alone should not pay for importing datasets
    import datasets

SPLIT_CODES: dict[str, int] = {"train": 0, "validation": 1, "test": 2}


def _check_seed(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")


def generate_scene(
    index: int, *, seed: int = 0, split: str = "train", height: int = 128, width: int = 128
) -> SyntheticScene:
    """Sample `index` of split `split` of the dataset with base seed `seed`, rendered at `height` x `width`.

    The sample depends only on `(seed, split, index)` (its generator is `np.random.default_rng([seed, split code,
    index])`), not on which other samples are generated or in which order; the layout (room, camera, objects) is the
    same at every resolution, only the sampling of the picture changes.
    """
    _check_seed("index", index)
    _check_seed("seed", seed)
    if split not in SPLIT_CODES:
        raise ValueError(f"`split` must be one of {tuple(SPLIT_CODES)}, got {split!r}.")
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    return render_layout(sample_layout(rng), height, width)


class SyntheticScenes(Sequence[SyntheticScene]):
    """A lazy, indexable dataset of `num_samples` scenes: `scenes[i] == generate_scene(i, seed=..., split=...)`."""

    def __init__(
        self, num_samples: int, *, seed: int = 0, split: str = "train", height: int = 128, width: int = 128
    ) -> None:
        _check_seed("num_samples", num_samples)
        _check_seed("seed", seed)
        _check_size(height, width)
        if split not in SPLIT_CODES:
            raise ValueError(f"`split` must be one of {tuple(SPLIT_CODES)}, got {split!r}.")
        self.num_samples, self.seed, self.split, self.height, self.width = num_samples, seed, split, height, width

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> SyntheticScene:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("`SyntheticScenes` takes integer indices, not slices.")
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return generate_scene(
            index % self.num_samples, seed=self.seed, split=self.split, height=self.height, width=self.width
        )

    def __iter__(self) -> Iterator[SyntheticScene]:
        return (self[i] for i in range(self.num_samples))


def rle_encode(mask: np.ndarray) -> dict[str, list[int]]:
    """Uncompressed COCO run-length encoding of a binary mask.

    The mask `(H, W)` (any dtype; non-zero = foreground) is read in column-major (Fortran) order -- down the first
    column, then the second... -- and cut into runs of equal values; `counts` lists the run lengths, alternating
    background and foreground and always starting with background (a leading 0 when the first pixel is foreground).
    This is the `{"size": [H, W], "counts": [...]}` form that `pycocotools.mask.frPyObjects` accepts.

    Example: `[[0, 1], [1, 1]]` reads 0, 1, 1, 1 and encodes as `{"size": [2, 2], "counts": [1, 3]}`.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be a 2-D array (H, W), got shape {mask.shape}.")
    flat = mask.ravel(order="F") != 0
    if flat.size == 0:
        counts: list[int] = []
    else:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(np.concatenate(([0], change, [flat.size])))
        counts = ([0] if flat[0] else []) + runs.tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: the `(H, W)` bool mask of an uncompressed COCO RLE dict."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise TypeError(f"`rle` must be a dict with 'size' and 'counts', got {type(rle).__name__}.")
    if isinstance(rle["counts"], str | bytes):
        raise ValueError("`rle['counts']` is compressed (a string); only uncompressed run lengths are supported.")
    size = [int(s) for s in rle["size"]]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if len(size) != 2 or min(size) < 0:
        raise ValueError(f"`rle['size']` must be [H, W] with H, W >= 0, got {rle['size']}.")
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != size[0] * size[1]:
        raise ValueError(f"`rle['counts']` must be non-negative run lengths summing to H * W = {size[0] * size[1]}.")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(size, order="F")


def scene_features() -> datasets.Features:
    """Columns of the `scenes` configuration: `image` (RGB), `depth_map` (mode "F", z-depth in metres),
    `annotation` (mode "L", :data:`SYNTHETIC_ID2LABEL`), `scene`, `instance_mask` (mode "I;16"), `objects` (one
    struct per object; `bbox` is [] for an object out of view, `center_camera` in metres) and `normal_map` (RGB PNG,
    surface normals in Marigold's camera frame, encoded as :func:`vpd_hf.data.normals.encode_normals`)."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "depth_map": datasets.Image(),
            "annotation": datasets.Image(),
            "scene": datasets.Value("string"),
            "instance_mask": datasets.Image(),
            "objects": datasets.List(
                {
                    "instance_id": datasets.Value("int32"),
                    "kind": datasets.Value("string"),
                    "color": datasets.Value("string"),
                    "size": datasets.Value("string"),
                    "pixel_count": datasets.Value("int32"),
                    "bbox": datasets.List(datasets.Value("float32")),
                    "center_camera": datasets.List(datasets.Value("float32")),
                }
            ),
            "normal_map": datasets.Image(),
        }
    )


def refcoco_columns() -> dict[str, Any]:
    """The columns every referring dataset here shares (the RefCOCO layout): `image`, `answer` (the expressions),
    `segmentation` (uncompressed COCO RLE, see :func:`rle_encode`), `bbox` (COCO [x, y, w, h]), `image_id`, `ref_id`."""
    import datasets

    return {
        "image": datasets.Image(),
        "answer": datasets.List(datasets.Value("string")),
        "segmentation": {
            "size": datasets.List(datasets.Value("int32")),
            "counts": datasets.List(datasets.Value("int64")),
        },
        "bbox": datasets.List(datasets.Value("float32")),
        "image_id": datasets.Value("int64"),
        "ref_id": datasets.Value("int64"),
    }


def referring_features() -> datasets.Features:
    """Columns of the `referring` configuration: those of :func:`refcoco_columns` (`image_id` is the row of the image
    in the same split of `scenes`), then `scene`, `instance_id` (its value in `instance_mask`) and `category` (its
    kind)."""
    import datasets

    extra = {"scene": datasets.Value("string"), "instance_id": datasets.Value("int32"),
             "category": datasets.Value("string")}  # fmt: skip
    return datasets.Features({**refcoco_columns(), **extra})


def _scene_row(sample: SyntheticScene) -> dict[str, Any]:
    return {
        "image": Image.fromarray(sample.image),
        "depth_map": Image.fromarray(sample.depth),  # mode "F"; datasets stores it as a float32 TIFF
        "annotation": Image.fromarray(sample.semantic),  # mode "L"
        "scene": sample.scene,
        # Mode "I;16". Encoded here as a 16-bit PNG: datasets would pick an uncompressed TIFF, ~50x larger.
        "instance_mask": {"bytes": _png_bytes(Image.fromarray(sample.instances)), "path": None},
        "objects": [
            {
                "instance_id": r.instance_id,
                "kind": r.kind,
                "color": r.color,
                "size": r.size,
                "pixel_count": r.pixel_count,
                "bbox": [] if r.bbox is None else list(r.bbox),
                "center_camera": list(r.center_camera),
            }
            for r in sample.objects
        ],
        "normal_map": {"bytes": _png_bytes(Image.fromarray(encode_normals(sample.normals))), "path": None},
    }


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _referring_rows(sample: SyntheticScene, image_id: int, first_ref_id: int) -> list[dict[str, Any]]:
    rows = []
    image = Image.fromarray(sample.image)
    for record in sample.objects:
        expressions = sample.referring.get(record.instance_id, ())
        if not expressions:
            continue
        rows.append(
            {
                "image": image,
                "answer": list(expressions),
                "segmentation": rle_encode(sample.instances == record.instance_id),
                "bbox": list(record.bbox),
                "image_id": image_id,
                "ref_id": first_ref_id + len(rows),
                "scene": sample.scene,
                "instance_id": record.instance_id,
                "category": record.kind,
            }
        )
    return rows


def _check_counts(num_train: int, num_validation: int) -> None:
    _check_seed("num_train", num_train)
    _check_seed("num_validation", num_validation)


def _iter_split_rows(
    split: str, num_samples: int, seed: int, height: int, width: int, progress: bool
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """`(scene row, referring rows)` for every sample of a split; `image_id` is the sample index."""
    ref_id = 0
    samples = range(num_samples)
    for index in tqdm(samples, desc=f"synthetic {split}", unit="img", disable=not progress):
        sample = generate_scene(index, seed=seed, split=split, height=height, width=width)
        refs = _referring_rows(sample, index, ref_id)
        ref_id += len(refs)
        yield _scene_row(sample), refs


def _rows_to_dataset(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    import datasets

    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def make_synthetic_dataset(
    num_train: int = 100,
    num_validation: int = 20,
    height: int = 128,
    width: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, datasets.DatasetDict]:
    """The synthetic dataset in memory: `{"scenes": DatasetDict, "referring": DatasetDict}`, each with the splits
    `train` and `validation` (columns: see :func:`scene_features`, :func:`referring_features` and the README written
    by :func:`save_synthetic_dataset`)."""
    import datasets

    _check_counts(num_train, num_validation)
    _check_seed("seed", seed)
    _check_size(height, width)
    scenes, referring = {}, {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        scene_rows, ref_rows = [], []
        for scene_row, refs in _iter_split_rows(split, count, seed, height, width, progress):
            scene_rows.append(scene_row)
            ref_rows.extend(refs)
        scenes[split] = _rows_to_dataset(scene_rows, scene_features())
        referring[split] = _rows_to_dataset(ref_rows, referring_features())
    return {"scenes": datasets.DatasetDict(scenes), "referring": datasets.DatasetDict(referring)}


_README = """---
configs:
- config_name: scenes
  data_files:
  - split: train
    path: scenes/train-*.parquet
  - split: validation
    path: scenes/validation-*.parquet
- config_name: referring
  data_files:
  - split: train
    path: referring/train-*.parquet
  - split: validation
    path: referring/validation-*.parquet
---
# vpd_hf synthetic indoor scenes

Procedural box rooms with 2 to 8 objects on the floor, rendered by `vpd_hf.data.synthetic` (NumPy ray casting)
at {height} x {width} pixels with seed {seed}: {num_train} training and {num_validation} validation images;
{refs_train} training and {refs_validation} validation referring rows. Regenerate with

    python -m vpd_hf.data.synthetic --output DIR --num-train {num_train} --num-validation {num_validation} \\
        --height {height} --width {width} --seed {seed}

Load with `datasets.load_dataset("parquet", data_dir=DIR + "/scenes")` (or `/referring`), or, once uploaded,
`datasets.load_dataset(REPO, "scenes")`. (`load_dataset(DIR, "scenes")` also works, but datasets caches local folders
of that form by folder name: two local copies with the same name would share one cache.)

## `scenes`: one row per image (NYUv2 `sayakpaul/nyu_depth_v2` + ADE20K `scene_parse_150` layouts)

| column | type | content |
|---|---|---|
| `image` | Image (RGB) | the picture |
| `depth_map` | Image (mode "F", float32 TIFF) | z-depth in metres (along the optical axis), > 0 everywhere |
| `annotation` | Image (mode "L") | semantic labels, see `id2label.json`; 0 = other (unused) |
| `scene` | string | room type: {scene_types} |
| `instance_mask` | Image (mode "I;16", 16-bit PNG) | k = object k (1-based), 0 = no object |
| `normal_map` | Image (RGB PNG) | surface normals in the camera frame (+x right, +y up, +z towards the camera, diffusers' Marigold convention), 8-bit: `n = rgb / 127.5 - 1`, exact up to that quantisation (about 0.4 degrees); the NYUv2 normals layout |
| `objects` | list of structs | per object: `instance_id`, `kind`, `color`, `size` (small/large), `pixel_count`, `bbox` ([x, y, w, h] pixels, [] if not visible), `center_camera` ([x, y, z] metres in the camera frame: x right, y down, z forward) |

Camera: NYUv2 Kinect field of view, fx = 518.8579 * W / 640, fy = 519.4696 * H / 480, principal point (W / 2, H / 2).

## `referring`: one row per object with at least one unambiguous expression (`lmms-lab/RefCOCO` layout)

| column | type | content |
|---|---|---|
| `image` | Image (RGB) | the picture |
| `answer` | list of strings | referring expressions, each satisfied by exactly this one visible object |
| `segmentation` | {{"size": [H, W], "counts": [...]}} | the object's visible mask as uncompressed COCO RLE: run lengths over the mask in column-major (Fortran) order, alternating background / foreground, starting with background |
| `bbox` | list of float32 | COCO box [x, y, w, h] in pixels |
| `image_id` | int64 | index of the image in the same split of `scenes` |
| `ref_id` | int64 | index of the referent within the split |
| `scene` | string | room type |
| `instance_id` | int32 | the object's value in that image's `instance_mask` |
| `category` | string | the object's kind |
"""


def save_synthetic_dataset(
    output_dir: str | Path,
    num_train: int = 100,
    num_validation: int = 20,
    height: int = 128,
    width: int = 128,
    seed: int = 0,
    shard_size: int = 1000,
    progress: bool = True,
) -> Path:
    """Writes the synthetic dataset as parquet under `output_dir`, in shards of `shard_size` images:

    * `scenes/{train,validation}-XXXXX-of-YYYYY.parquet` (columns: :func:`scene_features`),
    * `referring/{train,validation}-XXXXX-of-YYYYY.parquet` (columns: :func:`referring_features`; shard k holds the
      referents of the images of scenes shard k),
    * `id2label.json` (the semantic classes) and `README.md` (the columns, plus a `configs` header so that
      `datasets.load_dataset(output_dir, "scenes")` works).

    Returns:
        `output_dir` as a Path.
    """
    _check_counts(num_train, num_validation)
    _check_seed("seed", seed)
    _check_size(height, width)
    _check_seed("shard_size", shard_size)
    if shard_size < 1:
        raise ValueError(f"`shard_size` must be >= 1, got {shard_size}.")
    output_dir = Path(output_dir)
    for config in ("scenes", "referring"):
        (output_dir / config).mkdir(parents=True, exist_ok=True)
        for stale in (output_dir / config).glob("*.parquet"):  # a smaller rerun must not leave old shards behind
            stale.unlink()
    ref_counts = {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        num_shards = max(1, math.ceil(count / shard_size))
        rows = _iter_split_rows(split, count, seed, height, width, progress)
        ref_counts[split] = 0
        for shard in range(num_shards):
            scene_rows, ref_rows = [], []
            for _ in range(min(shard_size, count - shard * shard_size)):
                scene_row, refs = next(rows)
                scene_rows.append(scene_row)
                ref_rows.extend(refs)
            name = f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
            _rows_to_dataset(scene_rows, scene_features()).to_parquet(str(output_dir / "scenes" / name))
            _rows_to_dataset(ref_rows, referring_features()).to_parquet(str(output_dir / "referring" / name))
            ref_counts[split] += len(ref_rows)
    (output_dir / "id2label.json").write_text(
        json.dumps({str(k): v for k, v in SYNTHETIC_ID2LABEL.items()}, indent=2) + "\n"
    )
    readme = _README.format(
        height=height,
        width=width,
        seed=seed,
        num_train=num_train,
        num_validation=num_validation,
        refs_train=ref_counts["train"],
        refs_validation=ref_counts["validation"],
        scene_types=", ".join(SCENE_TYPES),
    )
    (output_dir / "README.md").write_text(readme)
    return output_dir


def main(argv: Sequence[str] | None = None, prog: str = "python -m vpd_hf.data.synthetic") -> Path:
    """Command line: `python -m vpd_hf.data.synthetic --output DIR ...` (see `--help`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Render the offline synthetic indoor-scene dataset (depth, surface normals, semantic and "
        "referring segmentation) "
        "and write it as parquet.",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write scenes/, referring/ and README.md")
    parser.add_argument("--num-train", type=int, default=100, help="number of training images (default: 100)")
    parser.add_argument("--num-validation", type=int, default=20, help="number of validation images (default: 20)")
    parser.add_argument("--height", type=int, default=128, help="image height in pixels (default: 128)")
    parser.add_argument("--width", type=int, default=128, help="image width in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample i uses (seed, split, i) (default: 0)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per parquet file (default: 1000)")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    args = parser.parse_args(argv)
    try:
        return save_synthetic_dataset(
            args.output,
            num_train=args.num_train,
            num_validation=args.num_validation,
            height=args.height,
            width=args.width,
            seed=args.seed,
            shard_size=args.shard_size,
            progress=not args.no_progress,
        )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
