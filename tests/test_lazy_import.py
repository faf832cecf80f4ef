"""`import vpd_hf` and `vpd-hf --help` import neither torch nor diffusers, and VPD is still registered with
transformers' Auto classes and pipelines whatever the import order. Each case runs in a fresh interpreter: the
question is what an import does to a process that has not imported anything yet."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "diffusers", "transformers.modeling_utils")


def start_python(code: str) -> subprocess.Popen:
    """Starts `code` in a fresh interpreter (offline, warnings about registration turned into errors)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-W", "error:vpd_hf could not register:RuntimeWarning", "-c", textwrap.dedent(code)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def last_line(process: subprocess.Popen, timeout: int = 180) -> str:
    """The last stdout line of a process started by `start_python`, which must succeed."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stdout.strip().splitlines()[-1]


def python(code: str, timeout: int = 180) -> str:
    """Runs `code` in a fresh interpreter and returns its last stdout line."""
    return last_line(start_python(code), timeout)


def test_import_vpd_hf_does_not_import_torch():
    loaded = json.loads(
        python(f"""
        import json, sys
        import vpd_hf
        import vpd_hf.cli  # what `vpd-hf --help` imports
        print(json.dumps([name for name in {list(HEAVY)!r} if name in sys.modules]))
        """)
    )
    assert loaded == []


def test_vpd_hf_help_does_not_import_torch():
    code = "import sys; from vpd_hf.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    code += f"print('heavy:', [name for name in {list(HEAVY)!r} if name in sys.modules])"
    last = python(code)
    assert last == "heavy: []"


def test_vpd_hf_train_without_arguments_prints_its_usage_without_torch():
    """It printed its usage after about 5 s of imports; now as fast as `--help` (`vpd_hf.training` is lazy too)."""
    code = "import sys; from vpd_hf.cli import main\nstatus = main(['train'])\n"
    code += f"print('status', status, 'heavy:', [name for name in {list(HEAVY)!r} if name in sys.modules])"
    assert python(code) == "status 2 heavy: []"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_help_answer_before_torch_is_imported(command):
    """`vpd-hf train --help` (and scripts/train.py, which share `vpd_hf.training.commands`) took ~5.5 s of imports."""
    code = f"import sys; from vpd_hf.cli import main\ntry:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
    code += f"print('heavy:', [name for name in {list(HEAVY)!r} if name in sys.modules])"
    assert python(code) == "heavy: []"


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    import vpd_hf
    from vpd_hf.testing_utils import tiny_vpd_config

    folder = tmp_path_factory.mktemp("lazy") / "depth"
    vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config()).save_pretrained(folder)
    vpd_hf.VPDImageProcessor.for_task("depth", size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(folder)
    return folder


IMPORT_ORDERS = {
    "auto-after": "import vpd_hf\nfrom transformers import AutoModelForDepthEstimation\n"
    "print(type(AutoModelForDepthEstimation.from_pretrained(FOLDER)).__name__)",
    # transformers' Auto machinery imported before vpd_hf: registered at `import vpd_hf`
    "auto-before": "from transformers import AutoModelForDepthEstimation\nimport vpd_hf\n"
    "print(type(AutoModelForDepthEstimation.from_pretrained(FOLDER)).__name__)",
    # a VPD class module imported directly (it imports transformers' modules while it runs)
    "class-module": "from vpd_hf.modeling_vpd import VPDModel\nfrom transformers import AutoModelForDepthEstimation\n"
    "print(type(AutoModelForDepthEstimation.from_pretrained(FOLDER)).__name__)",
    # diffusers imports transformers' Auto modules from inside its own imports
    "via-diffusers": "import vpd_hf\nfrom diffusers import StableDiffusionPipeline\n"
    "from transformers import AutoModelForDepthEstimation\n"
    "print(type(AutoModelForDepthEstimation.from_pretrained(FOLDER)).__name__)",
}


@pytest.fixture(scope="module")
def import_order_runs(depth_folder):
    """Every import order's interpreter, started together: each spends seconds in single-threaded imports, so
    running them side by side halves their time on two cores."""
    processes = {name: start_python(f"FOLDER = {str(depth_folder)!r}\n{code}") for name, code in IMPORT_ORDERS.items()}
    yield processes
    for process in processes.values():  # those a failed test left running
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize("order", list(IMPORT_ORDERS))
def test_registration_works_in_any_import_order(import_order_runs, order):
    assert last_line(import_order_runs[order]) == "VPDModelForDepthEstimation"


def test_registration_serves_the_pipelines_image_processors_and_auto_map(depth_folder):
    """The README's usage, `import vpd_hf` then transformers' pipeline factory, and what else registration sets up."""
    result = python(f"""
        import json
        import vpd_hf
        from transformers import AutoImageProcessor, pipeline
        from transformers.pipelines import PIPELINE_REGISTRY

        print(json.dumps({{
            "pipeline": type(pipeline("depth-estimation", model={str(depth_folder)!r}).model).__name__,
            "image_processor": type(AutoImageProcessor.from_pretrained({str(depth_folder)!r})).__name__,
            "referring": "referring-image-segmentation" in PIPELINE_REGISTRY.supported_tasks,
            "auto_map": vpd_hf.VPDConfig._auto_class,
        }}))
        """)
    assert json.loads(result) == {
        "pipeline": "VPDModelForDepthEstimation",
        "image_processor": "VPDImageProcessor",
        "referring": True,
        "auto_map": "AutoConfig",
    }


def test_lazy_attributes_are_the_submodules_objects():
    import vpd_hf
    from vpd_hf import modeling_vpd, visualization

    assert vpd_hf.VPDModelForDepthEstimation is modeling_vpd.VPDModelForDepthEstimation
    assert vpd_hf.colorize_depth is visualization.colorize_depth
    assert vpd_hf.data.synthetic.save_synthetic_dataset  # submodules stay reachable as attributes
    assert set(vpd_hf.__all__) <= set(dir(vpd_hf))
    assert all(getattr(vpd_hf, name) is not None for name in vpd_hf.__all__)
    with pytest.raises(AttributeError, match="no attribute 'VPDNothing'"):
        vpd_hf.VPDNothing  # noqa: B018
