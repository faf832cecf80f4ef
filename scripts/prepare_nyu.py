#!/usr/bin/env python
"""Convert NYU Depth v2 to parquet with `datasets.Image` columns (`image`, `depth_map`, `scene`).

Training split: the BTS "sync" folder and a list file with lines `rgb_path depth_path focal` (16-bit PNG depth in
millimetres; scene = the folder name). Test split: the 654 official test images of `nyu_depth_v2_labeled.mat`
(`testNdxs` of `splits.mat`; needs `pip install h5py`), built like BTS's `official_splits/test` that VPD evaluates on
(`rawDepths`, `sceneTypes`, black border). Depth is stored as mode "F" metres (default) or 16-bit PNG millimetres.
With `--normals-dir`, the test images' surface-normal ground truth (the commonly used GeoNet normals, one 8-bit RGB
PNG per test image, `n = rgb / 127.5 - 1`, (0, 0, 0) = none) is added as a `normal_map` column in Marigold's frame.
Writes OUTPUT/data/{train,validation}-NNNNN-of-MMMMM.parquet and OUTPUT/README.md. A rerun keeps the shards already
written; `--overwrite` rewrites them. The logic lives in `vpd_hf.data.converters.convert_nyu`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from vpd_hf.data.converters import DEPTH_FORMATS, NYU_NORMALS_PATTERN, convert_nyu
from vpd_hf.data.normals import NORMAL_CONVENTIONS

EXAMPLE = """example:
  python scripts/prepare_nyu.py --output data/nyu-parquet \\
      --sync-root data/nyu_depth_v2/sync --train-list VPD/depth/dataset/filenames/nyudepthv2/train_list.txt \\
      --labeled-mat data/nyu_depth_v2_labeled.mat --splits-mat data/splits.mat
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_nyu.py",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write data/*.parquet and README.md to")
    parser.add_argument("--sync-root", type=Path, help="the BTS 'sync' folder (training set); needs --train-list")
    parser.add_argument(
        "--train-list", type=Path, help="list file, lines 'rgb_path depth_path focal' relative to --sync-root"
    )
    parser.add_argument("--labeled-mat", type=Path, help="nyu_depth_v2_labeled.mat (test set); needs --splits-mat")
    parser.add_argument("--splits-mat", type=Path, help="the official splits.mat with the 1-based testNdxs")
    parser.add_argument("--train-split", default="train", help="name of the training split (default: train)")
    parser.add_argument(
        "--test-split",
        default="validation",
        help="name of the test split (default: validation, as sayakpaul/nyu_depth_v2)",
    )
    parser.add_argument(
        "--depth-format",
        choices=DEPTH_FORMATS,
        default="float32",
        help="float32: mode F metres (Hub layout, default); uint16: 16-bit PNG millimetres (smaller)",
    )
    parser.add_argument(
        "--depth-key",
        choices=("auto", "rawDepths", "depths"),
        default="auto",
        help="depth maps of the labeled .mat: rawDepths (what VPD evaluates on), depths (in-painted); "
        "auto = rawDepths when present (default)",
    )
    parser.add_argument(
        "--no-black-boundary",
        action="store_true",
        help="keep the full test pictures (default: black outside rows 7:474 / columns 7:632, as BTS)",
    )
    parser.add_argument(
        "--normals-dir",
        type=Path,
        help="folder of test-image normal maps (8-bit RGB PNG, n = rgb / 127.5 - 1, (0, 0, 0) = none, the image's "
        "size); needs --labeled-mat",
    )
    parser.add_argument(
        "--normals-pattern",
        default=NYU_NORMALS_PATTERN,
        help="file name per test image: {position} = 0-based place in the test list, {index} = 1-based .mat index "
        f"(default: {NYU_NORMALS_PATTERN})",
    )
    parser.add_argument(
        "--normals-convention",
        choices=tuple(NORMAL_CONVENTIONS),
        default="marigold",
        help="camera frame of the files: marigold (x right, y up, z to the camera; default) or opencv (y down, z away)",
    )
    parser.add_argument("--shard-size", type=int, default=500, help="rows per parquet file (default: 500)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite shards that already exist (default: keep)")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return convert_nyu(
            args.output,
            sync_root=args.sync_root,
            train_list=args.train_list,
            labeled_mat=args.labeled_mat,
            splits_mat=args.splits_mat,
            train_split=args.train_split,
            test_split=args.test_split,
            depth_format=args.depth_format,
            depth_key=args.depth_key,
            black_boundary=not args.no_black_boundary,
            normals_dir=args.normals_dir,
            normals_pattern=args.normals_pattern,
            normals_convention=args.normals_convention,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
