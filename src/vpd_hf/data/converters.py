"""Raw dataset releases -> parquet `DatasetDict`s in the Hub column layouts the adapters read.

Every converter writes `OUTPUT/data/{split}-NNNNN-of-MMMMM.parquet` shards with `datasets.Image` columns (the
original image files embedded byte for byte where possible) and a `README.md` whose `configs` header names the splits,
so that both `datasets.load_dataset(OUTPUT)` and `datasets.load_dataset("parquet", data_dir=OUTPUT)` load it and
`DatasetDict.push_to_hub` / `huggingface-cli upload` can publish it as is.

* :func:`convert_ade20k`: `ADEChallengeData2016/{images,annotations}/{training,validation}` -> splits `train`,
  `validation` with `image` (JPEG) and `annotation` (PNG, mode "L", 0 = other), as `scene_parse_150`.
* :func:`convert_nyu`: NYUv2 -> `image`, `depth_map` (mode "F" metres, deflate-compressed TIFF; or 16-bit PNG
  millimetres with `depth_format="uint16"`), `scene`, as `sayakpaul/nyu_depth_v2` plus the scene. Training split from
  the BTS "sync" folder and its list file (`rgb_path depth_path focal` per line, depth PNG in millimetres, scene = the
  folder name); test split (654 images) from `nyu_depth_v2_labeled.mat` (HDF5 / MAT v7.3, needs `h5py`) and the
  `testNdxs` of `splits.mat`, exactly as BTS's `extract_official_train_test_set_from_mat.py` built the
  `official_splits/test` folder VPD evaluates on: depth from `rawDepths`, scene from `sceneTypes`, and the picture
  blacked out outside rows 7:474 / columns 7:632 (`black_boundary`). Pictures are stored as PNG (lossless; BTS wrote
  JPEG). With `normals_dir`, the test images' surface normals (the GeoNet NYUv2 normals, one 8-bit PNG per image) are
  added as `normal_map`.
* :func:`convert_refcoco`: RefCOCO / RefCOCO+ / RefCOCOg annotations + COCO `train2014` pictures -> one row per
  referent with `image` (the COCO JPEG), `answer` (its expressions, the refer API's `sent`), `segmentation` (the mask
  as uncompressed COCO RLE, `{"size": [H, W], "counts": [...]}`), `bbox` (COCO `[x, y, w, h]`), `image_id`, `ref_id`,
  `split` -- the layout of `lmms-lab/RefCOCO` and of the synthetic `referring` config, for every split including
  train. Annotations come from the `jxu124/refcoco` parquet files (`raw_anns` etc.) or from COCO `instances.json`
  plus a refs export (JSON list, JSON lines or parquet with `ref_id`, `ann_id`, `image_id`, `split`, `sentences`); the
  refer package's pickles are deliberately not read. Polygons are rasterised once here (pixel-centre even-odd rule,
  :func:`vpd_hf.data.referring.polygons_to_mask`), so the adapter needs no pycocotools.

Idempotence: shards are written to a temporary file and renamed, so a shard file that exists is complete. A rerun
**skips shards that already exist** (an interrupted conversion resumes where it stopped); shards of a split that the
new run would not write (a different shard count) are deleted. `overwrite=True` deletes the split's shards first and
rewrites everything. The shard a row lands in depends only on the sorted input list and `shard_size`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

__all__ = [
    "DEPTH_FORMATS",
    "NYU_BLACK_BOUNDARY",
    "NYU_NORMALS_PATTERN",
    "ade20k_features",
    "convert_ade20k",
    "convert_nyu",
    "convert_refcoco",
    "nyu_features",
    "read_nyu_train_list",
    "refcoco_features",
]

DEPTH_FORMATS = ("float32", "uint16")
# BTS keeps rows 7:474 and columns 7:632 of the labeled pictures and blacks out the rest (the Kinect border).
NYU_BLACK_BOUNDARY = (slice(7, 474), slice(7, 632))

# --------------------------------------------------------------------------------------------------------------------
# Shared writing
# --------------------------------------------------------------------------------------------------------------------


def _check_shard_size(shard_size: int) -> int:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"`shard_size` must be a positive integer, got {shard_size!r}.")
    return shard_size


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _float_tiff_bytes(depth: np.ndarray) -> bytes:
    """float32 `(H, W)` -> a mode "F" TIFF, deflate-compressed (datasets would write it uncompressed, 4 B/pixel)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(depth, dtype=np.float32), mode="F").save(
        buffer, format="TIFF", compression="tiff_adobe_deflate"
    )
    return buffer.getvalue()


