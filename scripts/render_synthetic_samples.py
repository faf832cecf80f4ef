#!/usr/bin/env python
"""Renders the README picture of the synthetic dataset: a grid of samples, one per row, each showing the RGB image,
its colour z-depth map, its colour semantic labels and one referring mask overlaid on the image, with the scene type
and the referring expression written underneath.

    python scripts/render_synthetic_samples.py  # writes docs/synthetic_samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vpd_hf.data.synthetic import SYNTHETIC_ID2LABEL, SyntheticScene, generate_scene
from vpd_hf.visualization import colorize_depth

# One colour per semantic class (index = label id): room parts muted, object kinds saturated.
LABEL_COLORS = np.array(
    [
        (0, 0, 0),  # other
        (120, 120, 120),  # wall
        (80, 50, 50),  # floor
        (200, 200, 170),  # ceiling
        (230, 25, 75),  # sphere
        (60, 180, 75),  # box
        (0, 130, 200),  # cylinder
        (245, 130, 48),  # cone
        (145, 30, 180),  # capsule
    ],
    dtype=np.uint8,
)
MASK_COLOR = np.array([0, 255, 255], dtype=np.float64)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("docs/synthetic_samples.png"), help="PNG file to write")
    parser.add_argument("--num-samples", type=int, default=4, help="number of rows (samples) in the grid")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the synthetic dataset")
    parser.add_argument("--height", type=int, default=192, help="height of each panel in pixels")
    parser.add_argument("--width", type=int, default=256, help="width of each panel in pixels")
    return parser.parse_args()


def pick_referent(sample: SyntheticScene) -> tuple[int, str] | None:
    """The object and expression to show: the longest expression, which combines the most attributes."""
    candidates = [(k, e) for k, expressions in sorted(sample.referring.items()) for e in expressions]
    if not candidates:
        return None
    return max(candidates, key=lambda c: len(c[1].split()))


def overlay(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The image with the mask tinted and its outline drawn, `(H, W, 3)` uint8 -> PIL."""
    out = image.astype(np.float64)
    out[mask] = 0.45 * out[mask] + 0.55 * MASK_COLOR
    edge = mask & ~(
        np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    )  # mask pixels with a background 4-neighbour
    out[edge] = MASK_COLOR
    return Image.fromarray(np.round(out).astype(np.uint8))


def main() -> None:
    args = parse_args()
    font = ImageFont.load_default(size=14)
    caption = 22
    rows = []
    index = 0
    while len(rows) < args.num_samples:
        sample = generate_scene(index, seed=args.seed, height=args.height, width=args.width)
        index += 1
        choice = pick_referent(sample)
        if choice is None:
            continue
        instance_id, expression = choice
        panels = [
            Image.fromarray(sample.image),
            colorize_depth(sample.depth),
            Image.fromarray(LABEL_COLORS[sample.semantic]),
            overlay(sample.image, sample.mask(instance_id)),
        ]
        kinds = sorted({SYNTHETIC_ID2LABEL[int(v)] for v in np.unique(sample.semantic)})
        depth_range = f"depth {sample.depth.min():.2f}-{sample.depth.max():.2f} m"
        texts = [f"scene: {sample.scene}", depth_range, ", ".join(kinds), f'"{expression}"']
        row = Image.new("RGB", (4 * args.width, args.height + caption), "white")
        draw = ImageDraw.Draw(row)
        for column, (panel, text) in enumerate(zip(panels, texts, strict=True)):
            row.paste(panel, (column * args.width, 0))
            draw.text((column * args.width + 4, args.height + 3), text, fill="black", font=font)
        rows.append(row)
    grid = Image.new("RGB", (4 * args.width + 6, len(rows) * (args.height + caption + 4) + 2), "white")
    for r, row in enumerate(rows):
        grid.paste(row, (3, 2 + r * (args.height + caption + 4)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output, optimize=True)
    print(f"wrote {args.output} ({grid.width} x {grid.height})")


if __name__ == "__main__":
    main()
