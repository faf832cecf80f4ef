"""The README's quickstart numbers belong to the code: its table is the record's, and a reduced quickstart reproduces
the record's reduced run (regenerate both with `python scripts/update_quickstart_results.py`).

A reduced run is bitwise reproducible on one machine, not across CPUs (other instruction sets, other kernels), so it
is compared within tolerances recorded beside it: four times the largest deviation measured under other kernel
choices (ATen at AVX2, oneDNN capped at AVX2 / AVX-512, two threads), at least a floor. The guard is tested both
ways: it passes under kernel choices it was not measured with, and fails when the recipe changes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORD = json.loads((ROOT / "docs" / "quickstart_results.json").read_text())


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


updater = load_script("update_quickstart_results")


def start_reduced_run(
    task: str, output: Path, extra: tuple[str, ...] = (), env: dict | None = None
) -> subprocess.Popen:
    """Starts the record's reduced quickstart of `task` in a fresh process (its threads, plus `env`)."""
    reduced = RECORD["reduced"]
    threads = str(reduced["threads"])
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    environment.update(env or {})
    command = [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--task", task, "--output", str(output)]
    return subprocess.Popen([*command, *reduced["args"], *extra], env=environment, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


# Other kernel choices than the variants the tolerances were measured with.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "OMP_NUM_THREADS": "2"}
TASKS = ("depth", "segmentation", "referring", "multitask")


@pytest.fixture(scope="module")
def reduced_runs(tmp_path_factory):
    """Every run the tests compare, started together (one thread each: the cores run them side by side): each task's
    reduced run, segmentation under OTHER_KERNELS, and segmentation with a 10 % higher learning rate."""
    root = tmp_path_factory.mktemp("reduced")
    learning_rate = load_script("quickstart").SETTINGS["segmentation"]["learning_rate"] * 1.1
    runs = {**{task: task for task in TASKS}, "other-kernels": "segmentation", "higher-lr": "segmentation"}
    started = {
        name: start_reduced_run(
            task, root / name,
            extra=("--learning-rate", str(learning_rate)) if name == "higher-lr" else (),
            env=OTHER_KERNELS if name == "other-kernels" else None,
        )
        for name, task in runs.items()
    }  # fmt: skip
    results = {}
    for name, process in started.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, (name, output[-3000:])
        results[name] = json.loads((root / name / runs[name] / "results.json").read_text())
    return results


def test_readme_table_is_the_record():
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_quickstart_results.py"), "--check"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("task", TASKS)
def test_reduced_quickstart_reproduces_the_record(task, reduced_runs):
    problems = updater.compare_reduced(reduced_runs[task], RECORD["reduced"]["results"][task])
    assert not problems, (
        f"The reduced {task} quickstart no longer reproduces docs/quickstart_results.json: {problems}. The change "
        "moves the quickstart's numbers: rerun `python scripts/update_quickstart_results.py` and commit what it writes."
    )


@pytest.fixture(scope="module")
def segmentation_record():
    return RECORD["reduced"]["results"]["segmentation"]


def test_guard_passes_under_kernel_choices_it_was_not_measured_with(segmentation_record, reduced_runs):
    """Segmentation: the task whose mIoU failed the old bitwise guard on a newcomer's machine."""
    assert OTHER_KERNELS not in updater.KERNEL_VARIANTS.values()
    assert updater.compare_reduced(reduced_runs["other-kernels"], segmentation_record) == []


def test_guard_fails_when_the_recipe_changes(segmentation_record, reduced_runs):
    problems = updater.compare_reduced(reduced_runs["higher-lr"], segmentation_record)
    assert any(problem.startswith("loss@") for problem in problems), problems
    one_more_step = {**segmentation_record, "steps": segmentation_record["steps"] + 1}
    one_more_step["losses"] = [*segmentation_record["losses"], [segmentation_record["steps"] + 1, 1.0]]
    problems = updater.compare_reduced(one_more_step, segmentation_record)
    assert problems and problems[0].startswith("steps:"), problems


def test_tolerances_are_four_times_the_measured_spread_or_the_floor(segmentation_record):
    """The rule, recomputed from the deviations stored beside the record."""
    for task, entry in RECORD["reduced"]["results"].items():
        values = updater._quantities(entry)
        assert entry["tolerances"].keys() == values.keys(), task
        for name, value in values.items():
            assert entry["tolerances"][name] >= updater._floor(name) * abs(value), (task, name)
        for variant, deviations in entry["kernel_variants"]["metric_deviations"].items():
            for key, deviation in deviations.items():
                assert entry["tolerances"][key] >= updater.SAFETY * deviation - 1e-15, (task, variant, key)
