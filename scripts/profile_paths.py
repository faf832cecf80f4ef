#!/usr/bin/env python
"""Per-op profile of the vpd_hf fast path against the official-design reference, in one process on the same weights.

    python scripts/profile_paths.py --dtype fp32 --rounds 3            # SD-1.5 size, depth, 512x512, CPU
    python scripts/profile_paths.py --dtype fp32 --channels-last        # the same with channels_last weights/inputs

The two paths run alternately (fast, reference, fast, reference, ...) so that drift of a shared machine (other
processes, frequency) falls on both alike; the medians and the per-op self time (torch.profiler, one extra call of
each) are printed, and written as JSON with `--json`. The reference is `vpd_hf.attention.reference_attention`: every
attention layer materialises its probabilities, as the official code does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vpd_hf
from vpd_hf.attention import reference_attention
from vpd_hf.testing_utils import tiny_vpd_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--side", type=int, default=512, help="square input side")
    parser.add_argument("--rounds", type=int, default=3, help="timed (fast, reference) pairs after one warm-up pair")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (a smoke run)")
    parser.add_argument("--ops", type=int, default=12, help="ops listed per path")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = tiny_vpd_config() if args.tiny else vpd_hf.VPDConfig()
    model = vpd_hf.VPDModelForDepthEstimation(config).to(DTYPES[args.dtype]).eval()
    model.vpd.prompt_embeddings.normal_(generator=torch.Generator().manual_seed(1))
    pixels = (torch.rand(1, 3, args.side, args.side, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(
        DTYPES[args.dtype]
    )
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        pixels = pixels.contiguous(memory_format=torch.channels_last)

    def fast() -> torch.Tensor:
        return model(pixels).predicted_depth

    def reference() -> torch.Tensor:
        with reference_attention(model.vpd.unet):
            return model(pixels).predicted_depth

    paths = {"fast": fast, "reference": reference}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    report: dict = {"dtype": args.dtype, "side": args.side, "channels_last": args.channels_last,
                    "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                if round_index:  # the first pair warms up
                    seconds[name].append(time.perf_counter() - start)
        for name, fn in paths.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            report[f"{name}_ops"] = [
                {"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count}
                for e in events[: args.ops]
            ]
    for name in paths:
        report[f"{name}_s"] = [round(s, 3) for s in seconds[name]]
        report[f"{name}_median_s"] = statistics.median(seconds[name])
    report["speedup_fast_vs_reference"] = report["reference_median_s"] / report["fast_median_s"]

    print(f"{args.dtype}, {args.side}x{args.side}, channels_last={args.channels_last}, {report['threads']} threads")
    for name in paths:
        print(f"{name:>9}: median {report[f'{name}_median_s']:.2f} s  (runs {report[f'{name}_s']})")
    print(f"fast path speed-up over the reference: {report['speedup_fast_vs_reference']:.2f}x")
    for name in paths:
        print(f"\n{name}: op | self time (s) | calls")
        for row in report[f"{name}_ops"]:
            print(f"  {row['op']:<52} {row['self_s']:>8.3f} {row['calls']:>6}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
