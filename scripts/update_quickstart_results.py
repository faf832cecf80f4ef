#!/usr/bin/env python
"""Keeps the README's quickstart numbers and pictures true to the code.

    python scripts/update_quickstart_results.py           # rerun everything (about 13 min on 2 CPU cores) and rewrite
    python scripts/update_quickstart_results.py --tasks multitask   # rerun some tasks, keep the others' records
    python scripts/update_quickstart_results.py --check   # does the README table match docs/quickstart_results.json?

The update runs `scripts/quickstart.py` for the four tasks (depth, segmentation, referring, multitask) as a newcomer would (the README's numbers and wall times),
copies their pictures to `docs/`, runs each task once more in a reduced, single-threaded setting, writes all of it to
`docs/quickstart_results.json`, and rewrites the README table from that record. The tests check that the README table
is the record's, and rerun the reduced setting against the record: a change that moves the quickstart's numbers fails
them until this script is rerun, so the README is regenerated in the same commit as the change.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "docs" / "quickstart_results.json"
README = ROOT / "README.md"
TASKS = ("depth", "segmentation", "referring", "multitask")
# Small enough to rerun in the test suite (seconds per task), on one thread: bitwise reproducible on a given machine.
REDUCED_ARGS = ["--size", "64", "--num-train", "16", "--num-eval", "8", "--steps", "8", "--batch-size", "4",
                "--examples", "1"]  # fmt: skip
START, END = "<!-- quickstart-table:start -->", "<!-- quickstart-table:end -->"
# Other kernel choices on this machine, standing in for other CPUs: ATen's vectorised kernels at AVX2 (CPUs without
# AVX-512), oneDNN capped at AVX2 or at AVX-512 without bf16/AMX, both caps together, and two threads (other
# reduction orders). A reduced run is bitwise reproducible on one machine and setting, not across these.
KERNEL_VARIANTS: dict[str, dict[str, str]] = {
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn-avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "two-threads": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
}
# A reduced run's tolerance: SAFETY x the largest deviation seen under KERNEL_VARIANTS, at least the floor (relative
# to the value). Training losses are continuous: kernel noise after 8 steps is far below a recipe change (measured
# in BENCHMARKS.md). Metrics that count pixels (IoU, accuracies, delta thresholds, precision@k) flip with ties on a
# barely trained model: the cross-machine report of issue 19 saw mIoU move by 4 %, hence their 10 % floor.
SAFETY = 4.0
LOSS_FLOOR = 1e-4
CONTINUOUS_FLOOR = 1e-4
COUNTING_FLOOR = 0.1
CONTINUOUS_METRICS = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "mean", "median"}


def run_quickstart(
    task: str, output: Path, extra: list[str], threads: int | None = None, env_overrides: dict[str, str] | None = None
) -> tuple[dict, float]:
    """Runs `scripts/quickstart.py` in a fresh process; returns its results.json and its wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(env_overrides or {})
    command = [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--task", task, "--output", str(output), *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    results = json.loads((output / task / "results.json").read_text())
    return results, time.perf_counter() - started


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def readme_table(record: dict) -> str:
    """The README's quickstart table, from the record."""
    full = record["full"]
    depth, seg, ref = (full[task] for task in ("depth", "segmentation", "referring"))
    dm, sm, rm = depth["metrics"], seg["metrics"], ref["metrics"]
    rows = [
        "| `--task` | steps | metric on the held-out scenes | trained tiny VPD | trivial baseline | wall time |",
        "|---|---|---|---|---|---|",
        f"| `depth` (default) | {depth['steps']} | RMSE (m) over {dm['num_images']} images, lower is better | "
        f"**{dm['rmse']:.3f}** (δ1 {dm['d1']:.3f}, AbsRel {dm['abs_rel']:.3f}) | "
        f"{depth['baseline']['rmse']:.3f} (mean depth of the training set) | {minutes(depth['wall_time_s'])} |",
        f"| `segmentation` | {seg['steps']} | mIoU, {len(sm['per_category_iou'])} classes | "
        f"**{sm['mean_iou']:.3f}** (aAcc {sm['overall_accuracy']:.3f}) | "
        f"{seg['baseline']['mean_iou']:.3f} (majority class) | {minutes(seg['wall_time_s'])} |",
        f"| `referring` | {ref['steps']} | oIoU over {rm['num_expressions']} expressions | "
        f"**{rm['overall_iou']:.3f}** (mIoU {rm['mean_iou']:.3f}, P@0.5 {rm['precision@0.5']:.3f}) | "
        f"{ref['baseline']['overall_iou']:.3f} (empty mask) | {minutes(ref['wall_time_s'])} |",
    ]
    if "multitask" in full:
        multi = full["multitask"]
        mm, mb = multi["metrics"], multi["baseline"]
        rows.append(
            f"| `multitask` (one model, one pass) | {multi['steps']} | depth RMSE (m) / mIoU / normals mean angle, "
            f"{mm['depth/num_images']} images | **{mm['depth/rmse']:.3f}** / **{mm['segmentation/mean_iou']:.3f}** / "
            f"**{mm['normals/mean']:.1f}°** (normals within 30° {mm['normals/a30']:.3f}) | "
            f"{mb['depth/rmse']:.3f} / {mb['segmentation/mean_iou']:.3f} / {mb['normals/mean']:.1f}° (mean depth, "
            f"majority class, mean normal) | {minutes(multi['wall_time_s'])} |"
        )
    return "\n".join(rows)


def readme_with_table(readme: str, record: dict) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no {START} ... {END} block for the quickstart table.")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{readme_table(record)}\n{END}{tail}"


def _quantities(results: dict) -> dict[str, float]:
    """The numbers a reduced run is compared on: each logged training loss, and the scalar metrics and baseline."""
    values = {f"loss@{step}": float(loss) for step, loss in results.get("losses", [])}
    for part in ("metrics", "baseline"):
        for key, value in results[part].items():
            if isinstance(value, (int, float)) and not key.rsplit("/", 1)[-1].startswith("num_"):
                values[f"{part}.{key}"] = float(value)
    return values


def _floor(name: str) -> float:
    if name.startswith("loss@"):
        return LOSS_FLOOR
    metric = name.split(".", 1)[1].rsplit("/", 1)[-1]  # a multi-task metric is named `task/metric`
    return CONTINUOUS_FLOOR if metric in CONTINUOUS_METRICS else COUNTING_FLOOR


def tolerances(reference: dict, variants: dict[str, dict]) -> dict[str, float]:
    """Absolute tolerance of each quantity: SAFETY x its largest deviation under the kernel variants, at least its
    floor relative to the value."""
    expected = _quantities(reference)
    spread = {name: 0.0 for name in expected}
    for results in variants.values():
        got = _quantities(results)
        for name, value in expected.items():
            spread[name] = max(spread[name], abs(got.get(name, math.inf) - value))
    return {name: max(SAFETY * spread[name], _floor(name) * abs(value)) for name, value in expected.items()}


def compare_reduced(got: dict, expected: dict) -> list[str]:
    """What differs between a reduced run's results and the record's entry (with its `tolerances`); empty when the
    run reproduces the record within the tolerances."""
    problems = []
    if got["steps"] != expected["steps"]:
        problems.append(f"steps: {got['steps']} but the record has {expected['steps']}")
    want, have, tolerance = _quantities(expected), _quantities(got), expected["tolerances"]
    if have.keys() != want.keys():
        problems.append(f"quantities {sorted(have.keys() ^ want.keys())} are not in both the run and the record")
    for name in sorted(want.keys() & have.keys()):
        if abs(have[name] - want[name]) > tolerance[name]:
            problems.append(
                f"{name} = {have[name]:.6g} but the record has {want[name]:.6g} (tolerance {tolerance[name]:.3g})"
            )
    return problems


def measure_reduced(task: str, folder: Path) -> dict:
    """The reduced run of `task` (one thread) with its tolerances, and each kernel variant's deviation."""
    reference, _ = run_quickstart(task, folder / "reference", REDUCED_ARGS, threads=1)
    variants = {}
    for name, overrides in KERNEL_VARIANTS.items():
        variants[name], _ = run_quickstart(task, folder / name, REDUCED_ARGS, threads=1, env_overrides=overrides)
    expected = _quantities(reference)
    deviations = {
        name: max(abs(_quantities(results).get(key, math.inf) - value) / max(abs(value), 1e-12)
                  for key, value in expected.items() if key.startswith("loss@"))
        for name, results in variants.items()
    }  # fmt: skip
    metric_deviations = {
        name: {
            key: abs(_quantities(results)[key] - value) for key, value in expected.items() if key.startswith("metrics.")
        }
        for name, results in variants.items()
    }
    return {
        **reference,
        "tolerances": tolerances(reference, variants),
        "kernel_variants": {"max_relative_loss_deviation": deviations, "metric_deviations": metric_deviations},
    }


def check() -> int:
    record = json.loads(RECORD.read_text())
    readme = README.read_text()
    if readme_with_table(readme, record) != readme:
        print(f"README.md's quickstart table differs from {RECORD.relative_to(ROOT)}: run {Path(__file__).name}.")
        return 1
    print("README.md's quickstart table matches the record.")
    return 0


def update(tasks: tuple[str, ...] = TASKS) -> int:
    """Reruns `tasks` and rewrites their records; the other tasks' records (and their date / machine) are kept."""
    import torch

    machine = {
        "command": f"python scripts/{Path(__file__).name}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    if set(tasks) == set(TASKS) or not RECORD.exists():
        reduced = {"args": REDUCED_ARGS, "threads": 1, "kernel_variants": KERNEL_VARIANTS, "results": {}}
        record: dict = {**machine, "full": {}, "reduced": reduced}
    else:
        record = json.loads(RECORD.read_text())
        if record["reduced"]["args"] != REDUCED_ARGS:
            raise ValueError("The record's reduced setting differs from REDUCED_ARGS: rerun every task.")
    with tempfile.TemporaryDirectory() as folder:
        for task in tasks:
            results, seconds = run_quickstart(task, Path(folder) / "full", [])
            record["full"][task] = {**results, "wall_time_s": round(seconds, 1)}
            if set(tasks) != set(TASKS):  # a partial rerun: say where and when these numbers come from
                record["full"][task]["run"] = machine
            source = Path(folder) / "full" / task
            shutil.copyfile(source / "examples.png", ROOT / "docs" / f"quickstart_{task}.png")
            if task == "depth":
                shutil.copyfile(source / "training_curve.png", ROOT / "docs" / "quickstart_depth_curve.png")
            record["reduced"]["results"][task] = measure_reduced(task, Path(folder) / "reduced" / task)
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    README.write_text(readme_with_table(README.read_text(), record))
    print(f"wrote {RECORD.relative_to(ROOT)}, the README table and the pictures in docs/")
    return 0


def update_reduced(tasks: list[str]) -> int:
    """Reruns only the reduced runs of `tasks` (and their kernel variants), keeping the rest of the record."""
    record = json.loads(RECORD.read_text())
    record["reduced"].update(args=REDUCED_ARGS, threads=1, kernel_variants=KERNEL_VARIANTS)
    with tempfile.TemporaryDirectory() as folder:
        for task in tasks:
            record["reduced"]["results"][task] = measure_reduced(task, Path(folder) / task)
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote the reduced runs of {', '.join(tasks)} to {RECORD.relative_to(ROOT)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check the README table against the record")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="the tasks to rerun")
    parser.add_argument(
        "--reduced", action="store_true",
        help="only rerun the reduced runs of --tasks (and their kernel variants), keeping the rest of the record",
    )  # fmt: skip
    args = parser.parse_args()
    if args.check:
        return check()
    return update_reduced(list(args.tasks)) if args.reduced else update(tuple(args.tasks))


if __name__ == "__main__":
    sys.exit(main())
