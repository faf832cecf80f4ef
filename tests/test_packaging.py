"""The README's commands, CI and the package metadata agree."""

import json
import re
import sys
from pathlib import Path

import pytest

from background import BackgroundRun

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


HELP_SCRIPTS = [
    "quickstart.py",
    "train.py",
    "evaluate.py",
    "benchmark.py",
    "depth_demo.py",
    "measure_loading.py",
    "measure_training_memory.py",
    "profile_paths.py",
]
_STARTED: dict[str, BackgroundRun] = {}


def start_in_background(request: pytest.FixtureRequest) -> None:
    """Called by conftest when the session starts: the scripts' runs below are seconds of single-threaded imports
    each, so they run side by side, at low priority, while the rest of the suite runs."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("scripts")
    scripts = ROOT / "scripts"
    commands = {f"help:{script}": [str(scripts / script), "--help"] for script in HELP_SCRIPTS}
    commands["depth_demo"] = [str(scripts / "depth_demo.py"), "--output", "out"]
    commands["benchmark"] = [
        str(scripts / "benchmark.py"), "--size", "tiny", "--tasks", "segmentation", "--resolutions", "64",
        "--dtypes", "fp32", "--repeats", "1", "--warmup", "0", "--marigold-steps", "2", "--train-modes", "lora",
        "--train-resolution", "64", "--train-batch-size", "2", "--cache-dir", "models", "--json", "bench.json",
    ]  # fmt: skip
    commands["profile"] = [
        str(scripts / "profile_paths.py"), "--tiny", "--side", "64", "--rounds", "1", "--ops", "60", "--json",
        "profile.json",
    ]  # fmt: skip
    for name, command in commands.items():
        folder = root / name.replace(":", "-")
        folder.mkdir()
        _STARTED[name] = BackgroundRun([sys.executable, *command], folder / "output.log", cwd=folder)


def stop_background() -> None:
    for run in _STARTED.values():
        run.stop()


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    test_command = next(c for c in commands if "pytest" in c)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines
    assert commands[0].startswith("python3 -m venv") and commands[0].endswith("python scripts/quickstart.py")
    # The CPU torch is installed before the package, so that pip keeps it.
    for command in commands[:2]:
        assert command.index("pip install torch==2.13.0") < command.index("pip install -e")


def test_bundled_photo_ships_with_the_package():
    from vpd_hf.examples import example_image_path

    assert example_image_path().is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'vpd_hf = ["assets/*", "training/recipes/*.yaml", "model_cards/*.md"]' in pyproject
    from vpd_hf.training.config import RECIPES, recipe_path

    assert all(recipe_path(name).is_file() for name in RECIPES)


def test_import_registers_the_auto_classes():
    from transformers import CONFIG_MAPPING, AutoModelForDepthEstimation

    import vpd_hf

    assert CONFIG_MAPPING["vpd"] is vpd_hf.VPDConfig
    assert AutoModelForDepthEstimation._model_mapping[vpd_hf.VPDConfig] is vpd_hf.VPDModelForDepthEstimation


def test_demo_script_runs_offline():
    run = _STARTED["depth_demo"]
    assert "random weights" in run.output()
    out = run.log.parent / "out"
    from PIL import Image

    color = Image.open(out / "depth_color.png")
    depth16 = Image.open(out / "depth_16bit.png")
    assert color.size == (600, 400) and color.mode == "RGB"
    assert depth16.size == (600, 400) and depth16.mode.startswith("I")
    assert (out / "vpd-depth" / "model.safetensors").is_file() and (out / "vpd-depth" / "config.json").is_file()


def test_benchmark_harness_smoke():
    """The harness runs end to end on the tiny model (timings are recorded in BENCHMARKS.md, never asserted)."""
    run = _STARTED["benchmark"]
    output = run.output()
    assert "| segmentation | fp32 |" in output and "| segmentation | lora |" in output
    report = json.loads((run.log.parent / "bench.json").read_text())
    (run,) = report["inference"]
    assert {"model", "pipeline", "bare", "head", "marigold", "reference", "gflops"} <= run.keys()
    assert run["model"]["64x1"]["median_s"] > 0 and run["gflops"]["64"] > 0
    # the fast path (SDPA + capture of the K maps only) matches the official-design path on the same weights
    assert run["correctness"]["ok"] and run["correctness"]["relative_l2_error"] < 1e-4
    assert run["reference"]["stored_maps"] > 0
    (train,) = report["training"]
    assert train["mode"] == "lora" and train["step"]["median_s"] > 0
    # LoRA trains adapters + head, far fewer parameters than the whole model
    assert 0 < train["trainable_parameters"] < train["total_parameters"] / 2
    assert report["environment"]["torch"] and report["command"].startswith("benchmark.py")


@pytest.mark.parametrize("script", HELP_SCRIPTS)
def test_scripts_explain_themselves(script):
    """`scripts/evaluate.py` shares the `evaluate` library's name and sits first on every script's import path:
    vpd_hf must still import the real library (quickstart.py's imports reach it before its `--help` is parsed;
    train.py and evaluate.py parse their arguments before importing anything heavy)."""
    output = _STARTED[f"help:{script}"].output()
    assert "usage:" in output and "--" in output


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu_ddp", "fsdp"])
def test_accelerate_config_files_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "bf16"
    expected = {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP"}[name]
    assert config.distributed_type.value == expected
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        wrapped = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert wrapped == [BasicTransformerBlock.__name__, ResnetBlock2D.__name__]


def test_profile_paths_compares_the_fast_path_with_the_reference():
    """The profiling harness on the tiny model: both paths timed, and their op lists show the attention each uses."""
    run = _STARTED["profile"]
    run.output()
    report = json.loads((run.log.parent / "profile.json").read_text())
    assert report["fast_median_s"] > 0 and report["reference_median_s"] > 0
    fast_ops = {row["op"] for row in report["fast_ops"]}
    reference_ops = {row["op"] for row in report["reference_ops"]}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in fast_ops  # SDPA in the plain attention layers
    assert "aten::_softmax" in reference_ops and "aten::baddbmm" in reference_ops  # materialised probabilities