def _image_cell(data: bytes, name: str | None = None) -> dict[str, Any]:
    return {"bytes": data, "path": name}


def _write_splits(
    output_dir: Path,
    splits: dict[str, Sequence[Any]],
    make_row: Callable[[Any], dict[str, Any]],
    features: datasets.Features,
    *,
    shard_size: int,
    overwrite: bool,
    progress: bool,
    title: str,
    description: str,
) -> Path:
    """Writes `splits` (split name -> work items, in order) as parquet shards under `output_dir/data` plus a README;
    `make_row(item)` builds one row. See the module docstring for the skip / overwrite rules."""
    import datasets
    from tqdm.auto import tqdm

    data_dir = output_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob("*.parquet.tmp"):
        stale.unlink()
    for split, items in splits.items():
        if not re.fullmatch(r"\w+", split):
            raise ValueError(f"Split names must be letters, digits or '_', got {split!r}.")
        num_shards = math.ceil(len(items) / shard_size)
        names = [f"{split}-{k:05d}-of-{num_shards:05d}.parquet" for k in range(num_shards)]
        for existing in data_dir.glob(f"{split}-[0-9]*-of-[0-9]*.parquet"):
            if overwrite or existing.name not in names:
                existing.unlink()
        if not items:
            logger.warning("split %r has no rows: nothing written", split)
            continue
        skipped = 0
        with tqdm(total=len(items), desc=f"{title} {split}", unit="row", disable=not progress) as bar:
            for k, name in enumerate(names):
                chunk = items[k * shard_size : (k + 1) * shard_size]
                target = data_dir / name
                if target.exists():
                    skipped += 1
                    bar.update(len(chunk))
                    continue
                rows = []
                for item in chunk:
                    rows.append(make_row(item))
                    bar.update(1)
                columns = {column: [row[column] for row in rows] for column in features}
                temporary = target.with_name(target.name + ".tmp")
                datasets.Dataset.from_dict(columns, features=features).to_parquet(str(temporary))
                os.replace(temporary, target)  # atomic: an existing shard is always a complete one
        if skipped:
            logger.info("split %r: %d of %d shards already existed and were kept", split, skipped, num_shards)
    _write_readme(output_dir, title, description)
    return output_dir


def _write_readme(output_dir: Path, title: str, description: str) -> None:
    """README.md with a `configs` header listing every split that has shards in `output_dir/data` (also those of
    earlier runs, e.g. NYUv2's train and test splits converted separately) and their row counts."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for path in sorted((output_dir / "data").glob("*-[0-9]*-of-[0-9]*.parquet")):
        split = path.name.rsplit("-", 3)[0]
        counts[split] = counts.get(split, 0) + pq.ParquetFile(path).metadata.num_rows
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in counts:
        lines += [f"  - split: {split}", f"    path: data/{split}-*.parquet"]
    lines += ["---", f"# {title}", "", description, "", "| split | rows |", "|---|---|"]
    lines += [f"| {split} | {count} |" for split, count in counts.items()]
    (output_dir / "README.md").write_text("\n".join(lines) + "\n")


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and `(width, height)` of an image file, reading only its header."""
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable image ({error}).") from error


# --------------------------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------------------------

ADE20K_SPLITS = {"train": "training", "validation": "validation"}


def ade20k_features() -> datasets.Features:
    """`image` (RGB JPEG) and `annotation` (mode "L" PNG, 0 = other, 1..150 = classes)."""
    import datasets

    return datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})


def _ade20k_pairs(root: Path, folder: str) -> list[tuple[Path, Path]]:
    image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise ValueError(f"Expected the folders {image_dir} and {label_dir} (the ADEChallengeData2016 release layout).")
    images = sorted(image_dir.glob("*.jpg"))
    labels = {path.stem: path for path in label_dir.glob("*.png")}
    missing = [path.name for path in images if path.stem not in labels]
    if missing:
        raise ValueError(f"{len(missing)} images of {image_dir} have no annotation in {label_dir}: {missing[:5]}...")
    return [(path, labels[path.stem]) for path in images]


