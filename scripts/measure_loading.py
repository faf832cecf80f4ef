#!/usr/bin/env python
"""Whole-process peak memory of loading a VPD depth checkpoint in a dtype and serving one pipeline call.

    /usr/bin/time -v python scripts/measure_loading.py /tmp/vpd_hf_benchmark_models/sd15-full-depth --dtype bf16

Run it in a fresh process: the peak (VmHWM) is never reset, so it covers loading and serving together. The models
that `scripts/benchmark.py` builds under its `--cache-dir` are suitable checkpoints.
"""

from __future__ import annotations

import argparse
import time


def status_gb(field: str) -> float:
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(f"{field}:"))) / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved VPD depth model (folder or Hub id)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--side", type=int, default=512, help="square side of the served image")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from transformers import pipeline

    import vpd_hf

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    model = vpd_hf.VPDModelForDepthEstimation.from_pretrained(args.model, dtype=dtype).eval()
    load_s = time.perf_counter() - start
    after_load = status_gb("VmHWM")
    processor = vpd_hf.VPDImageProcessor.for_task("depth", size={"height": args.side, "width": args.side})
    estimator = pipeline("depth-estimation", model=model, image_processor=processor, dtype=dtype)
    image = Image.fromarray((np.random.default_rng(0).random((args.side, args.side, 3)) * 255).astype(np.uint8))
    start = time.perf_counter()
    with torch.inference_mode():
        estimator(image)
    call_s = time.perf_counter() - start
    print(f"vpd_hf {vpd_hf.__file__}: load {load_s:.1f} s, peak after loading {after_load:.2f} GB, whole-process peak "
          f"{status_gb('VmHWM'):.2f} GB, pipeline call {call_s:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
