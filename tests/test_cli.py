"""`vpd-hf` command line, batch prediction to files (images and `datasets` splits, resumable) and the Gradio demo."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

import vpd_hf
from vpd_hf import cli
from vpd_hf.data.synthetic import save_synthetic_dataset
from vpd_hf.prediction import Predictor, collect_images
from vpd_hf.testing_utils import tiny_referring_config, tiny_segmentation_config, tiny_vpd_config

CLASSES = ["wall", "floor", "chair"]


def randomize(model, seed=0):
    """Fresh models have zero prompt tables and near-constant heads: give every weight a visible value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "prompt_embeddings" in name or name.endswith("gamma"):
                parameter.normal_(generator=generator)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd_dir):
    """One saved tiny model (+ processor at a small resolution) per task, as `save_pretrained` writes them."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    depth = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config())
    depth.save_pretrained(root / "depth")
    vpd_hf.VPDImageProcessor.for_task("depth", size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(
        root / "depth"
    )
    segmentation = randomize(vpd_hf.VPDModelForSegmentation(tiny_segmentation_config(CLASSES)))
    segmentation.save_pretrained(root / "segmentation")
    vpd_hf.VPDImageProcessor.for_task("segmentation", size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(
        root / "segmentation"
    )
    referring = randomize(vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config(token_length=8)))
    referring.save_pretrained(root / "referring")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer", model_max_length=8)
    image_processor = vpd_hf.VPDImageProcessor.for_task("referring", size={"height": 64, "width": 64})
    vpd_hf.VPDProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "referring")
    return root


def photo(path, size=(80, 60), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def run_cli(argv, capsys):
    assert cli.main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def counts(output, total, predicted, already_done):
    """`vpd-hf predict`'s JSON line for a run in which no image was skipped."""
    return {"output": str(output), "total": total, "predicted": predicted, "already_done": already_done,
            "skipped": 0, "skipped_items": {}}  # fmt: skip


def by_hand(task, folder, image, texts=None):
    """The model's prediction through its processor, without the prediction module."""
    model_class = {"depth": vpd_hf.VPDModelForDepthEstimation, "segmentation": vpd_hf.VPDModelForSegmentation,
                   "referring": vpd_hf.VPDModelForReferringSegmentation}[task]  # fmt: skip
    model = model_class.from_pretrained(folder).eval()
    target = [image.size[::-1]]
    with torch.no_grad():
        if task == "referring":
            processor = vpd_hf.VPDProcessor.from_pretrained(folder)
            batch = processor(images=[image], text=[texts], return_tensors="pt")
            outputs = model(**batch)
            return [r["mask"] for r in processor.post_process_referring_segmentation(outputs, target * len(texts))]
        processor = vpd_hf.VPDImageProcessor.from_pretrained(folder)
        outputs = model(**processor(images=image, return_tensors="pt"))  # pixel_mask: padding cropped off
        if task == "depth":
            return processor.post_process_depth_estimation(outputs, target_sizes=target)[0]["predicted_depth"]
        return processor.post_process_semantic_segmentation(outputs, target_sizes=target)[0]


