#!/usr/bin/env python
"""Convert RefCOCO / RefCOCO+ / RefCOCOg annotations + COCO train2014 pictures to parquet with embedded pictures.

One row per referent: `image`, `answer` (its expressions), `segmentation` (uncompressed COCO RLE), `bbox`, `image_id`,
`ref_id`, `split`; one split per value of the refs' split (train/val/testA/testB for UNC, train/val/test for UMD).
Annotations: the `jxu124/refcoco` parquet files (`--annotations`), or COCO `instances.json` plus a refs export as JSON,
JSON lines or parquet (`--instances-json` + `--refs`); the refer package's pickles are not read. Writes
OUTPUT/data/{split}-NNNNN-of-MMMMM.parquet and OUTPUT/README.md. A rerun keeps the shards already written;
`--overwrite` rewrites them. The logic lives in `vpd_hf.data.converters.convert_refcoco`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from vpd_hf.data.converters import convert_refcoco

EXAMPLE = """examples:
  # annotations from the Hub (huggingface-cli download jxu124/refcoco --repo-type dataset --local-dir refcoco-ann)
  python scripts/prepare_refcoco.py --image-root data/coco/train2014 --annotations refcoco-ann/data \\
      --output data/refcoco-parquet
  # COCO instances.json of the refer release + a refs export
  python scripts/prepare_refcoco.py --image-root data/coco/train2014 --instances-json refcoco/instances.json \\
      --refs refcoco/refs_unc.json --splits train val --output data/refcoco-parquet
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_refcoco.py",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write data/*.parquet and README.md to")
    parser.add_argument("--image-root", type=Path, required=True, help="the COCO train2014 picture folder")
    parser.add_argument(
        "--annotations",
        type=Path,
        help="jxu124/refcoco-layout parquet file or folder (alternative to --instances-json)",
    )
    parser.add_argument("--instances-json", type=Path, help="COCO instances.json of the refer release; needs --refs")
    parser.add_argument(
        "--refs",
        type=Path,
        help="refs export (.json list, .jsonl or .parquet: ref_id, ann_id, image_id, split, sentences)",
    )
    parser.add_argument("--splits", nargs="+", help="splits to convert, e.g. train val testA testB (default: all)")
    parser.add_argument("--shard-size", type=int, default=500, help="rows per parquet file (default: 500)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite shards that already exist (default: keep)")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return convert_refcoco(
            args.output,
            image_root=args.image_root,
            annotations=args.annotations,
            instances_json=args.instances_json,
            refs=args.refs,
            splits=args.splits,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