def _ade20k_row(pair: tuple[Path, Path]) -> dict[str, Any]:
    image_path, label_path = pair
    _, image_size = _header(image_path)
    label_mode, label_size = _header(label_path)
    if label_mode not in ("L", "P"):
        raise ValueError(f"{label_path} has mode {label_mode!r}; ADE20K annotations are 8-bit ('L').")
    if label_size != image_size:
        raise ValueError(f"{label_path} is {label_size} but {image_path} is {image_size} (W, H).")
    return {
        "image": _image_cell(image_path.read_bytes(), image_path.name),
        "annotation": _image_cell(label_path.read_bytes(), label_path.name),
    }


def convert_ade20k(
    root: str | Path,
    output_dir: str | Path,
    *,
    splits: Sequence[str] = ("train", "validation"),
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """ADE20K (SceneParsing, `ADEChallengeData2016`) -> parquet splits `train` (20,210 rows) / `validation` (2,000).

    Args:
        root: the `ADEChallengeData2016` folder (with `images/` and `annotations/`).
        output_dir: where to write `data/*.parquet` and `README.md`.
        splits: which of `train`, `validation` to convert.
        shard_size: rows per parquet file.
        overwrite: rewrite existing shards (default: keep them, see the module docstring).
        progress: show progress bars.

    Returns:
        `output_dir` as a Path.
    """
    root, output_dir = Path(root), Path(output_dir)
    _check_shard_size(shard_size)
    unknown = [s for s in splits if s not in ADE20K_SPLITS]
    if unknown or not splits:
        raise ValueError(f"`splits` must be a non-empty subset of {tuple(ADE20K_SPLITS)}, got {list(splits)!r}.")
    work = {split: _ade20k_pairs(root, ADE20K_SPLITS[split]) for split in splits}
    return _write_splits(
        output_dir,
        work,
        _ade20k_row,
        ade20k_features(),
        shard_size=shard_size,
        overwrite=overwrite,
        progress=progress,
        title="ADE20K",
        description="ADE20K SceneParsing (ADEChallengeData2016): `image` (RGB JPEG), `annotation` (PNG, mode L; "
        "0 = other, k = class k of the 150). Written by `vpd_hf.data.converters.convert_ade20k`.",
    )


# --------------------------------------------------------------------------------------------------------------------
# NYUv2
# --------------------------------------------------------------------------------------------------------------------


def nyu_features(normals: bool = False) -> datasets.Features:
    """`image` (RGB), `depth_map` (mode "F" metres, or 16-bit millimetres), `scene` (scene name or folder) and, with
    `normals`, `normal_map` (8-bit RGB normals in Marigold's camera frame, :mod:`vpd_hf.data.normals`; None for an
    image without normals)."""
    import datasets

    columns = {"image": datasets.Image(), "depth_map": datasets.Image(), "scene": datasets.Value("string")}
    return datasets.Features(columns | ({"normal_map": datasets.Image()} if normals else {}))


NYU_NORMALS_PATTERN = "{position:06d}_normal.png"


class _NormalFiles:
    """Normal maps of the test images, one 8-bit RGB PNG per image (see :func:`convert_nyu`)."""

    def __init__(self, folder: Path, pattern: str, convention: str) -> None:
        from .normals import NORMAL_CONVENTIONS

        if not folder.is_dir():
            raise ValueError(f"`normals_dir` {folder} is not a folder.")
        if convention not in NORMAL_CONVENTIONS:
            raise ValueError(f"`normals_convention` must be one of {tuple(NORMAL_CONVENTIONS)}, got {convention!r}.")
        try:
            pattern.format(position=0, index=1)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"`normals_pattern` {pattern!r} may only use {{position}} and {{index}}: {error}"
            ) from None
        self.folder, self.pattern = folder, pattern
        self.flips = [axis for axis, sign in enumerate(NORMAL_CONVENTIONS[convention]) if sign < 0]
        self.missing: list[str] = []

    def __call__(self, position: int, index: int, shape: tuple[int, int]) -> dict[str, Any] | None:
        path = self.folder / self.pattern.format(position=position, index=index)
        if not path.is_file():
            self.missing.append(path.name)
            return None
        with Image.open(path) as image:
            if image.mode != "RGB":
                raise ValueError(f"{path}: a normal map must be an 8-bit RGB image, got mode {image.mode!r}.")
            encoded = np.asarray(image)
        if encoded.shape[:2] != shape:
            raise ValueError(f"{path}: normal map {encoded.shape[:2]} and image {shape} differ in size.")
        if not self.flips:  # already in Marigold's frame: the file's bytes, unchanged
            return _image_cell(path.read_bytes(), path.name)
        # Negating a component is c -> 255 - c exactly in the (n + 1) * 127.5 encoding; (0, 0, 0) stays invalid.
        converted = encoded.copy()
        valid = encoded.any(axis=-1)
        for axis in self.flips:
            converted[..., axis] = np.where(valid, 255 - encoded[..., axis], 0)
        return _image_cell(_png_bytes(Image.fromarray(converted)), path.name)


