"""The README's quickstart numbers belong to the code: its table is the record's, and a reduced quickstart reproduces
the record's reduced numbers (regenerate both with `python scripts/update_quickstart_results.py`)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORD = json.loads((ROOT / "docs" / "quickstart_results.json").read_text())


def test_readme_table_is_the_record():
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_quickstart_results.py"), "--check"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("task", ["depth", "segmentation", "referring", "multitask"])
def test_reduced_quickstart_reproduces_the_record(task, tmp_path):
    reduced = RECORD["reduced"]
    env = {**os.environ, "OMP_NUM_THREADS": str(reduced["threads"]), "MKL_NUM_THREADS": str(reduced["threads"])}
    command = [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--task", task, "--output", str(tmp_path)]
    subprocess.run([*command, *reduced["args"]], check=True, env=env, cwd=ROOT, capture_output=True)
    got = json.loads((tmp_path / task / "results.json").read_text())
    expected = reduced["results"][task]
    assert got["steps"] == expected["steps"]
    for part in ("metrics", "baseline"):
        for key, value in expected[part].items():
            if isinstance(value, list):
                continue  # per-class lists: their means are compared
            assert math.isclose(got[part][key], value, rel_tol=1e-4, abs_tol=1e-6), (
                f"{task} {part}[{key!r}] = {got[part][key]} but the record has {value}: the change moves the "
                "quickstart's numbers; rerun `python scripts/update_quickstart_results.py` and commit what it writes."
            )
