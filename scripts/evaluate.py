#!/usr/bin/env python
"""Evaluate a VPD checkpoint with its task's official protocol; prints the metrics and writes them as JSON.

    accelerate launch scripts/evaluate.py --task depth --model vpd-depth-nyu --dataset sayakpaul/nyu_depth_v2 \
        --eval_split validation --output_file vpd-depth-nyu/eval_results.json

Depth: shifted windows + flip, Eigen crop on 480x640 frames. Segmentation: sliding windows (`--eval_scales 1.0 1.125
1.25 1.375 1.5 --eval_flip true` for the paper's multi-scale + flip). Referring: every expression, LAVT metrics.
The logic lives in `vpd_hf.training.evaluation` (also `vpd-hf evaluate`).
"""

from vpd_hf.training.commands import evaluate_main as main

if __name__ == "__main__":
    main()
