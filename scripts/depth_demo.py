#!/usr/bin/env python
"""Offline end-to-end demo of the depth slice, on a machine with no network and no GPU.

1. writes a tiny random Stable Diffusion checkpoint in the Hub's diffusers layout (`unet/`, `vae/`, `text_encoder/`,
   `tokenizer/`, ...), standing in for `stable-diffusion-v1-5/stable-diffusion-v1-5`;
2. builds a VPD depth model from it with `VPDModelForDepthEstimation.from_stable_diffusion` (UNet + VAE encoder
   imported, the 27 NYUv2 scene prompts embedded with its CLIP text encoder);
3. saves it with its image processor, reloads it through `pipeline("depth-estimation", model=folder)`;
4. runs the pipeline on the bundled photo (or `--image`) and writes a colour depth PNG, a 16-bit depth PNG and a
   side-by-side panel.

The weights are random, so the "depth" is meaningless: the demo shows the whole path works offline. Point
`--stable-diffusion` at a real checkpoint folder (or Hub id, with network) to build a full-size model instead.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import pipeline

from vpd_hf import VPDImageProcessor, VPDModelForDepthEstimation, colorize_depth, depth_to_uint16_png
from vpd_hf.examples import example_image_path
from vpd_hf.testing_utils import TINY_DEPTH_HEAD, save_tiny_stable_diffusion

logger = logging.getLogger("depth_demo")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/depth_demo"), help="folder for everything written")
    parser.add_argument("--image", type=Path, default=None, help="input photo (default: the bundled coffee.jpg)")
    parser.add_argument(
        "--stable-diffusion",
        default=None,
        help="diffusers SD checkpoint (folder or Hub id); default: write and use a tiny random one",
    )
    parser.add_argument("--colormap", default="viridis", choices=["viridis", "magma", "spectral", "gray"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny random checkpoint")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.output.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    if args.stable_diffusion is None:
        sd_path = save_tiny_stable_diffusion(args.output / "tiny-stable-diffusion", seed=args.seed)
        head_kwargs = TINY_DEPTH_HEAD
        logger.info("1. wrote a tiny random Stable Diffusion checkpoint to %s", sd_path)
    else:
        sd_path, head_kwargs = args.stable_diffusion, {}
        logger.info("1. using the Stable Diffusion checkpoint %s", sd_path)

    model = VPDModelForDepthEstimation.from_stable_diffusion(sd_path, **head_kwargs)
    params = sum(p.numel() for p in model.parameters())
    logger.info("2. built VPDModelForDepthEstimation (%.2f M parameters, %d scene prompts)", params / 1e6,
                model.config.num_prompts)  # fmt: skip

    model_dir = args.output / "vpd-depth"
    model.save_pretrained(model_dir)
    VPDImageProcessor().save_pretrained(model_dir)
    logger.info("3. saved model + image processor to %s", model_dir)

    estimator = pipeline("depth-estimation", model=str(model_dir))
    image_path = args.image or example_image_path()
    image = Image.open(image_path).convert("RGB")
    run_start = time.perf_counter()
    with torch.inference_mode():
        result = estimator(image)
    run_time = time.perf_counter() - run_start
    depth = result["predicted_depth"]
    logger.info(
        "4. depth of %s (%dx%d) in %.2f s: min %.3f m, median %.3f m, max %.3f m",
        image_path.name, image.width, image.height, run_time, float(depth.min()), float(depth.median()),
        float(depth.max()),
    )  # fmt: skip

    color = colorize_depth(depth, colormap=args.colormap)
    color.save(args.output / "depth_color.png")
    depth_to_uint16_png(depth).save(args.output / "depth_16bit.png")
    panel = Image.new("RGB", (image.width * 2, image.height))
    panel.paste(image, (0, 0))
    panel.paste(color, (image.width, 0))
    panel.save(args.output / "panel.png")
    for name in ("depth_color.png", "depth_16bit.png", "panel.png"):
        logger.info("   wrote %s", args.output / name)
    if args.stable_diffusion is None:
        logger.info("   (random weights: the colours show the pipeline runs end to end, not a trained depth map)")
    logger.info("done in %.1f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
