"""ONNX export and the ONNX Runtime / OpenVINO runtimes (`vpd_hf.export`, `vpd-hf predict --runtime`): parity with the
PyTorch model on the tiny models of every exported task, the CLI's files, and the errors for unusable inputs.

Tolerances (stated in README/BENCHMARKS): outputs within 1e-4 of the PyTorch output's range (depth, logits), and
argmax labels identical except on at most `LABEL_FLIP_FRACTION` of the pixels (near-ties of two classes)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from background import BackgroundRun

pytest.importorskip("onnxruntime", reason="the `deploy` extra is not installed")
pytest.importorskip("openvino", reason="the `deploy` extra is not installed")
pytest.importorskip("onnxscript", reason="the `deploy` extra is not installed")

import vpd_hf
from vpd_hf.cli import main as cli_main
from vpd_hf.export import ExportedVPDModel, check_export, export_model
from vpd_hf.testing_utils import tiny_referring_config, tiny_segmentation_config, tiny_vpd_config

RELATIVE_TOLERANCE = 1e-4
LABEL_FLIP_FRACTION = 1e-3
TASKS = ("depth", "segmentation", "normals", "referring")
SIZES = ((64, 128), (128, 64))


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fresh models have zero prompt tables, zero adapter gammas and near-constant heads: give them visible values
    (the depth head's output then spans a range well above the float32 noise)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "prompt_embeddings" in name or name.endswith("gamma"):
                parameter.normal_(generator=generator)
            elif name.startswith("head.") and parameter.ndim > 1:
                parameter.normal_(std=0.2, generator=generator)
        for name, buffer in model.named_buffers():
            if "prompt_embeddings" in name:
                buffer.normal_(generator=generator)
    return model.eval()


def _build(task: str, folder, tokenizer_dir) -> torch.nn.Module:
    if task == "depth":
        model = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config())
        processor = vpd_hf.VPDImageProcessor.for_task("depth", size={"shortest_edge": 64, "longest_edge": 128})
    elif task == "normals":
        model = vpd_hf.VPDModelForNormalEstimation(tiny_vpd_config(tasks=["normals"]))
        processor = vpd_hf.VPDImageProcessor.for_task("depth", size={"shortest_edge": 64, "longest_edge": 128})
    elif task == "segmentation":
        # The official sliding windows (here 96 px every 64): windows that are not multiples of 64 are padded before
        # the graph, as the model pads them internally.
        config = tiny_segmentation_config(
            semantic_inference_mode="slide", semantic_inference_crop_size=96, semantic_inference_stride=64
        )
        model = vpd_hf.VPDModelForSegmentation(config)
        processor = vpd_hf.VPDImageProcessor.for_task("segmentation", size={"shortest_edge": 64, "longest_edge": 128})
    else:
        from transformers import CLIPTokenizer

        model = vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config(token_length=8))
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, subfolder="tokenizer", model_max_length=8)
        image_processor = vpd_hf.VPDImageProcessor.for_task("referring", size={"height": 64, "width": 128})
        processor = vpd_hf.VPDProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = _randomize(model, seed=TASKS.index(task))
    if task == "normals":
        # raw vectors of a healthy length, as a trained head's: normalising near-zero vectors would amplify float32
        # rounding far beyond what the runtimes differ by
        with torch.no_grad():
            model.head.last_layer_normals[-1].weight.mul_(10)
            model.head.last_layer_normals[-1].bias.normal_(std=2.0, generator=torch.Generator().manual_seed(5))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


_STARTED: dict = {}


def start_in_background(request: pytest.FixtureRequest) -> None:
    """Called by conftest at the start of a session that will run these tests: builds and saves the tiny models, then
    starts one `vpd-hf export` process per task at low priority. Tracing a graph is ~45 s of single-threaded Python
    per task; started early, the exports use the core that the rest of the suite leaves idle, and the `exports`
    fixture below only collects them."""
    root = request.getfixturevalue("tmp_path_factory").mktemp("export")
    _STARTED.update(_start_exports(root, request.getfixturevalue("tiny_sd_dir")))


def stop_background() -> None:
    """Session end: ends exports that no test collected (a session stopped early)."""
    for run in _STARTED.get("runs", {}).values():
        run.stop()


def _start_exports(root, tokenizer_dir) -> dict:
    models = {task: _build(task, root / task, tokenizer_dir) for task in TASKS}
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {
        task: BackgroundRun(
            [sys.executable, "-m", "vpd_hf.cli", "export", "--model", str(root / task), "--output", str(root / f"{task}-onnx")],
            root / f"{task}-export.log", env=environment,
        )
        for task in TASKS
    }  # fmt: skip
    return {"root": root, "models": models, "runs": runs}


@pytest.fixture(scope="module")
def exports():
    """Per task: the saved PyTorch model, its folder, and its export folder (each task exported once by `vpd-hf
    export`, started with the session: see `start_in_background`)."""
    root = _STARTED["root"]
    for run in _STARTED["runs"].values():
        run.output()
    return {
        task: {
            "model": model,
            "folder": root / task,
            "export": root / f"{task}-onnx",
            "info": json.loads((root / f"{task}-onnx" / "export_info.json").read_text()),
        }
        for task, model in _STARTED["models"].items()
    }


def _inputs(task: str, size: tuple[int, int], batch: int, config) -> dict[str, torch.Tensor]:
    """Images in [-1, 1]; with batch 2 the second image fills only a region 64 pixels shorter along its long side (a
    padded batch of two sizes, as the processor makes it), so that the runtime runs two size groups as the model."""
    generator = torch.Generator().manual_seed(sum(size) + batch)
    pixel_values = torch.rand(batch, 3, *size, generator=generator) * 2 - 1
    pixel_mask = torch.ones(batch, *size, dtype=torch.long)
    if batch == 2:
        if size[0] > size[1]:
            pixel_mask[1, size[0] - 64 :] = 0
        else:
            pixel_mask[1, :, size[1] - 64 :] = 0
        pixel_values[1] *= pixel_mask[1]
    inputs = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    if task == "referring":
        inputs["input_ids"] = torch.randint(1, 100, (batch, config.token_length), generator=generator)
    return inputs


@pytest.fixture(scope="module")
def references(exports):
    """Per task: the parity cases (two sizes x batch 1 and 2) with the PyTorch outputs, computed once."""
    cases = {}
    for task in TASKS:
        model = exports[task]["model"]
        cases[task] = []
        for size in SIZES:
            for batch in (1, 2):
                inputs = _inputs(task, size, batch, model.config)
                with torch.no_grad():
                    cases[task].append((inputs, model(**inputs)))
    return cases


def _main_output(task: str, output) -> torch.Tensor:
    name = {"depth": "predicted_depth", "normals": "predicted_normals"}.get(task, "logits")
    return getattr(output, name)


def _assert_close(task: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    spread = float(expected.max() - expected.min())
    assert spread > 1e-2  # a constant output would make the comparison meaningless
    difference = float((got - expected).abs().max())
    assert difference <= RELATIVE_TOLERANCE * spread, (difference, spread)
    if task not in ("depth", "normals"):
        changed = (got.argmax(dim=1) != expected.argmax(dim=1)).float().mean()
        assert float(changed) <= LABEL_FLIP_FRACTION


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("task", TASKS)
def test_runtime_matches_pytorch(exports, references, task, runtime):
    """The exported model called like the PyTorch one, at two sizes and batch 1 and 2 (two size groups)."""
    entry = exports[task]
    exported = ExportedVPDModel(entry["export"], runtime, task=task)
    for inputs, expected in references[task]:
        got = exported(**inputs)
        _assert_close(task, _main_output(task, got), _main_output(task, expected))
        assert torch.equal(got.pixel_mask, expected.pixel_mask)
    if task == "segmentation":  # the graph alone: one whole-image pass at 1/8, as the model's single pass
        pixel_values = references[task][-1][0]["pixel_values"]
        with torch.no_grad():
            single = entry["model"]._single_pass(pixel_values)[0]
        _assert_close(task, exported.run(pixel_values=pixel_values)["logits"], single)


def test_export_info_describes_the_graph(exports):
    info = json.loads((exports["referring"]["export"] / "export_info.json").read_text())
    assert info == exports["referring"]["info"]
    assert info["task"] == "referring" and info["opset"] == 18 and info["dtype"] == "fp32"
    assert [i["name"] for i in info["inputs"]] == ["pixel_values", "input_ids"]
    assert info["inputs"][0]["shape"] == ["batch", 3, "64*height_blocks", "64*width_blocks"]
    assert info["inputs"][1]["shape"] == ["batch", 8] and info["inputs"][1]["dtype"] == "int64"
    assert info["outputs"][0]["name"] == "logits" and info["outputs"][0]["shape"][:2] == ["batch", 2]
    assert info["files"]["model.onnx"] == (exports["referring"]["export"] / "model.onnx").stat().st_size
    assert {"torch", "onnx", "onnxruntime", "openvino"} <= set(info["versions"])
    # The processor and config travel with the graph: the tokenizer pads to the exported token length.
    processor = vpd_hf.VPDProcessor.from_pretrained(exports["referring"]["export"])
    assert processor.tokenizer.model_max_length == 8


def _image(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


@pytest.mark.parametrize(
    ("task", "runtime"), [("depth", "openvino"), ("segmentation", "onnxruntime"), ("referring", "onnxruntime")]
)
def test_cli_runtime_writes_the_files_of_the_pytorch_run(exports, tmp_path, capsys, task, runtime):
    """`vpd-hf predict --runtime R` writes the files and manifest of the PyTorch run, with the same values (depth in
    millimetres within the tolerance, identical labels and masks outside the stated fraction)."""
    images = [_image(tmp_path / "a.png", (72, 100), 0), _image(tmp_path / "b.png", (100, 64), 1)]
    common = ["predict", "--task", task, *map(str, images), "--batch-size", "2", "--no-progress"]
    if task == "referring":
        common += ["--text", "the red box"]
    entry = exports[task]
    assert cli_main([*common, "--model", str(entry["folder"]), "--output", str(tmp_path / "torch")]) == 0
    assert cli_main([*common, "--model", str(entry["export"]), "--runtime", runtime,
                     "--output", str(tmp_path / runtime)]) == 0  # fmt: skip
    capsys.readouterr()

    def manifest(folder):
        return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]

    expected, got = manifest(tmp_path / "torch"), manifest(tmp_path / runtime)
    assert got == expected and len(got) == 2
    for entry_line in expected:
        for name in entry_line["files"]:
            a, b = _read(tmp_path / "torch" / name), _read(tmp_path / runtime / name)
            assert a.shape == b.shape
            if name.endswith("_depth16.png"):  # millimetres: 1e-4 of the range, at least the 1 mm quantisation step
                assert np.abs(a - b).max() <= max(1, RELATIVE_TOLERANCE * (a.max() - a.min()))
            elif name.endswith(("_labels.png", "_mask.png")):
                assert (a != b).mean() <= LABEL_FLIP_FRACTION
            else:  # colour visualisations: the same picture up to a rounding step
                assert np.abs(a - b).mean() < 1


def test_bad_inputs_give_clear_errors(exports, tmp_path, capsys):
    depth = exports["depth"]
    # A folder without an ONNX file: a PyTorch checkpoint is named as such.
    with pytest.raises(ValueError, match=r"has no model\.onnx.*PyTorch checkpoint: export it first"):
        ExportedVPDModel(depth["folder"], "onnxruntime")
    with pytest.raises(ValueError, match="no such folder"):
        check_export(tmp_path / "missing")
    # The export of another task.
    with pytest.raises(ValueError, match="holds an exported depth model, not a segmentation model"):
        ExportedVPDModel(depth["export"], "openvino", task="segmentation")
    # Sizes that are not multiples of 64, fed to the graph directly.
    exported = ExportedVPDModel(depth["export"], "onnxruntime")
    with pytest.raises(ValueError, match="multiples of 64 for the exported graph, got 100x128"):
        exported.run(pixel_values=torch.zeros(1, 3, 100, 128))
    with pytest.raises(TypeError, match=r"takes \['pixel_values'\]"):
        exported.run(pixel_values=torch.zeros(1, 3, 64, 64), input_ids=torch.zeros(1, 8, dtype=torch.long))
    referring = ExportedVPDModel(exports["referring"]["export"], "onnxruntime")
    with pytest.raises(ValueError, match=r"`input_ids` must be integers of shape \(1, 8\)"):
        referring.run(pixel_values=torch.zeros(1, 3, 64, 64), input_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="`runtime` must be one of"):
        ExportedVPDModel(depth["export"], "tensorrt")
    with pytest.raises(ValueError, match="`precision`"):
        ExportedVPDModel(depth["export"], "onnxruntime", precision="bf16")
    # On the command line: exit status 2 and the flag's name.
    image = _image(tmp_path / "a.png", (64, 64), 0)
    command = ["predict", "--task", "segmentation", str(image), "--output", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*command, "--model", str(depth["export"]), "--runtime", "onnxruntime"])
    assert exit_info.value.code == 2
    assert "`--model`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*command, "--model", str(exports["segmentation"]["export"]), "--runtime", "onnxruntime",
                  "--device", "cuda"])  # fmt: skip
    assert "runs on the CPU" in capsys.readouterr().err
    # Exporting: a wrong dtype or opset is named before anything is traced.
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        export_model(depth["folder"], tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="`opset` must be an integer >= 18"):
        export_model(depth["folder"], tmp_path / "x", opset=11)
    with pytest.raises(ValueError, match="the model is a depth model"):
        export_model(depth["model"], tmp_path / "x", task="segmentation")