def read_nyu_train_list(list_file: str | Path, sync_root: str | Path) -> list[tuple[Path, Path, str]]:
    """`(rgb_path, depth_path, scene)` for every line `rgb_path depth_path focal` of a BTS list file; paths are
    relative to `sync_root` (a leading "/" is ignored, as the official code concatenates strings), the scene is the
    folder name (e.g. `kitchen_0028b`)."""
    list_file, sync_root = Path(list_file), Path(sync_root)
    if not list_file.is_file():
        raise ValueError(f"`train_list` {list_file} does not exist.")
    if not sync_root.is_dir():
        raise ValueError(f"`sync_root` {sync_root} is not a folder.")
    entries = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise ValueError(f"{list_file}:{number}: expected 'rgb_path depth_path [focal]', got {line!r}.")
        rgb, depth = sync_root / parts[0].lstrip("/"), sync_root / parts[1].lstrip("/")
        entries.append((rgb, depth, rgb.parent.name))
    missing = [str(p) for entry in entries for p in entry[:2] if not p.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} files of {list_file} are missing under {sync_root}: {missing[:5]}...")
    return entries


def _depth_cell(depth_m: np.ndarray, depth_format: str) -> dict[str, Any]:
    if depth_format == "float32":
        return _image_cell(_float_tiff_bytes(depth_m))
    millimetres = np.clip(np.floor(depth_m.astype(np.float64) * 1000.0), 0, 65535).astype(np.uint16)
    return _image_cell(_png_bytes(Image.fromarray(millimetres)))


def _nyu_sync_row(entry: tuple[Path, Path, str], depth_format: str) -> dict[str, Any]:
    rgb, depth_path, scene = entry
    _header(rgb)
    with Image.open(depth_path) as depth_image:
        if depth_image.mode not in ("I;16", "I;16L", "I;16B", "I"):
            raise ValueError(f"{depth_path} has mode {depth_image.mode!r}; BTS depth maps are 16-bit PNGs (mm).")
        if depth_format == "uint16":
            depth_cell = _image_cell(depth_path.read_bytes(), depth_path.name)
        else:
            depth_cell = _image_cell(_float_tiff_bytes(np.asarray(depth_image).astype(np.float32) / 1000.0))
    return {"image": _image_cell(rgb.read_bytes(), rgb.name), "depth_map": depth_cell, "scene": scene}


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as error:
        raise ImportError(
            "Reading nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5) needs h5py: `pip install h5py`."
        ) from error
    return h5py


def _mat_strings(handle: Any, name: str) -> list[str]:
    """A MATLAB cell array of strings in a v7.3 file: object references to uint16 character arrays."""
    references = np.asarray(handle[name]).ravel()
    return ["".join(chr(int(c)) for c in np.asarray(handle[ref]).ravel()) for ref in references]


def _read_test_indices(splits_mat: str | Path) -> list[int]:
    """The 1-based `testNdxs` of the NYUv2 `splits.mat` (MATLAB v5 via scipy, or v7.3 via h5py)."""
    path = Path(splits_mat)
    if not path.is_file():
        raise ValueError(f"`splits_mat` {path} does not exist.")
    with path.open("rb") as handle:
        head = handle.read(520)
    # An HDF5 signature at offset 0 (plain HDF5) or 512 (MATLAB v7.3, after its text header).
    is_hdf5 = _HDF5_SIGNATURE in (head[:8], head[512:520])
    if is_hdf5:
        with _import_h5py().File(path, "r") as handle:
            values = np.asarray(handle["testNdxs"])
    else:
        try:
            from scipy.io import loadmat
        except ImportError as error:
            raise ImportError("Reading splits.mat (MATLAB v5) needs scipy: `pip install scipy`.") from error
        values = loadmat(str(path))["testNdxs"]
    return [int(v) for v in np.asarray(values).ravel()]