def test_collect_images_from_files_folders_and_globs(tmp_path):
    a = photo(tmp_path / "x" / "a.png")
    b = photo(tmp_path / "x" / "b.jpg")
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    c = photo(tmp_path / "y" / "a.png")
    found = collect_images([tmp_path / "x", str(tmp_path / "y" / "*.png"), a])
    assert found == [a.resolve(), b.resolve(), c.resolve()]  # folder sorted, glob, duplicate dropped
    with pytest.raises(ValueError, match="`inputs`"):
        collect_images([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="a glob matching images"):
        collect_images([tmp_path / "x" / "*.txt"])


def test_predict_depth_writes_millimetre_pngs_equal_to_the_model_and_resumes(models, tmp_path, capsys):
    images = [photo(tmp_path / "in" / "a.png", seed=1), photo(tmp_path / "in" / "b.png", (64, 72), seed=2),
              photo(tmp_path / "other" / "a.png", seed=3)]  # fmt: skip
    out = tmp_path / "out"
    argv = ["predict", "--task", "depth", "--model", models / "depth", tmp_path / "in", tmp_path / "other" / "*.png",
            "--output", out, "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert run_cli(argv, capsys) == counts(out, 3, 3, 0)
    # same stem in two folders: the parent folder's name keeps them apart
    names = ["in_a", "b", "other_a"]
    for name, path in zip(names, images, strict=True):
        image = Image.open(path).convert("RGB")
        color = Image.open(out / f"{name}_depth.png")
        assert color.mode == "RGB" and color.size == image.size
        millimetres = np.array(Image.open(out / f"{name}_depth16.png")).astype(np.float64)
        assert millimetres.shape == image.size[::-1]
        expected = by_hand("depth", models / "depth", image).double().numpy() * 1000
        np.testing.assert_allclose(millimetres, np.round(expected), atol=1.0)
    manifest = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == names and manifest[0]["files"] == ["in_a_depth.png", "in_a_depth16.png"]

    # a rerun skips what is done; a line cut by an interruption counts as not done
    assert run_cli(argv, capsys)["already_done"] == 3
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    assert run_cli(argv, capsys) == counts(out, 3, 1, 2)


def test_predict_segmentation_writes_label_maps_and_overlays(models, tmp_path, capsys):
    path = photo(tmp_path / "room.png", seed=4)
    out = tmp_path / "out"
    counts = run_cli(["predict", "--task", "segmentation", "--model", models / "segmentation", path, "--output", out,
                      "--no-progress"], capsys)  # fmt: skip
    assert counts["predicted"] == 1
    image = Image.open(path).convert("RGB")
    labels = np.array(Image.open(out / "room_labels.png"))
    assert labels.dtype == np.uint8 and labels.shape == image.size[::-1]
    np.testing.assert_array_equal(labels, by_hand("segmentation", models / "segmentation", image).numpy())
    assert set(np.unique(labels)) <= set(range(len(CLASSES)))
    overlay = Image.open(out / "room_overlay.png")
    assert overlay.mode == "RGB" and overlay.width >= image.width


def test_predict_referring_writes_one_mask_per_expression(models, tmp_path, capsys):
    path = photo(tmp_path / "scene.png", seed=5)
    out = tmp_path / "out"
    texts = ["the red chair on the left", "the lamp"]
    counts = run_cli(["predict", "--task", "referring", "--model", models / "referring", path, "--text", texts[0],
                      "--text", texts[1], "--output", out, "--no-progress"], capsys)  # fmt: skip
    assert counts["predicted"] == 1
    image = Image.open(path).convert("RGB")
    expected = by_hand("referring", models / "referring", image, texts)
    for k in range(2):
        mask = np.array(Image.open(out / f"scene_ref{k}_mask.png"))
        assert mask.shape == image.size[::-1] and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, expected[k].numpy().astype(bool))
        assert Image.open(out / f"scene_ref{k}_overlay.png").mode == "RGB"
    (entry,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert entry["texts"] == texts and len(entry["files"]) == 4


@pytest.mark.parametrize("task", ["depth", "referring"])
def test_predict_a_dataset_split_by_row_index_and_resume(models, tmp_path, capsys, task):
    data = save_synthetic_dataset(tmp_path / "data", num_train=1, num_validation=3, height=48, width=48,
                                  progress=False)  # fmt: skip
    config = "referring" if task == "referring" else "scenes"
    out = tmp_path / "out"
    argv = ["predict", "--task", task, "--model", models / task, "--dataset", data, "--dataset-config", config,
            "--output", out, "--no-progress"]  # fmt: skip
    first = run_cli([*argv, "--max-samples", "2"], capsys)
    assert first == counts(out, 2, 2, 0)
    rest = run_cli(argv, capsys)
    rows = vpd_hf.data.loading.load_splits(data, config)["validation"]
    assert rest == counts(out, len(rows), len(rows) - 2, 2)
    manifest = [json.loads(line) for line in (out / "predictions-0-of-1.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == [f"{i:06d}" for i in range(len(rows))]
    if task == "depth":
        assert (out / "000002_depth16.png").is_file()
    else:  # every expression of the row
        assert manifest[0]["texts"] == list(rows[0]["answer"])
        assert len(list(out.glob("000000_ref*_mask.png"))) == len(rows[0]["answer"])


def test_predict_rejects_bad_arguments(models, tmp_path, capsys):
    image = photo(tmp_path / "a.png")
    base = ["predict", "--model", str(models / "depth"), "--output", str(tmp_path / "out"), "--no-progress"]
    for argv, message in [
        ([*base, "--task", "depth"], "either image inputs or --dataset"),
        ([*base, "--task", "depth", str(image), "--dataset", str(tmp_path)], "either image inputs or --dataset"),
        ([*base, "--task", "depth", str(image), "--batch-size", "0"], "--batch-size must be >= 1"),
        ([*base, "--task", "referring", str(image)], "needs at least one --text"),
        ([*base, "--task", "depth", str(tmp_path / "nothing.png")], "`inputs`"),
        ([*base, "--task", "panoptic", str(image)], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    data = save_synthetic_dataset(tmp_path / "data", num_train=1, num_validation=1, height=32, width=32,
                                  progress=False)  # fmt: skip
    with pytest.raises(SystemExit):
        cli.main([*base, "--task", "depth", "--dataset", str(data), "--dataset-config", "scenes", "--split", "test"])
    assert "`--split` 'test'" in capsys.readouterr().err


def test_card_command_writes_a_model_card_with_results(models, tmp_path, capsys):
    import shutil

    from huggingface_hub import metadata_load

    folder = tmp_path / "vpd-depth"
    shutil.copytree(models / "depth", folder)
    metrics = {"d1": 0.5, "d2": 0.8, "d3": 0.9, "abs_rel": 0.3, "sq_rel": 0.2, "rmse": 1.25, "rmse_log": 0.3,
               "log10": 0.1, "silog": 20.0, "num_images": 4}  # fmt: skip
    evaluation = {"task": "depth", "dataset": "synthetic", "split": "validation", "metrics": metrics}
    (folder / "eval_results.json").write_text(json.dumps(evaluation))
    assert cli.main(["card", str(folder), "--repo-id", "org/vpd-depth"]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "README.md")
    meta = metadata_load(folder / "README.md")
    assert meta["pipeline_tag"] == "depth-estimation" and meta["library_name"] == "transformers"
    results = meta["model-index"][0]["results"][0]["metrics"]
    assert {"type": "rmse", "value": 1.25} in [{k: m[k] for k in ("type", "value")} for m in results]
    with pytest.raises(SystemExit, match="--push needs --repo-id"):
        cli.main(["card", str(folder), "--push"])


def test_delegated_commands_take_their_scripts_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: vpd-hf train") and "--lora_rank" in help_text
    cli.main(["synth", "--output", str(tmp_path / "synth"), "--num-train", "1", "--num-validation", "1",
              "--height", "32", "--width", "32", "--no-progress"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "synth" / "scenes").glob("*.parquet")) == [
        "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"
    ]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "vpd_hf.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("predict", "train", "evaluate", "synth", "card", "demo"))


def test_demo_functions_and_app(models):
    gradio = pytest.importorskip("gradio")
    from vpd_hf.demo import build_demo, predict_depth, predict_referring, predict_segmentation

    image = np.asarray(Image.open(photo(models.parent / "demo.png", seed=6)))
    depth = Predictor("depth", models / "depth")
    picture, summary = predict_depth(depth, image)
    expected = by_hand("depth", models / "depth", Image.fromarray(image))
    assert picture.size == (80, 60) and summary == f"depth {expected.min():.2f} - {expected.max():.2f} m"

    segmentation = Predictor("segmentation", models / "segmentation")
    overlay, found = predict_segmentation(segmentation, Image.fromarray(image))
    labels = by_hand("segmentation", models / "segmentation", Image.fromarray(image)).numpy()
    shares = {CLASSES[v]: 100 * (labels == v).mean() for v in np.unique(labels)}
    assert found.split(", ")[0].startswith(max(shares, key=shares.get)) and len(found.split(", ")) == len(shares)
    assert overlay.mode == "RGB"

    referring = Predictor("referring", models / "referring")
    overlay, covers = predict_referring(referring, image, "  the lamp ")
    mask = by_hand("referring", models / "referring", Image.fromarray(image), ["the lamp"])[0].numpy()
    assert covers == f"mask covers {100 * mask.mean():.1f}% of the image"
    with pytest.raises(ValueError, match="Type an expression"):
        predict_referring(referring, image, "   ")
    with pytest.raises(ValueError, match="Upload an image"):
        predict_depth(depth, None)

    with pytest.raises(ValueError, match="at least one of"):
        build_demo()
    app = build_demo(models / "depth", models / "segmentation", models / "referring")
    assert isinstance(app, gradio.Blocks)
    endpoints = {fn.api_name: fn for fn in app.fns.values()}
    assert {"depth", "segmentation", "referring"} <= endpoints.keys()
    with pytest.raises(gradio.Error, match="Upload an image"):  # errors reach the user as a Gradio message
        endpoints["depth"].fn(None)


def test_distributed_prediction_shards_a_split_over_two_processes(models, tmp_path, capsys):
    """`accelerate launch -m vpd_hf.cli predict --dataset ...`: each rank predicts its own rows and writes its own
    manifest; a later single-process run finds everything done."""
    import os

    data = save_synthetic_dataset(tmp_path / "data", num_train=1, num_validation=5, height=48, width=48,
                                  progress=False)  # fmt: skip
    out = tmp_path / "out"
    predict = ["predict", "--task", "depth", "--model", str(models / "depth"), "--dataset", str(data),
               "--dataset-config", "scenes", "--output", str(out), "--no-progress"]  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vpd_hf.cli",
               *predict]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    shards = [[json.loads(line)["id"] for line in (out / f"predictions-{rank}-of-2.jsonl").read_text().splitlines()]
              for rank in range(2)]  # fmt: skip
    assert shards == [["000000", "000002", "000004"], ["000001", "000003"]]
    assert len(list(out.glob("*_depth16.png"))) == 5
    assert run_cli(predict, capsys) == counts(out, 5, 0, 5)
