#!/usr/bin/env python
"""CPU runtimes for a VPD depth model: eager PyTorch fp32 and bf16 (the channels_last fast path,
`use_fast_memory_format`) against the ONNX export (`vpd_hf.export`) on ONNX Runtime fp32 and OpenVINO fp32 / bf16.

The model has random weights at the real SD-1.5 size (`--size full`, built and cached by scripts/benchmark.py's
`build_and_save`) or the tiny test size (`--size tiny`, a smoke run). Steps:

1. export the saved model to ONNX once (export time, file sizes; `--export-dir` is reused when it holds an export);
2. in one process, load every runtime and time one `--side`² crop per call, the runtimes alternated round by round
   (`--repeats` rounds after one warm-up call each), so that a contended machine slows all of them alike; parity of
   each runtime against eager fp32 on the same input (max abs difference, relative to the output's range);
3. the peak RSS of each runtime in a fresh process of its own (load + one call).

OpenVINO runs with static shapes (the model reshaped to the crop's size and compiled once: its fast path for a fixed
size). Prints a Markdown table and writes JSON (`--json`):

    flock /tmp/vpd-heavy.lock python scripts/benchmark_runtimes.py --json outputs/bench-runtimes.json
    python scripts/benchmark_runtimes.py --size tiny --side 128 --repeats 2       # smoke run
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RUNTIMES = ("eager-fp32", "eager-bf16", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16")


def _script(name: str):
    """A sibling script imported by path: benchmark.py (model building, memory readings), measure_precision.py."""
    spec = importlib.util.spec_from_file_location(f"vpd_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _benchmark_module():
    return _script("benchmark")


def calibrate_depth_head(folder: Path, side: int) -> bool:
    """Random weights saturate the depth head (`sigmoid * max_depth` of large logits is a constant map, and parity
    would compare constants): rescale its last convolution once, as scripts/measure_precision.py does, so that the
    depth of a photo spans its range, and save the model back (marker file `head_calibrated`). True if it changed."""
    from PIL import Image

    import vpd_hf

    marker = folder / "head_calibrated"
    if marker.is_file():
        return False
    model = vpd_hf.VPDModelForDepthEstimation.from_pretrained(folder).eval()
    photo = Image.open(Path(__file__).resolve().parent.parent / "src" / "vpd_hf" / "assets" / "coffee.jpg")
    image = photo.convert("RGB").resize((side, side), Image.BILINEAR)
    _script("measure_precision").calibrate("depth", model, vpd_hf.VPDImageProcessor(do_resize=False), image)
    model.save_pretrained(folder)
    marker.write_text("ok")
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="SD-1.5 size or the tiny test model")
    parser.add_argument("--side", type=int, default=512, help="square crop side (a multiple of 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "vpd_hf_benchmark_models")
    parser.add_argument("--export-dir", type=Path, default=None, help="default: CACHE_DIR/sd15-SIZE-depth-onnx")
    parser.add_argument(
        "--optimize-export",
        action="store_true",
        help="run onnxscript's optimiser on the export "
        "(off by default: slow on a 3.4 GB graph, and both runtimes optimise the graph themselves)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-runtime peak RSS processes")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", choices=RUNTIMES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side % 64:
        parser.error("--side must be a multiple of 64")
    args.backbone = "sd15"
    args.export_dir = args.export_dir or args.cache_dir / f"sd15-{args.size}-depth-onnx"
    return args


def load_runtime(args: argparse.Namespace, name: str):
    """`(call, seconds to load)`: `call(pixel_values)` -> depth `(B, H, W)` float32 on the runtime `name`."""
    import torch

    start = time.perf_counter()
    if name.startswith("eager"):
        import vpd_hf

        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        folder = _benchmark_module().model_path(args, "depth")
        model = vpd_hf.VPDModelForDepthEstimation.from_pretrained(folder, dtype=dtype).eval().use_fast_memory_format()

        def call(pixel_values):
            with torch.no_grad():
                return model(pixel_values=pixel_values).predicted_depth.float()
    else:
        from vpd_hf.export import ExportedVPDModel

        runtime, precision = name.split("-")
        model = ExportedVPDModel(args.export_dir, runtime, precision=precision, static_shapes=runtime == "openvino")

        def call(pixel_values):
            return model(pixel_values=pixel_values).predicted_depth

    return call, time.perf_counter() - start


def pixels(side: int):
    import torch

    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of one runtime alone: load, one call."""
    bench = _benchmark_module()
    call, load_s = load_runtime(args, args.worker)
    call(pixels(args.side))
    return {"runtime": args.worker, "load_s": load_s, "peak_rss_gb": bench.peak_memory_gb("cpu")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    import torch

    from vpd_hf.export import export_model

    bench = _benchmark_module()
    if not (bench.model_path(args, "depth") / "benchmark_ready").is_file():
        bench.build_and_save(args, "depth")
    if calibrate_depth_head(bench.model_path(args, "depth"), args.side) and args.export_dir.is_dir():
        shutil.rmtree(args.export_dir)  # exported from the model before calibration
    result: dict[str, Any] = {"size": args.size, "side": args.side, "repeats": args.repeats}
    if not (args.export_dir / "export_info.json").is_file():
        gc.collect()
        export_model(bench.model_path(args, "depth"), args.export_dir, optimize=args.optimize_export)
    info = json.loads((args.export_dir / "export_info.json").read_text())
    result["export"] = {
        "seconds": info["export_seconds"],
        "optimized": args.optimize_export,
        "files_gb": {k: v / 1e9 for k, v in info["files"].items()},
    }

    calls, rows = {}, {}
    for name in args.runtimes:
        calls[name], load_s = load_runtime(args, name)
        rows[name] = {"load_s": load_s, "times": []}
    image = pixels(args.side)
    outputs = {}
    for name, call in calls.items():  # warm-up (OpenVINO compiles for the shape here) and the parity outputs
        start = time.perf_counter()
        outputs[name] = call(image)
        rows[name]["first_call_s"] = time.perf_counter() - start
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(image)
            rows[name]["times"].append(time.perf_counter() - start)
    reference = outputs.get("eager-fp32")
    for name, row in rows.items():
        row["median_s"] = statistics.median(row["times"])
        if reference is not None:
            spread = float(reference.max() - reference.min())
            difference = float((outputs[name] - reference).abs().max())
            row["max_abs_diff"] = difference
            row["diff_over_range"] = difference / spread if spread > 0 else float("nan")
    if "eager-fp32" in rows:
        for row in rows.values():
            row["speedup_vs_eager_fp32"] = rows["eager-fp32"]["median_s"] / row["median_s"]
    result["depth_range_m"] = None if reference is None else float(reference.max() - reference.min())
    del calls, outputs
    gc.collect()

    if not args.no_memory:
        for name in rows:
            command = [sys.executable, __file__, "--worker", name, "--size", args.size, "--side", str(args.side),
                       "--cache-dir", str(args.cache_dir), "--export-dir", str(args.export_dir)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[name]["peak_rss_gb"] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    result["rows"] = rows
    import onnxruntime
    import openvino

    result["environment"] = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
    }
    print(f"| runtime | precision | median s/crop ({args.side}²) | vs eager fp32 | peak RSS GB | max abs diff (m) "
          "| diff / range |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        runtime, precision = name.rsplit("-", 1)
        print(f"| {runtime} | {precision} | {row['median_s']:.2f} | {row.get('speedup_vs_eager_fp32', 1):.2f}x "
              f"| {row.get('peak_rss_gb', float('nan')):.2f} | {row.get('max_abs_diff', 0):.2e} "
              f"| {row.get('diff_over_range', 0):.2e} |")  # fmt: skip
    print(f"export: {result['export']['seconds']:.0f} s, files {result['export']['files_gb']} GB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