class _LabeledMat:
    """Row maker for the labeled .mat (kept open while the shards are written; call :meth:`close`)."""

    def __init__(self, path: Path, depth_key: str, depth_format: str, black_boundary: bool) -> None:
        self.path, self.depth_format, self.black_boundary = path, depth_format, black_boundary
        self.handle = _import_h5py().File(path, "r")
        if "images" not in self.handle:
            self.handle.close()
            raise ValueError(f"{path} has no 'images' dataset; is it nyu_depth_v2_labeled.mat?")
        if depth_key == "auto":
            depth_key = "rawDepths" if "rawDepths" in self.handle else "depths"
        if depth_key not in self.handle:
            self.handle.close()
            raise ValueError(f"{path} has no {depth_key!r} dataset (have {sorted(self.handle)}).")
        self.depth_key = depth_key
        scene_key = "sceneTypes" if "sceneTypes" in self.handle else "scenes" if "scenes" in self.handle else None
        self.scenes = _mat_strings(self.handle, scene_key) if scene_key else None
        self.count = int(self.handle["images"].shape[0])

    def __call__(self, index: int) -> dict[str, Any]:
        # h5py sees MATLAB's column-major arrays transposed: images (N, 3, W, H), depths (N, W, H).
        image = np.ascontiguousarray(np.asarray(self.handle["images"][index]).transpose(2, 1, 0), dtype=np.uint8)
        if self.black_boundary:
            kept = image[NYU_BLACK_BOUNDARY].copy()
            image = np.zeros_like(image)
            image[NYU_BLACK_BOUNDARY] = kept
        depth = np.asarray(self.handle[self.depth_key][index], dtype=np.float32).T
        return {
            "image": _image_cell(_png_bytes(Image.fromarray(image)), f"rgb_{index:05d}.png"),
            "depth_map": _depth_cell(depth, self.depth_format),
            "scene": self.scenes[index] if self.scenes else "",
        }

    def close(self) -> None:
        self.handle.close()


