"""Referring image segmentation data: Hub-layout RefCOCO datasets -> VPD model inputs, lazily.

Two input layouts (`layout="auto"` picks by columns):

* `"embedded"` (`lmms-lab/RefCOCO`, the synthetic `referring` config, `scripts/prepare_refcoco.py`): one row per
  referent with the picture in an `image` column (`datasets.Image`), the expressions in `answer` (a list of strings)
  and the mask in `segmentation`: a COCO polygon list (`[x1, y1, x2, y2, ...]` or a list of such lists) or a COCO RLE
  dict (`{"size": [H, W], "counts": [...]}` uncompressed, or a compressed `counts` string, which needs pycocotools).
* `"annotations"` (`jxu124/refcoco`, `jxu124/refcocoplus`, `jxu124/refcocog`): annotation rows without pictures --
  `sentences` (list of `{"sent", "raw", ...}` dicts; or `raw_sentences`, a JSON string; or `captions`, a list of
  strings), `raw_anns` (the COCO annotation as a JSON string, with its `segmentation`), and `image_path` / `file_name`
  / `raw_image_info` / `image_id` to find the picture in a local COCO `train2014` folder given as `image_root`.

Items (`referring_dataset(...)[i]`), after the LAVT transform (plain `image_size` x `image_size` resize, no flip, no
photometric change; :func:`~vpd_hf.data.augmentation.resize_referring`):

* `pixel_values`: float32 `(3, 512, 512)` in [-1, 1];
* `input_ids`: int64 `(token_length,)`, the expression tokenised with `padding="max_length", truncation=True`;
* `labels`: int64 `(512, 512)` in {0, 1};
* eval only: `sentence` (str), the expression of `input_ids`.

Train: one row per referent; each epoch draws ONE of its expressions from the `(seed, epoch, row)` generator (VPD's
`np.random.choice` per `__getitem__`). Call `vpd_hf.data.set_epoch(dataset, epoch)` at the start of every epoch.
Eval: one row per (referent, expression), every expression once. The expansion is an index: the returned dataset
has columns `__index__` (source row) and `__sentence__` (expression number), built eagerly from the sentence column
alone, so pictures are neither copied nor decoded up front.

Masks: polygons are rasterised by :func:`polygons_to_mask` (pixel-centre, even-odd rule; several polygons are
united). The official `refer` API sums the per-polygon masks and keeps pixels equal to 1, which drops pixels where
two polygons of one object overlap; we take the union instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .augmentation import (
    AdapterTransform,
    InvalidRowError,
    build_adapter_dataset,
    check_columns,
    check_image_feature,
    open_image,
    resize_referring,
    to_rgb_array,
    undecoded,
)
from .synthetic import rle_decode

if TYPE_CHECKING:
    import datasets

__all__ = [
    "LAYOUTS",
    "ReferringTransform",
    "decode_mask",
    "detect_layout",
    "polygons_to_mask",
    "referring_dataset",
    "sentences_of",
]

LAYOUTS = ("auto", "embedded", "annotations")
_ANNOTATION_SENTENCE_COLUMNS = ("sentences", "raw_sentences", "captions", "answer")
_ANNOTATION_PATH_COLUMNS = ("image_path", "file_name")


# --------------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------------


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterises COCO polygons (each `[x1, y1, x2, y2, ...]` in pixel coordinates, where pixel (row i, column j)
    covers `[j, j + 1) x [i, i + 1)`) into a bool `(height, width)` mask.

    A pixel belongs to a polygon when its centre `(j + 0.5, i + 0.5)` is inside by the even-odd rule (a scanline
    algorithm, exact for any simple or self-intersecting polygon); centres exactly on an edge follow the top-left rule
    (in on left/top edges, out on right/bottom ones), so polygons sharing an edge never both claim a pixel. The mask is
    the union over `polygons`; polygons with fewer than 3 vertices cover nothing. A pixel-aligned rectangle
    `[x0, y0, x1, y0, x1, y1, x0, y1]` with integer corners covers exactly the pixels `[y0:y1, x0:x1]`. (pycocotools
    rasterises differently, on a 5x finer grid, so a few border pixels may differ from the official masks.)
    """
    mask = np.zeros((height, width), dtype=bool)
    centres = np.arange(height) + 0.5
    for polygon in polygons:
        coords = np.asarray(polygon, dtype=np.float64).ravel()
        if coords.size < 6 or coords.size % 2:
            continue
        x1, y1 = coords[0::2], coords[1::2]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        # Rows whose centre line crosses each edge (half-open in y, so a vertex on the line is counted once).
        crosses = (y1[:, None] > centres[None, :]) != (y2[:, None] > centres[None, :])
        edge, row = np.nonzero(crosses)
        if edge.size == 0:
            continue
        x = x1[edge] + (centres[row] - y1[edge]) * (x2[edge] - x1[edge]) / (y2[edge] - y1[edge])
        # Each crossing toggles the parity of the pixel centres from the first column j with j + 0.5 >= x on: a centre
        # exactly on an edge is in on a left edge and out on a right one (top-left rule, with the half-open rows).
        first = np.clip(np.ceil(x - 0.5).astype(np.int64), 0, width)
        toggles = np.zeros((height, width + 1), dtype=np.int64)
        np.add.at(toggles, (row, first), 1)
        mask |= (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)
    return mask


