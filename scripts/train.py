#!/usr/bin/env python
"""Fine-tune VPD (depth, semantic segmentation or referring segmentation) with accelerate.

    accelerate launch scripts/train.py --recipe nyu_depth --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset sayakpaul/nyu_depth_v2 --output_dir vpd-depth-nyu

Every option is a named argument (`--help`); `--recipe` loads the paper's settings, explicit arguments override them.
The logic lives in `vpd_hf.training` (also `vpd-hf train`).
"""

from vpd_hf.training.commands import train_main as main

if __name__ == "__main__":
    main()
