#!/usr/bin/env python
"""Convert the ADE20K SceneParsing release (ADEChallengeData2016) to parquet with `datasets.Image` columns.

Writes OUTPUT/data/{train,validation}-NNNNN-of-MMMMM.parquet (columns `image`, `annotation`) and OUTPUT/README.md;
load with `datasets.load_dataset("parquet", data_dir=OUTPUT)` or publish with `huggingface-cli upload`.
A rerun keeps the shards already written (an interrupted run resumes); `--overwrite` rewrites them.
The logic lives in `vpd_hf.data.converters.convert_ade20k`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from vpd_hf.data.converters import ADE20K_SPLITS, convert_ade20k

EXAMPLE = """example:
  python scripts/prepare_ade20k.py --root data/ADEChallengeData2016 --output data/ade20k-parquet
  python -c "import datasets; print(datasets.load_dataset('parquet', data_dir='data/ade20k-parquet'))"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_ade20k.py",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root", type=Path, required=True, help="the ADEChallengeData2016 folder (with images/ and annotations/)"
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write data/*.parquet and README.md to")
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=tuple(ADE20K_SPLITS),
        default=list(ADE20K_SPLITS),
        help="splits to convert (default: train validation)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per parquet file (default: 1000)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite shards that already exist (default: keep)")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return convert_ade20k(
            args.root,
            args.output,
            splits=args.splits,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
