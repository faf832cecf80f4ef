#!/usr/bin/env python
"""Accuracy at equal training budget: each task of the three-head multi-task model against a model trained on that
task alone, with the same pipeline, steps, batch, seed and data (the quickstart's multitask setting on synthetic
scenes, tiny model, CPU).

    python scripts/compare_multitask.py [--steps N] [--output DIR]   # about 4 quickstart runs; writes docs/multitask_accuracy.json

The single-task models are `VPDModelForDensePrediction`s with one head (`quickstart.py --task multitask --tasks X`):
the same head, loss, data adapter (`vpd_hf.data.dense_dataset`: one flip / crop / photometric draw for the image),
optimiser, schedule and evaluation (one pass + flip) as the multi-task model, so only the other heads differ. Their
conditioning is each single-task class's: class prompts with segmentation, the scene token without (depth, normals).
Relative difference = (multi - single) / single, signed so that > 0 means the multi-task model is worse.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "docs" / "multitask_accuracy.json"
HEADLINE = {"depth": ("rmse", "lower"), "segmentation": ("mean_iou", "higher"), "normals": ("mean", "lower")}


def run(variant: str, tasks: list[str], output: Path, extra: list[str], reuse: bool = False) -> dict:
    results_file = output / variant / "multitask" / "results.json"
    if reuse and results_file.is_file():  # e.g. runs started by hand, in parallel, with the same arguments
        return json.loads(results_file.read_text())
    command = [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--task", "multitask", "--tasks", *tasks,
               "--output", str(output / variant), "--examples", "1", *extra]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    results = json.loads((output / variant / "multitask" / "results.json").read_text())
    return {**results, "wall_time_s": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/compare_multitask"))
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the quickstart's)")
    parser.add_argument("--record", type=Path, default=RECORD, help="where to write the JSON record")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose results.json is already in --output")
    parser.add_argument(
        "--multitask-from",
        type=Path,
        default=None,
        help="take the three-head run from this quickstart record (docs/quickstart_results.json, its `full` "
        "multitask entry: the same setting) instead of training it again",
    )
    args = parser.parse_args()
    extra = [] if args.steps is None else ["--steps", str(args.steps)]
    import torch

    if args.multitask_from is not None:
        runs = {"multitask": json.loads(args.multitask_from.read_text())["full"]["multitask"]}
    else:
        runs = {"multitask": run("multitask", list(HEADLINE), args.output, extra, args.reuse)}
    for task in HEADLINE:
        runs[task] = run(task, [task], args.output, extra, args.reuse)
    comparison = {}
    for task, (key, better) in HEADLINE.items():
        multi, single = runs["multitask"]["metrics"][f"{task}/{key}"], runs[task]["metrics"][f"{task}/{key}"]
        worse = (multi - single) / abs(single) if better == "lower" else (single - multi) / abs(single)
        comparison[task] = {"metric": key, "multitask": multi, "single_task": single, "relative_worse": worse}
    record = {
        "command": f"python scripts/{Path(__file__).name}" + (f" --steps {args.steps}" if args.steps else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "comparison": comparison,
        "runs": runs,
    }
    args.record.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print("| task | metric | multi-task (3 heads, one pass) | single-task | multi-task worse by |")
    print("|---|---|---|---|---|")
    for task, row in comparison.items():
        print(f"| {task} | {row['metric']} | {row['multitask']:.4f} | {row['single_task']:.4f} | "
              f"{100 * row['relative_worse']:+.1f} % |")  # fmt: skip
    print(f"wrote {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