def convert_nyu(
    output_dir: str | Path,
    *,
    sync_root: str | Path | None = None,
    train_list: str | Path | None = None,
    labeled_mat: str | Path | None = None,
    splits_mat: str | Path | None = None,
    test_indices: Sequence[int] | None = None,
    train_split: str = "train",
    test_split: str = "validation",
    depth_format: str = "float32",
    depth_key: str = "auto",
    black_boundary: bool = True,
    normals_dir: str | Path | None = None,
    normals_pattern: str = NYU_NORMALS_PATTERN,
    normals_convention: str = "marigold",
    shard_size: int = 500,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """NYUv2 -> parquet: the BTS "sync" training set (24,231 rows with the official list) and/or the 654 official test
    images of the labeled .mat, optionally with the commonly used surface-normal ground truth of the test images.

    Args:
        output_dir: where to write `data/*.parquet` and `README.md`.
        sync_root: the BTS `sync` folder; with `train_list` (e.g. VPD's `nyudepthv2/train_list.txt`).
        train_list: list file, lines `rgb_path depth_path focal` relative to `sync_root`.
        labeled_mat: `nyu_depth_v2_labeled.mat` (needs h5py); with `splits_mat` or `test_indices`.
        splits_mat: the official `splits.mat` (its `testNdxs`, 1-based).
        test_indices: 1-based indices of the test images, instead of `splits_mat`.
        train_split, test_split: split names to write (default `train` / `validation`, the names of
            `sayakpaul/nyu_depth_v2`, whose validation split is the same 654 images).
        depth_format: `"float32"` (mode "F" metres, compressed TIFF: the Hub layout) or `"uint16"` (16-bit PNG in
            millimetres, 3-4x smaller; the training list's PNGs are then copied unchanged).
        depth_key: labeled .mat depth dataset: `"rawDepths"` (what BTS/VPD evaluate on), `"depths"` (in-painted), or
            `"auto"` (`rawDepths` when present).
        black_boundary: black out the test pictures outside rows 7:474 / columns 7:632, as BTS did.
        normals_dir: a folder with one normal map per test image (the GeoNet NYUv2 normals as distributed with the
            DSINE / Bae et al. evaluation sets, `{position:06d}_normal.png`): 8-bit RGB PNGs of the image's size
            (480 x 640), `n = rgb / 127.5 - 1`, `(0, 0, 0)` = no normal. Adds the `normal_map` column (Marigold's
            frame, :mod:`vpd_hf.data.normals`) to every split; training rows and test images without a file get None
            (the number is logged). Needs `labeled_mat`.
        normals_pattern: file name of the test image at 0-based `{position}` of the test list (its 1-based index in
            the .mat is `{index}`).
        normals_convention: frame of the files, `"marigold"` (x right, y up, z towards the camera: copied byte for
            byte) or `"opencv"` (x right, y down, z away from the camera: y and z negated exactly in the 8-bit
            encoding). Check a file first: a floor should come out with +y (green high in Marigold's frame).
        shard_size: rows per parquet file.
        overwrite: rewrite existing shards (default: keep them).
        progress: show progress bars.

    Returns:
        `output_dir` as a Path.
    """
    output_dir = Path(output_dir)
    _check_shard_size(shard_size)
    if depth_format not in DEPTH_FORMATS:
        raise ValueError(f"`depth_format` must be one of {DEPTH_FORMATS}, got {depth_format!r}.")
    if depth_key not in ("auto", "rawDepths", "depths"):
        raise ValueError(f"`depth_key` must be 'auto', 'rawDepths' or 'depths', got {depth_key!r}.")
    if (sync_root is None) != (train_list is None):
        raise ValueError("`sync_root` and `train_list` go together (the training set needs both).")
    if labeled_mat is None and (splits_mat is not None or test_indices is not None):
        raise ValueError("`splits_mat` / `test_indices` need `labeled_mat`.")
    if labeled_mat is not None and (splits_mat is None) == (test_indices is None):
        raise ValueError("With `labeled_mat`, give exactly one of `splits_mat` and `test_indices`.")
    if sync_root is None and labeled_mat is None:
        raise ValueError("Nothing to convert: give `sync_root` + `train_list` and/or `labeled_mat` + `splits_mat`.")
    if train_split == test_split:
        raise ValueError(f"`train_split` and `test_split` must differ, both are {train_split!r}.")
    if normals_dir is not None and labeled_mat is None:
        raise ValueError("`normals_dir` holds normals of the test images: it needs `labeled_mat`.")
    normals = _NormalFiles(Path(normals_dir), normals_pattern, normals_convention) if normals_dir is not None else None

    work: dict[str, list[Any]] = {}
    if sync_root is not None:
        work[train_split] = read_nyu_train_list(train_list, sync_root)  # type: ignore[arg-type]
    labeled: _LabeledMat | None = None
    if labeled_mat is not None:
        path = Path(labeled_mat)
        if not path.is_file():
            raise ValueError(f"`labeled_mat` {path} does not exist.")
        indices = list(test_indices) if test_indices is not None else _read_test_indices(splits_mat)  # type: ignore[arg-type]
        labeled = _LabeledMat(path, depth_key, depth_format, black_boundary)
        bad = [i for i in indices if not 1 <= int(i) <= labeled.count]
        if bad or not indices:
            labeled.close()
            raise ValueError(f"Test indices must be 1-based in [1, {labeled.count}], got {bad[:5] or indices}.")
        work[test_split] = [int(i) - 1 for i in indices]  # 0-based rows of the .mat

    positions = {row: position for position, row in enumerate(work.get(test_split, []))}

    def make_row(item: Any) -> dict[str, Any]:
        # Training items are (rgb, depth, scene) tuples of the list file, test items row numbers of the .mat.
        if isinstance(item, int):
            assert labeled is not None
            row = labeled(item)
            if normals is not None:
                shape = tuple(labeled.handle["images"].shape[:1:-1])  # (N, 3, W, H) -> (H, W)
                row["normal_map"] = normals(positions[item], item + 1, shape)
            return row
        row = _nyu_sync_row(item, depth_format)
        return row | ({"normal_map": None} if normals is not None else {})

    unit = "metres (mode F)" if depth_format == "float32" else "millimetres (16-bit PNG)"
    try:
        return _write_splits(
            output_dir,
            work,
            make_row,
            nyu_features(normals is not None),
            shard_size=shard_size,
            overwrite=overwrite,
            progress=progress,
            title="NYUv2",
            description=f"NYU Depth v2: `image` (RGB), `depth_map` (depth in {unit}; 0 = no measurement), `scene` "
            f"(BTS folder name for {train_split}, scene type for {test_split})"
            + (
                "; `normal_map`: surface normals of the test images (8-bit RGB, n = rgb / 127.5 - 1, x right, y up, "
                "z towards the camera; (0, 0, 0) = none)"
                if normals is not None
                else ""
            )
            + ". Written by `vpd_hf.data.converters.convert_nyu`.",
        )
    finally:
        if labeled is not None:
            labeled.close()
        if normals is not None and normals.missing:
            logger.warning("%d test images have no normal map file (e.g. %s)", len(normals.missing), normals.missing[0])


# --------------------------------------------------------------------------------------------------------------------
# RefCOCO
# --------------------------------------------------------------------------------------------------------------------


def refcoco_features() -> datasets.Features:
    """`image`, `answer`, `segmentation` (uncompressed COCO RLE), `bbox`, `image_id`, `ref_id`, `split`."""
    import datasets

    from .synthetic import refcoco_columns

    return datasets.Features({**refcoco_columns(), "split": datasets.Value("string")})


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON list (or `{"refs": [...]}`), a JSON-lines file, a parquet file or a folder of parquet files."""
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise ValueError(f"{path} holds no parquet file.")
        return [row for file in files for row in _read_records(file)]
    if not path.is_file():
        raise ValueError(f"{path} does not exist.")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("refs"), list):
        data = data["refs"]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of refs (or {{'refs': [...]}}).")
    return data


def _json_field(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) and value.strip() else value


def _refcoco_from_annotation_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Referents from `jxu124/refcoco`-layout rows (`raw_anns`, `raw_image_info`, `sentences`, ...)."""
    from .referring import sentences_of

    referents = []
    for row in rows:
        for key in ("ref_id", "image_id", "split", "raw_anns"):
            if row.get(key) is None:
                raise ValueError(f"An annotation row has no {key!r}: columns {sorted(row)}.")
        info = _json_field(row.get("raw_image_info")) or {}
        file_name = info.get("file_name") if isinstance(info, dict) else None
        if not file_name and row.get("image_path"):
            file_name = Path(str(row["image_path"])).name
        sentences = sentences_of(row.get("sentences") or row.get("raw_sentences") or row.get("captions") or [])
        referents.append(
            {
                "ref_id": int(row["ref_id"]),
                "image_id": int(row["image_id"]),
                "split": str(row["split"]),
                "sentences": sentences,
                "annotation": _json_field(row["raw_anns"]),
                "file_name": file_name or f"COCO_train2014_{int(row['image_id']):012d}.jpg",
            }
        )
    return referents


def _refcoco_from_instances(instances_json: Path, refs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Referents from COCO `instances.json` (images, annotations) and a refs export (`ann_id` -> annotation)."""
    from .referring import sentences_of

    if not instances_json.is_file():
        raise ValueError(f"`instances_json` {instances_json} does not exist.")
    instances = json.loads(instances_json.read_text())
    images = {int(image["id"]): image for image in instances.get("images", [])}
    annotations = {int(ann["id"]): ann for ann in instances.get("annotations", [])}
    referents = []
    for ref in refs:
        for key in ("ref_id", "ann_id", "image_id", "split"):
            if ref.get(key) is None:
                raise ValueError(f"A ref has no {key!r}: keys {sorted(ref)}.")
        ann_id, image_id = int(ref["ann_id"]), int(ref["image_id"])
        if ann_id not in annotations or image_id not in images:
            raise ValueError(f"ref {ref['ref_id']}: annotation {ann_id} or image {image_id} not in {instances_json}.")
        referents.append(
            {
                "ref_id": int(ref["ref_id"]),
                "image_id": image_id,
                "split": str(ref["split"]),
                "sentences": sentences_of(ref.get("sentences") or []),
                "annotation": annotations[ann_id],
                "file_name": images[image_id]["file_name"],
            }
        )
    return referents


def _refcoco_row(referent: dict[str, Any], image_root: Path) -> dict[str, Any]:
    from .referring import decode_mask
    from .synthetic import rle_encode

    path = image_root / referent["file_name"]
    if not path.is_file():
        raise ValueError(f"ref {referent['ref_id']}: picture {path} not found (is `image_root` COCO train2014?).")
    _, (width, height) = _header(path)
    annotation = referent["annotation"]
    mask = decode_mask(annotation, height, width)
    bbox = annotation.get("bbox") if isinstance(annotation, dict) else None
    if not bbox:  # derive it from the mask: COCO [x, y, w, h]
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)] if xs.size else []
    return {
        "image": _image_cell(path.read_bytes(), path.name),
        "answer": referent["sentences"],
        "segmentation": rle_encode(mask),
        "bbox": [float(v) for v in bbox],
        "image_id": referent["image_id"],
        "ref_id": referent["ref_id"],
        "split": referent["split"],
    }


def convert_refcoco(
    output_dir: str | Path,
    *,
    image_root: str | Path,
    annotations: str | Path | None = None,
    instances_json: str | Path | None = None,
    refs: str | Path | None = None,
    splits: Sequence[str] | None = None,
    shard_size: int = 500,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """RefCOCO / RefCOCO+ / RefCOCOg -> parquet with embedded pictures, one split per value of the refs' `split`
    (`train`, `val`, `testA`, `testB` for UNC; `train`, `val`, `test` for UMD), rows sorted by `ref_id`.

    Args:
        output_dir: where to write `data/*.parquet` and `README.md`.
        image_root: the COCO `train2014` folder.
        annotations: `jxu124/refcoco`-layout parquet file(s) (a file or a folder), or
        instances_json: COCO `instances.json` of the refer release, with
        refs: a refs export (JSON list, JSON lines or parquet; keys `ref_id`, `ann_id`, `image_id`, `split`,
            `sentences`). Give either `annotations` or `instances_json` + `refs`.
        splits: the splits to convert (default: all found).
        shard_size: rows per parquet file.
        overwrite: rewrite existing shards (default: keep them).
        progress: show progress bars.

    Returns:
        `output_dir` as a Path.
    """
    output_dir, image_root = Path(output_dir), Path(image_root)
    _check_shard_size(shard_size)
    if not image_root.is_dir():
        raise ValueError(f"`image_root` must be the COCO train2014 folder, got {str(image_root)!r}.")
    if (annotations is None) == (instances_json is None):
        raise ValueError("Give either `annotations` (jxu124/refcoco parquet) or `instances_json` + `refs`.")
    if annotations is not None:
        if refs is not None:
            raise ValueError("`refs` goes with `instances_json`, not with `annotations`.")
        referents = _refcoco_from_annotation_rows(_read_records(Path(annotations)))
    else:
        if refs is None:
            raise ValueError("`instances_json` needs `refs` (the referring expressions).")
        referents = _refcoco_from_instances(Path(instances_json), _read_records(Path(refs)))
    by_split: dict[str, list[dict[str, Any]]] = {}
    for referent in sorted(referents, key=lambda r: r["ref_id"]):
        by_split.setdefault(referent["split"], []).append(referent)
    if splits is not None:
        unknown = [s for s in splits if s not in by_split]
        if unknown:
            raise ValueError(f"`splits` {unknown} not found; the annotations have {sorted(by_split)}.")
        by_split = {split: by_split[split] for split in splits}
    empty = [r["ref_id"] for items in by_split.values() for r in items if not r["sentences"]]
    if empty:
        raise ValueError(f"{len(empty)} refs have no expression, e.g. ref_id {empty[:5]}.")
    return _write_splits(
        output_dir,
        by_split,
        lambda referent: _refcoco_row(referent, image_root),
        refcoco_features(),
        shard_size=shard_size,
        overwrite=overwrite,
        progress=progress,
        title="RefCOCO",
        description="Referring expressions with embedded COCO train2014 pictures: `image`, `answer` (expressions), "
        "`segmentation` (uncompressed COCO RLE: column-major run lengths, background first), `bbox` (COCO x, y, w, "
        "h), `image_id`, `ref_id`, `split`. Written by `vpd_hf.data.converters.convert_refcoco`.",
    )