def _rle_to_mask(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    size = [int(s) for s in rle.get("size", ())]
    if size != [height, width]:
        raise InvalidRowError(f"the RLE mask has size {size} but the image is {[height, width]} (H, W).")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            from pycocotools import mask as mask_utils
        except ImportError as error:
            raise ImportError(
                "This mask is a compressed COCO RLE (a `counts` string); decoding it needs pycocotools: "
                "`pip install pycocotools`. Uncompressed RLE (a list of run lengths) and polygons need nothing."
            ) from error
        encoded = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(encoded).astype(bool)
    return rle_decode({"size": size, "counts": list(counts)})


def decode_mask(value: Any, height: int, width: int) -> np.ndarray:
    """The bool `(height, width)` mask of a COCO segmentation in any of its forms: a polygon `[x1, y1, ...]`, a list of
    polygons, an RLE dict (uncompressed, or compressed with pycocotools), a COCO annotation dict with a `segmentation`
    key, a list of RLE dicts / annotations (united), or a JSON string of any of these (`raw_anns`).

    Raises:
        InvalidRowError (a ValueError): an unrecognised or malformed value, or an RLE whose size is not the image's.
        ImportError: a compressed RLE without pycocotools.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidRowError(f"the mask is a string but not JSON ({error}).") from error
    if isinstance(value, dict):
        if "segmentation" in value:
            return decode_mask(value["segmentation"], height, width)
        if "counts" in value:
            try:
                return _rle_to_mask(value, height, width)
            except (TypeError, ValueError) as error:
                raise InvalidRowError(f"malformed RLE mask ({error}).") from error
        raise InvalidRowError(f"a mask dict needs 'counts' (RLE) or 'segmentation', got keys {sorted(value)}.")
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        items = list(value)
        if all(isinstance(v, (int, float, np.number)) for v in items):
            return polygons_to_mask([items], height, width)
        if all(isinstance(v, (list, tuple, np.ndarray)) for v in items):
            try:
                return polygons_to_mask(items, height, width)
            except (TypeError, ValueError) as error:
                raise InvalidRowError(f"malformed polygon list ({error}).") from error
        if all(isinstance(v, dict) for v in items):
            mask = np.zeros((height, width), dtype=bool)
            for item in items:
                mask |= decode_mask(item, height, width)
            return mask
    raise InvalidRowError(f"unrecognised mask value of type {type(value).__name__}: {str(value)[:80]!r}.")


# --------------------------------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------------------------------


def sentences_of(value: Any) -> list[str]:
    """The referring expressions of one cell: a list of strings (`answer`, `captions`), a list of refer-API sentence
    dicts (their `sent`, which VPD tokenises, else `raw`), a JSON string of either (`raw_sentences`), or one string.
    Empty expressions are dropped."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                return sentences_of(json.loads(stripped))
            except json.JSONDecodeError:
                pass
        return [stripped] if stripped else []
    if isinstance(value, dict):
        text = value.get("sent") or value.get("raw")
        return [text.strip()] if isinstance(text, str) and text.strip() else []
    if isinstance(value, (list, tuple)):
        return [sentence for item in value for sentence in sentences_of(item)]
    return []


# --------------------------------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------------------------------


def detect_layout(dataset: datasets.Dataset, image_column: str = "image") -> str:
    """`"embedded"` when the dataset has an `image_column`, `"annotations"` when it has `raw_anns`; else ValueError."""
    columns = dataset.column_names
    if image_column in columns:
        return "embedded"
    if "raw_anns" in columns:
        return "annotations"
    raise ValueError(
        f"Cannot tell the RefCOCO layout from the columns {columns}: expected {image_column!r} (pictures embedded, as "
        "lmms-lab/RefCOCO) or 'raw_anns' (annotations only, as jxu124/refcoco, with `image_root`). Pass `layout`."
    )


class ReferringTransform(AdapterTransform):
    """The transform of :func:`referring_dataset` (see the module docstring for the item format)."""

    def __init__(
        self,
        source: datasets.Dataset,
        split: str,
        tokenizer: Any,
        *,
        layout: str,
        token_length: int,
        image_size: int,
        image_root: Path | None,
        seed: int,
        image_column: str,
        sentences_column: str,
        mask_column: str,
        path_column: str | None,
    ) -> None:
        super().__init__(source, split, seed)
        self.tokenizer, self.layout = tokenizer, layout
        self.token_length, self.image_size, self.image_root = token_length, image_size, image_root
        self.image_column, self.sentences_column = image_column, sentences_column
        self.mask_column, self.path_column = mask_column, path_column
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None  # last (row, pixel_values, labels)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    # -- reading ------------------------------------------------------------------------------------------------------

    def _image_candidates(self, record: dict[str, Any]) -> list[Path]:
        """Where the picture of an annotation row may be under `image_root`, most specific first."""
        assert self.image_root is not None
        root, names = self.image_root, []
        if self.path_column is not None and record.get(self.path_column):
            path = Path(str(record[self.path_column]))
            names += [path] if path.is_absolute() else [root / path, root / path.name]
        info = record.get("raw_image_info")
        if isinstance(info, str) and info.strip():
            try:
                info = json.loads(info)
            except json.JSONDecodeError:
                info = None
        if isinstance(info, dict) and info.get("file_name"):
            names.append(root / str(info["file_name"]))
        file_name = record.get("file_name")
        if isinstance(file_name, str) and file_name:
            # refer's ref `file_name` is the COCO file name with "_<ann_id>" appended: COCO_train2014_<id>_<ann>.jpg.
            names.append(root / re.sub(r"_\d+(\.\w+)$", r"\1", Path(file_name).name))
        if record.get("image_id") is not None:
            names.append(root / f"COCO_train2014_{int(record['image_id']):012d}.jpg")
        return list(dict.fromkeys(names))

    def _open_picture(self, record: dict[str, Any], row: int) -> Image.Image:
        if self.layout == "embedded":
            return open_image(record[self.image_column], self.image_column, row)
        candidates = self._image_candidates(record)
        for path in candidates:
            if path.is_file():
                return open_image(str(path), "image file", row)
        raise InvalidRowError(
            f"row {row}: no picture found under image_root={str(self.image_root)!r}; tried "
            f"{[str(p) for p in candidates] or 'nothing (no image_path / file_name / raw_image_info / image_id)'}."
        )

    def read_row(self, record: dict[str, Any], row: int) -> tuple[Image.Image, np.ndarray, list[str]]:
        picture = self._open_picture(record, row)
        image = Image.fromarray(to_rgb_array(picture, self.image_column, row))
        sentences = sentences_of(record[self.sentences_column])
        if not sentences:
            raise InvalidRowError(f"row {row}: column {self.sentences_column!r} holds no expression.")
        try:
            mask = decode_mask(record[self.mask_column], image.height, image.width)
        except InvalidRowError as error:
            raise InvalidRowError(f"row {row}: column {self.mask_column!r}: {error}") from error
        return image, mask, sentences

    # -- items --------------------------------------------------------------------------------------------------------

    def tokenize(self, sentence: str) -> torch.Tensor:
        """int64 `(token_length,)` token ids (padded to and truncated at `token_length`)."""
        tokens = self.tokenizer(
            sentence, padding="max_length", truncation=True, max_length=self.token_length, return_tensors="pt"
        )
        return tokens["input_ids"][0].to(torch.long)

    def make_item(
        self, sample: tuple[Image.Image, np.ndarray, list[str]], row: int, extra: dict[str, Any]
    ) -> dict[str, Any]:
        image, mask, sentences = sample
        if self._cache is not None and self._cache[0] == row:
            # The next expression of the same referent (eval): reuse the resized picture; copies, so that an in-place
            # change of one item cannot leak into the next.
            pixel_values, labels = self._cache[1].clone(), self._cache[2].clone()
        else:
            pixel_values, labels = resize_referring(image, mask, self.image_size)
            self._cache = (row, pixel_values, labels)
        if self.split == "train":
            choice = int(self.rng(row).integers(len(sentences)))
            return {"pixel_values": pixel_values, "input_ids": self.tokenize(sentences[choice]), "labels": labels}
        number = int(extra["__sentence__"])
        if not 0 <= number < len(sentences):
            raise ValueError(f"row {row} has {len(sentences)} expressions, asked for number {number}.")
        sentence = sentences[number]
        return {
            "pixel_values": pixel_values,
            "input_ids": self.tokenize(sentence),
            "labels": labels,
            "sentence": sentence,
        }

    def expand(self, rows: list[int]) -> dict[str, list[int]]:
        """The eval index table: one `(__index__, __sentence__)` row per (referent, expression)."""
        column = self.source.select_columns([self.sentences_column])[:][self.sentences_column]
        indices, numbers = [], []
        for row in rows:
            count = len(sentences_of(column[row]))
            indices += [row] * count
            numbers += list(range(count))
        return {"__index__": indices, "__sentence__": numbers}


def referring_dataset(
    dataset: datasets.Dataset,
    split: str,
    tokenizer: Any,
    *,
    token_length: int = 40,
    image_size: int = 512,
    layout: str = "auto",
    image_root: str | Path | None = None,
    seed: int = 0,
    skip_invalid: bool = False,
    image_column: str = "image",
    sentences_column: str | None = None,
    mask_column: str | None = None,
    path_column: str | None = None,
) -> datasets.Dataset:
    """Referring-segmentation inputs from a Hub-layout RefCOCO dataset, computed lazily (`Dataset.with_transform`).

    Args:
        dataset: one split, in the `"embedded"` or `"annotations"` layout (see the module docstring).
        split: `"train"` (one random expression per referent and epoch) or `"eval"` (one row per expression).
        tokenizer: the CLIP tokenizer of the model's text encoder (any callable Hugging Face tokenizer).
        token_length: tokens per expression (40 for RefCOCO / RefCOCO+, 77 for RefCOCOg in VPD).
        image_size: side of the square model input (512).
        layout: `"auto"`, `"embedded"` or `"annotations"`.
        image_root: the folder of the COCO `train2014` pictures (annotations layout only).
        seed: base seed of the training expression choice.
        skip_invalid: read every row once up front and drop unreadable / invalid rows (logged; see
            `get_adapter_transform(result).dropped_rows` and `result.info.description`) instead of raising.
        image_column: the picture column (embedded layout).
        sentences_column: the expressions; default `answer` (embedded) or the first of `sentences`, `raw_sentences`,
            `captions` present (annotations).
        mask_column: the mask; default `segmentation` (embedded) or `raw_anns` (annotations).
        path_column: the picture's path under `image_root` (annotations); default `image_path` or `file_name`.

    Returns:
        A `datasets.Dataset` index table whose items are dicts with `pixel_values`, `input_ids`, `labels` (and
        `sentence` for eval).

    Raises:
        ValueError: missing columns, a wrong layout / `image_root`, an invalid first row (with `skip_invalid`: every
            row), or bad arguments. Later invalid rows raise `ValueError` when fetched unless `skip_invalid`.
    """
    import datasets as hf_datasets

    if not isinstance(dataset, hf_datasets.Dataset):
        raise TypeError(f"`dataset` must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    if not callable(tokenizer):
        raise TypeError(f"`tokenizer` must be a Hugging Face tokenizer, got {type(tokenizer).__name__}.")
    for name, value in (("token_length", token_length), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
    if layout == "auto":
        layout = detect_layout(dataset, image_column)
    columns = dataset.column_names
    root: Path | None = None
    if layout == "embedded":
        sentences_column = sentences_column or "answer"
        mask_column = mask_column or "segmentation"
        check_columns(dataset, {image_column: "pictures", sentences_column: "expressions", mask_column: "object masks"})
        check_image_feature(dataset, image_column)
        needed, path_column = [image_column, sentences_column, mask_column], None
    else:
        if image_root is None:
            raise ValueError("The 'annotations' layout needs `image_root`, the folder of the COCO train2014 pictures.")
        root = Path(image_root)
        if not root.is_dir():
            raise ValueError(f"`image_root` must be an existing folder, got {str(image_root)!r}.")
        sentences_column = sentences_column or next((c for c in _ANNOTATION_SENTENCE_COLUMNS if c in columns), None)
        if sentences_column is None:
            raise ValueError(
                f"No expression column found: expected one of {_ANNOTATION_SENTENCE_COLUMNS} in {columns}; pass "
                "`sentences_column`."
            )
        mask_column = mask_column or "raw_anns"
        path_column = path_column or next((c for c in _ANNOTATION_PATH_COLUMNS if c in columns), None)
        check_columns(dataset, {sentences_column: "expressions", mask_column: "COCO annotations with masks"})
        if path_column is not None:
            check_columns(dataset, {path_column: "picture paths"})
        locators = [c for c in (path_column, "raw_image_info", "file_name", "image_id") if c and c in columns]
        if not locators:
            raise ValueError(
                "The 'annotations' layout needs a column locating the picture: one of 'image_path', 'file_name', "
                f"'raw_image_info' or 'image_id'; the dataset has {columns}."
            )
        needed = [sentences_column, mask_column, *locators]
    source = dataset.select_columns(list(dict.fromkeys(needed)))
    if layout == "embedded":
        source = undecoded(source, [image_column])
    transform = ReferringTransform(
        source,
        split,
        tokenizer,
        layout=layout,
        token_length=token_length,
        image_size=image_size,
        image_root=root,
        seed=seed,
        image_column=image_column,
        sentences_column=sentences_column,
        mask_column=mask_column,
        path_column=path_column,
    )
    expand = transform.expand if split == "eval" else None
    return build_adapter_dataset(transform, name="referring", skip_invalid=skip_invalid, expand=expand)
