#!/usr/bin/env python
"""Evaluate a VPD checkpoint with its task's official protocol; prints the metrics and writes them as JSON.

    accelerate launch scripts/evaluate.py --task depth --model vpd-depth-nyu --dataset sayakpaul/nyu_depth_v2 \
        --eval_split validation --output_file vpd-depth-nyu/eval_results.json

Depth: shifted windows + flip, Eigen crop on 480x640 frames. Segmentation: sliding windows (`--eval_scales 1.0 1.125
1.25 1.375 1.5 --eval_flip true` for the paper's multi-scale + flip). Referring: every expression, LAVT metrics.
"""

import json

from vpd_hf.training.config import EVALUATION_OPTIONS, build_parser, config_from_arguments
from vpd_hf.training.evaluation import evaluate_checkpoint


def main() -> None:
    parser = build_parser(
        EVALUATION_OPTIONS,
        description="Evaluate a VPD checkpoint (depth, segmentation or referring segmentation).",
        epilog="Example: python scripts/evaluate.py --task depth --model vpd-depth --dataset synthetic "
        "--output_file eval.json",
    )
    parser.add_argument("--output_file", default=None, help="Write the metrics here as JSON.")
    arguments = vars(parser.parse_args())
    output_file = arguments.pop("output_file")
    metrics = evaluate_checkpoint(config_from_arguments(arguments), output_file)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    main()
