"""`vpd-hf predict` / `vpd_hf.prediction` on real folders with odd files and wrong arguments: bad images are skipped,
recorded and summarised; wrong arguments give one clear line at once (no traceback, no wait on the network); referring
resume is keyed by (image, expression); `VPDConfig.from_pretrained` refuses the config of another model."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, CLIPTokenizer

import vpd_hf
from vpd_hf import cli
from vpd_hf.prediction import TASK_ARCHITECTURES, TASKS, predict_files
from vpd_hf.testing_utils import tiny_referring_config, tiny_vpd_config


def photo(path, size=(72, 56), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_sd_dir):
    """A depth and a referring model, a Stable Diffusion folder, a pickled copy of the depth model, a `bert` folder,
    and a folder of photos with a truncated JPEG and a text file named .png."""
    root = tmp_path_factory.mktemp("robustness")
    torch.manual_seed(0)
    vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config()).save_pretrained(root / "depth")
    vpd_hf.VPDImageProcessor.for_task("depth", size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(
        root / "depth"
    )
    referring = vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config(token_length=8)).eval()
    referring.save_pretrained(root / "referring")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer", model_max_length=8)
    image_processor = vpd_hf.VPDImageProcessor.for_task("referring", size={"height": 64, "width": 64})
    vpd_hf.VPDProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "referring")
    shutil.copytree(tiny_sd_dir, root / "sd")
    shutil.copytree(root / "depth", root / "pickled")
    torch.save(load_file(root / "pickled" / "model.safetensors"), root / "pickled" / "pytorch_model.bin")
    (root / "pickled" / "model.safetensors").unlink()
    bert = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    BertModel(bert).save_pretrained(root / "bert")  # config.json (`architectures`: BertModel) + model.safetensors
    photos = root / "photos"
    for k in range(3):
        photo(photos / f"ok{k}.jpg", seed=k)
    whole = (photos / "ok0.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (photos / "notes.png").write_text("not an image, only named like one")
    return root


def vpd_hf_cli(*argv, cwd, offline=True, timeout=240):
    """`vpd-hf ...` as a user runs it: a subprocess with its own HF_HOME (`cwd/hf_home`). `offline=False`: no
    HF_HUB_OFFLINE, and the Hub endpoint is a closed local port, i.e. a machine without network (no test reaches the
    real Hub)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(cwd / "hf_home"), "HF_HUB_OFFLINE": "1"}
    if not offline:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # huggingface_hub honours both
            env.pop(name, None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    command = [sys.executable, "-m", "vpd_hf.cli", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_a_folder_with_corrupt_images_is_predicted_and_the_bad_ones_reported(root, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", "--task", "depth", "--model", root / "depth", root / "photos", "--output", out,
            "--batch-size", "2", "--no-progress"]  # fmt: skip
    result = vpd_hf_cli(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("total", "predicted", "already_done", "skipped")} == {
        "total": 5, "predicted": 3, "already_done": 0, "skipped": 2
    }  # fmt: skip
    assert "UnidentifiedImageError" in summary["skipped_items"]["notes"]
    assert "truncated" in summary["skipped_items"]["truncated"]
    assert "3 predicted, 0 already done, 2 skipped:" in result.stderr
    assert "  notes: UnidentifiedImageError" in result.stderr and "  truncated: OSError: image file is truncated" in (
        result.stderr
    )
    assert sorted(p.name for p in out.glob("*_depth16.png")) == [f"ok{k}_depth16.png" for k in range(3)]
    manifest = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    skipped = {m["id"]: m for m in manifest if "skipped" in m}
    assert skipped.keys() == {"notes", "truncated"}
    assert skipped["notes"]["input"] == str(root / "photos" / "notes.png")
    assert "image file is truncated" in skipped["truncated"]["skipped"]

    # A rerun retries only the skipped images (they are not "done"); --strict turns skipping into a failure.
    assert cli.main([str(a) for a in [*argv, "--strict"]]) == 1
    assert "0 predicted, 3 already done, 2 skipped:" in capsys.readouterr().err
    assert cli.main([str(a) for a in argv]) == 0


def test_nothing_predictable_exits_non_zero(root, tmp_path):
    result = vpd_hf_cli("predict", "--task", "depth", "--model", root / "depth", root / "photos" / "notes.png",
                        root / "photos" / "truncated.jpg", "--output", tmp_path / "out", "--no-progress",
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "0 predicted, 0 already done, 2 skipped:" in result.stderr


def test_prediction_api_reports_instead_of_raising(root, tmp_path):
    result = predict_files("depth", root / "depth", [root / "photos"], tmp_path / "out", batch_size=4, progress=False)
    assert (result["predicted"], result["skipped"]) == (3, 2)
    assert set(result["skipped_items"]) == {"notes", "truncated"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "depth", "--model", "./typo"], "`--model` './typo': no such folder."),
        (["--task", "depth", "--model", "nope_folder"], "while the Hub cannot be reached"),
        (
            ["--task", "depth", "--model", "{root}/sd"],
            "is a Stable Diffusion checkpoint, not a VPD model. Build a VPD "
            "model from it with `VPDModelForDepthEstimation.from_stable_diffusion(",
        ),
        (
            ["--task", "segmentation", "--model", "{root}/depth"],
            "holds a depth model (VPDModelForDepthEstimation), not a segmentation model: use `--task` 'depth'",
        ),
        (
            ["--task", "depth", "--model", "{root}/pickled"],
            "holds pickled weights only (pytorch_model.bin): vpd_hf loads safetensors only, because unpickling",
        ),
        (["--task", "depth", "--model", "{root}/bert"], "holds a `bert` model (BertModel), not a VPD model"),
        (
            ["--task", "depth", "--model", "{root}/depth", "--device", "cuda"],
            "`--device` 'cuda': CUDA is not available",
        ),
    ],
    ids=["typo-path", "unknown-hub-id", "stable-diffusion", "other-task", "pickled", "other-model", "no-cuda"],
)
def test_wrong_model_or_device_is_one_clear_line(root, tmp_path, argv, message):
    """Run without HF_HUB_OFFLINE and without a network: a Hub id is looked up once, without retries, and not found
    in the cache."""
    argv = [a.format(root=root) for a in argv]
    start = time.monotonic()
    result = vpd_hf_cli("predict", *argv, root / "photos", "--output", tmp_path / "out", cwd=tmp_path, offline=False)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and message in result.stderr, result.stderr
    assert result.stderr.startswith("vpd-hf predict: error: ")
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are known to be good
    assert elapsed < 45  # transformers alone retries an unknown id for about a minute


