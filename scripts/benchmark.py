#!/usr/bin/env python
"""Latency of VPD depth inference against the bare Stable Diffusion VAE-encoder + UNet forward it is built on.

For one image of `--resolution` x `--resolution` and each `--dtypes` entry, in a fresh process per dtype (so that the
peak RSS belongs to that configuration), with random weights at the SD-1.5 size (`--size sd15`) or the tiny test size:

* `bare`: stock diffusers `AutoencoderKL.encode` (posterior mode) + `UNet2DConditionModel` at t = 1 with a one-token
  context: what VPD costs at least;
* `model`: `VPDModelForDepthEstimation(pixel_values)` (VAE + UNet taps + depth head), same weights;
* `pipeline`: transformers' `pipeline("depth-estimation")` on a PIL image of that size (image processor + model +
  post-processing back to the image size).

Prints a Markdown table (and writes JSON with `--json`) with the median and min over `--repeats` timed runs after
`--warmup` runs, the ratios to `bare`, the peak RSS and the machine/library versions. Example:

    python scripts/benchmark.py --size sd15 --dtypes fp32 bf16 --repeats 3 --json outputs/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15", help="model size (random weights)")
    parser.add_argument("--resolution", type=int, default=512, help="square input image side")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--_worker", choices=sorted(DTYPES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def timed(fn, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeats}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def worker(args: argparse.Namespace) -> dict:
    """One dtype, in its own process."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from PIL import Image
    from transformers import pipeline

    import vpd_hf
    from vpd_hf.testing_utils import tiny_vpd_config

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args._worker])
    torch.manual_seed(0)
    config = vpd_hf.VPDConfig() if args.size == "sd15" else tiny_vpd_config()
    model = vpd_hf.VPDModelForDepthEstimation(config).eval()

    # Stock diffusers modules with the same weights (the UNet's unused output layers keep their fresh init).
    unet = UNet2DConditionModel(**config.unet_config)
    unet.load_state_dict(model.vpd.unet.state_dict(), strict=False)
    vae = AutoencoderKL(**config.vae_config)
    vae.load_state_dict(model.vpd.vae.state_dict(), strict=False)
    del vae.decoder
    model, unet, vae = model.to(dtype), unet.to(dtype).eval(), vae.to(dtype).eval()

    side = args.resolution
    pixels = (torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    context = torch.randn(1, 1, config.prompt_embed_dim, dtype=dtype)
    image = Image.fromarray((np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8))
    processor = vpd_hf.VPDImageProcessor(size={"height": side, "width": side})
    estimator = pipeline("depth-estimation", model=model, image_processor=processor, dtype=dtype)

    def bare():
        latents = vae.encode(pixels).latent_dist.mode()
        return unet(latents, 1, encoder_hidden_states=context).sample

    results = {}
    with torch.inference_mode():
        results["bare"] = timed(bare, args.repeats, args.warmup)
        results["model"] = timed(lambda: model(pixels), args.repeats, args.warmup)
        results["pipeline"] = timed(lambda: estimator(image), args.repeats, args.warmup)
        reference = model(pixels.float().to(dtype)).predicted_depth
        assert torch.isfinite(reference).all(), "non-finite depth"
    results["peak_rss_gb"] = peak_rss_gb()
    results["threads"] = torch.get_num_threads()
    return results


def environment() -> dict:
    import diffusers
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }


def main() -> None:
    args = parse_args()
    if args._worker:
        print(json.dumps(worker(args)))
        return
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "environment": environment(), "runs": {}}
    for dtype in args.dtypes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_worker", dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        report["runs"][dtype] = json.loads(out.strip().splitlines()[-1])

    env = report["environment"]
    print(f"# VPD depth latency, {args.size} size, {args.resolution}x{args.resolution}, batch 1")
    print(f"{env['cpu']} ({env['cores']} cores), torch {env['torch']}, diffusers {env['diffusers']}, "
          f"transformers {env['transformers']}")  # fmt: skip
    print(f"command: python scripts/{report['command']}\n")
    print(
        "| dtype | bare VAE+UNet (s) | VPD model (s) | depth pipeline (s) | model / bare | pipeline / bare | peak RSS (GB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype, run in report["runs"].items():
        bare, model, pipe = (run[k]["median_s"] for k in ("bare", "model", "pipeline"))
        print(f"| {dtype} | {bare:.3f} | {model:.3f} | {pipe:.3f} | {model / bare:.2f} | {pipe / bare:.2f} "
              f"| {run['peak_rss_gb']:.2f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