def test_offline_unknown_hub_id_says_offline(root, tmp_path):
    result = vpd_hf_cli("predict", "--task", "depth", "--model", "nope_folder", root / "photos", "--output",
                        tmp_path / "out", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "'nope_folder' is not a folder here" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_a_cached_hub_model_is_used_offline(root, tmp_path):
    """A Hub id in the local cache (HF_HOME/hub) is predicted with HF_HUB_OFFLINE=1, from the cache only."""
    repo = tmp_path / "hf_home" / "hub" / "models--org--vpd-depth"
    shutil.copytree(root / "depth", repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    result = vpd_hf_cli("predict", "--task", "depth", "--model", "org/vpd-depth", root / "photos" / "ok1.jpg",
                        "--output", tmp_path / "out", "--no-progress", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "ok1_depth16.png").is_file()


def test_dataset_without_its_configuration_is_one_clear_line(root, tmp_path, capsys):
    data = vpd_hf.data.synthetic.save_synthetic_dataset(tmp_path / "data", num_train=1, num_validation=1, height=32,
                                                        width=32, progress=False)  # fmt: skip
    base = ["predict", "--task", "depth", "--model", root / "depth", "--dataset", data, "--output", tmp_path / "out"]
    for extra, message in [
        ([], f"`--dataset` '{data}' has several configurations ['referring', 'scenes']: choose one with "
         "`--dataset-config`."),
        (["--dataset-config", "room"], f"`--dataset-config` 'room' is not a configuration of '{data}'"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in [*base, *extra]])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_push_without_network_is_one_clear_line(root, tmp_path):
    for offline, message in [(True, "offline mode is on (HF_HUB_OFFLINE)"), (False, "the Hub cannot be reached")]:
        start = time.monotonic()
        result = vpd_hf_cli("card", root / "depth", "--repo-id", "org/vpd-depth", "--push", cwd=tmp_path,
                            offline=offline)  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"`--push` to 'org/vpd-depth': {message}" in result.stderr
        assert time.monotonic() - start < 45


def test_train_without_arguments_prints_usage(tmp_path):
    result = vpd_hf_cli("train", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: vpd-hf train") and "`vpd-hf train --help` lists them all" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_referring_resume_is_keyed_by_image_and_expression(root, tmp_path, capsys):
    image = photo(tmp_path / "scene.png", seed=7)
    out = tmp_path / "out"

    def run(*texts):
        argv = ["predict", "--task", "referring", "--model", root / "referring", image, "--output", out,
                "--no-progress"]  # fmt: skip
        for text in texts:
            argv += ["--text", text]
        assert cli.main([str(a) for a in argv]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert run("the chair")["predicted"] == 1
    first_mask = (out / "scene_ref0_mask.png").read_bytes()
    # a new expression into the same folder is predicted (and numbered after the first), the old one is kept
    assert run("the chair", "the lamp")["predicted"] == 1
    assert (out / "scene_ref0_mask.png").read_bytes() == first_mask
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(m["texts"], m["files"][0]) for m in lines] == [
        (["the chair"], "scene_ref0_mask.png"),
        (["the lamp"], "scene_ref1_mask.png"),
    ]
    expected = vpd_hf.prediction.Predictor("referring", root / "referring", "cpu").predict(
        [Image.open(image).convert("RGB")], [["the lamp"]]
    )[0][0]
    np.testing.assert_array_equal(np.array(Image.open(out / "scene_ref1_mask.png")) == 255, expected.numpy())
    # every pair done: nothing to predict
    result = run("the lamp", "the chair")
    assert (result["predicted"], result["already_done"]) == (0, 1)


def test_from_pretrained_refuses_the_config_of_another_model(root):
    with pytest.raises(ValueError, match=r"holds a `bert` model \(BertModel\), not a VPD model"):
        vpd_hf.VPDConfig.from_pretrained(root / "bert")
    with pytest.raises(ValueError, match="holds a `bert` model"):
        vpd_hf.VPDModelForDepthEstimation.from_pretrained(root / "bert")
    # a diffusers component's config (no model_type) is not a VPD config either
    with pytest.raises(ValueError, match="a diffusers `UNet2DConditionModel`"):
        vpd_hf.VPDConfig.from_pretrained(root / "sd" / "unet")
    assert vpd_hf.VPDConfig.from_pretrained(root / "depth").model_type == "vpd"


def test_task_tables_agree_with_the_model_classes():
    """prediction keeps the task names literal (no torch at argument checking): they must match modeling."""
    assert tuple(vpd_hf.TASK_MODEL_CLASSES) == TASKS
    assert {cls.__name__: task for task, cls in vpd_hf.TASK_MODEL_CLASSES.items()}.items() <= TASK_ARCHITECTURES.items()
    assert TASK_ARCHITECTURES["VPDModelForSemanticSegmentation"] == "segmentation"
