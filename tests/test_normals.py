"""Surface normals: the loss, post-processing and Marigold-coloured pictures on planes of known orientation, and
`vpd-hf predict` with several tasks from one pass."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor
from PIL import Image
from transformers import AutoModelForNormalEstimation

import vpd_hf
from vpd_hf import cli
from vpd_hf.losses import normals_cosine_loss
from vpd_hf.modeling_vpd import VPDModel
from vpd_hf.testing_utils import perturb_weights, tiny_segmentation_config, tiny_vpd_config
from vpd_hf.visualization import visualize_normals

CLASSES = ["wall", "floor", "chair"]


def _plane(normal, height, width, scale=1.0):
    """A `(3, H, W)` map holding one (unnormalised * scale) normal everywhere."""
    return (torch.tensor(normal, dtype=torch.float32) * scale)[:, None, None].expand(3, height, width).clone()


# -- loss -------------------------------------------------------------------------------------------------------------


def test_cosine_loss_on_planes_at_known_angles():
    """Prediction: the camera-facing plane (0, 0, 1) rotated by 0, 30, 90 and 180 degrees about x, one pixel each;
    the loss is the mean of 1 - cos(angle) over the valid pixels only (no label, padding)."""
    angles = [0.0, 30.0, 90.0, 180.0]
    predicted = torch.stack([torch.tensor([0.0, math.sin(math.radians(a)), math.cos(math.radians(a))]) for a in angles])
    predicted = torch.cat([predicted, torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])])  # two more pixels, 90 deg off
    predicted = predicted.T.reshape(1, 3, 1, 6).requires_grad_(True)
    target = torch.tensor([0.0, 0.0, 2.0])[:, None].expand(3, 6).clone()  # not unit: renormalised
    target[:, 4] = 0.0  # no label
    pixel_mask = torch.tensor([[[1, 1, 1, 1, 1, 0]]])  # the last pixel is padding
    loss = normals_cosine_loss(predicted, target.reshape(1, 3, 1, 6), valid_mask=pixel_mask)
    expected = sum(1 - math.cos(math.radians(a)) for a in angles) / len(angles)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert predicted.grad[0, :, 0, 4:].abs().sum() == 0  # unlabelled and padded pixels get no gradient
    nothing = normals_cosine_loss(predicted, torch.zeros(1, 3, 1, 6))
    assert nothing.item() == 0.0 and nothing.requires_grad
    with pytest.raises(ValueError, match="`labels` \\(normals\\) must have the shape"):
        normals_cosine_loss(predicted, torch.zeros(1, 1, 6))
    with pytest.raises(TypeError, match="float tensor"):
        normals_cosine_loss(predicted, torch.zeros(1, 3, 1, 6, dtype=torch.long))


# -- post-processing and pictures -------------------------------------------------------------------------------------


def test_post_processing_crops_each_image_resizes_and_renormalises():
    n0 = torch.nn.functional.normalize(torch.tensor([0.2, 0.5, 0.8]), dim=0)
    n1 = torch.nn.functional.normalize(torch.tensor([-0.6, 0.1, 0.3]), dim=0)
    normals = torch.zeros(2, 3, 64, 96)
    normals[0] = _plane([1.0, 0.0, 0.0], 64, 96)  # what a model puts on padding: must not leak into image 0
    normals[0, :, :40, :60] = _plane(n0.tolist(), 40, 60)
    normals[1] = _plane(n1.tolist(), 64, 96, scale=0.5)  # not unit length: renormalised
    pixel_mask = torch.zeros(2, 64, 96, dtype=torch.long)
    pixel_mask[0, :40, :60] = 1
    pixel_mask[1] = 1
    processor = vpd_hf.VPDImageProcessor()
    results = processor.post_process_normal_estimation(
        {"predicted_normals": normals, "pixel_mask": pixel_mask}, target_sizes=[(80, 120), (32, 48)]
    )
    assert [tuple(r["predicted_normals"].shape) for r in results] == [(3, 80, 120), (3, 32, 48)]
    for result, normal in zip(results, (n0, n1), strict=True):
        torch.testing.assert_close(
            result["predicted_normals"], normal[:, None, None].expand_as(result["predicted_normals"])
        )
        torch.testing.assert_close(
            result["predicted_normals"].norm(dim=0), torch.ones(result["predicted_normals"].shape[1:])
        )
    with pytest.raises(ValueError, match="predicted_normals"):
        processor.post_process_normal_estimation({"predicted_normals": normals[:, 0]})


def test_visualize_normals_matches_diffusers_marigold():
    normals = torch.nn.functional.normalize(torch.randn(3, 17, 23, generator=torch.Generator().manual_seed(0)), dim=0)
    normals[:, 0, 0] = 0.0  # a pixel without a normal
    original = normals.clone()
    for flips in [(False, False, False), (True, False, True)]:
        ours = np.asarray(visualize_normals(normals, *flips))
        theirs = np.asarray(MarigoldImageProcessor.visualize_normals(normals[None].clone(), *flips)[0])
        assert ours.dtype == np.uint8 and np.array_equal(ours, theirs)
    assert torch.equal(normals, original)  # pure (diffusers' version flips its input in place)
    # Planes of known orientation: +z (facing the camera) is blue, +x (right) red, +y (up) green.
    for normal, colour in [((0, 0, 1), (127, 127, 255)), ((1, 0, 0), (255, 127, 127)), ((0, 1, 0), (127, 255, 127))]:
        picture = vpd_hf.VPDImageProcessor.visualize_normals(_plane(normal, 2, 3).numpy())
        assert isinstance(picture, Image.Image) and picture.size == (3, 2)
        assert np.array_equal(np.asarray(picture), np.full((2, 3, 3), colour, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"`normals` must be a \(3, height, width\) map"):
        visualize_normals(torch.zeros(2, 4, 4))


# -- prediction to files ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("normals-models")
    torch.manual_seed(0)
    multi = vpd_hf.VPDModelForDensePrediction(
        tiny_segmentation_config(CLASSES, tasks=["depth", "segmentation", "normals"])
    )
    perturb_weights(multi, 0.02, seed=1)
    multi.vpd.prompt_embeddings.normal_(generator=torch.Generator().manual_seed(2))
    normals = vpd_hf.VPDModelForNormalEstimation(tiny_vpd_config())
    for name, model in [("multi", multi), ("normals", normals)]:
        model.eval().save_pretrained(root / name)
        vpd_hf.VPDImageProcessor(size={"shortest_edge": 48, "longest_edge": 80}).save_pretrained(root / name)
    return root


def _photo(path, size, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_predict_all_tasks_of_a_multitask_model_from_one_pass(models, tmp_path, capsys, monkeypatch):
    photos = [_photo(tmp_path / "in" / "a.png", (80, 60), 0), _photo(tmp_path / "in" / "b.png", (50, 70), 1)]
    passes = []
    forward = VPDModel.forward
    monkeypatch.setattr(VPDModel, "forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k))
    out = tmp_path / "out"
    argv = ["predict", "--task", "all", "--model", models / "multi", tmp_path / "in", "--output", out]
    assert cli.main([str(a) for a in [*argv, "--batch-size", "2", "--no-progress"]]) == 0
    assert len(passes) == 2  # one pass per image (the two sizes run as two groups), for all three tasks
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["predicted"], counts["skipped"]) == (2, 0)
    manifest = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    suffixes = ["depth.png", "depth16.png", "labels.png", "overlay.png", "normals.png", "normals.npy"]
    assert [entry["files"] for entry in manifest] == [[f"{stem}_{s}" for s in suffixes] for stem in ("a", "b")]

    # Against the model and processor by hand, one image at a time (batch invariance of the batched run).
    model = vpd_hf.VPDModelForDensePrediction.from_pretrained(models / "multi").eval()
    processor = vpd_hf.VPDImageProcessor.from_pretrained(models / "multi")
    for path in photos[1:]:  # the smaller image, the one a batch pads
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            outputs = model(**processor(images=image, return_tensors="pt"))
        target = [image.size[::-1]]
        normals = processor.post_process_normal_estimation(outputs, target_sizes=target)[0]["predicted_normals"]
        written = np.load(out / f"{path.stem}_normals.npy")
        assert written.shape == (3, *image.size[::-1]) and np.allclose(written, normals.numpy(), atol=1e-5)
        assert np.allclose(np.linalg.norm(written, axis=0), 1.0, atol=1e-5)
        assert np.array_equal(
            np.asarray(Image.open(out / f"{path.stem}_normals.png")), np.asarray(visualize_normals(written))
        )
        depth = processor.post_process_depth_estimation(outputs, target_sizes=target)[0]["predicted_depth"]
        depth16 = np.asarray(Image.open(out / f"{path.stem}_depth16.png")).astype(np.int64)
        assert np.abs(depth16 - np.round(depth.numpy() * 1000)).max() <= 1
        labels = processor.post_process_semantic_segmentation(outputs, target_sizes=target)[0]
        assert np.array_equal(np.asarray(Image.open(out / f"{path.stem}_labels.png")), labels.numpy())

    # Resumes; a subset of the tasks; the normals model; tasks a model has no head for.
    assert cli.main([str(a) for a in [*argv, "--no-progress"]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["already_done"] == 2
    subset = tmp_path / "subset"
    cli.main([str(a) for a in ["predict", "--task", "normals,depth", "--model", models / "multi", photos[0],
                               "--output", subset, "--no-progress"]])  # fmt: skip
    capsys.readouterr()
    assert sorted(p.name for p in subset.glob("a_*")) == [
        "a_depth.png",
        "a_depth16.png",
        "a_normals.npy",
        "a_normals.png",
    ]
    single = tmp_path / "single"
    cli.main([str(a) for a in ["predict", "--task", "normals", "--model", models / "normals", photos[1],
                               "--output", single, "--no-progress"]])  # fmt: skip
    capsys.readouterr()
    assert sorted(p.name for p in single.glob("b_*")) == ["b_normals.npy", "b_normals.png"]
    for task, model_name, message in [
        ("segmentation", "normals", "holds a normals model"),
        ("depth,normals", "normals", "has no depth head: its tasks are ['normals']"),
        ("pose", "multi", "argument --task: invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in ["predict", "--task", task, "--model", models / model_name, photos[0],
                                       "--output", tmp_path / "x", "--no-progress"]])  # fmt: skip
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, task


def test_auto_class_and_from_config():
    model = AutoModelForNormalEstimation.from_config(tiny_vpd_config(tasks=["normals"]))
    assert type(model) is vpd_hf.VPDModelForNormalEstimation and model.tasks == ["normals"]
    assert vpd_hf.TASK_MODEL_CLASSES["normals"] is vpd_hf.VPDModelForNormalEstimation


def test_model_cards_of_normals_and_multitask_models(tmp_path):
    from vpd_hf.hub import model_card_from_run

    metrics = {"depth/rmse": 0.5, "segmentation/mean_iou": 0.4, "normals/mean": 20.0, "normals/a11.25": 0.3}
    for name, architecture, config, evaluation in [
        ("multi", "VPDModelForDensePrediction", {"tasks": ["depth", "normals"]}, metrics),
        ("normals", "VPDModelForNormalEstimation", {}, {"mean": 21.5, "median": 14.0, "a30": 0.75}),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(
            json.dumps({"model_type": "vpd", "architectures": [architecture], **config})
        )
        (folder / "eval_results.json").write_text(json.dumps({"metrics": evaluation, "split": "validation"}))
        card = str(model_card_from_run(folder, repo_id=f"me/vpd-{name}"))
        rows = [line for line in card.splitlines() if line.startswith("| ")]
        if name == "multi":
            assert "VPD for metric depth, surface normals from one pass" in card and "one scene token per image" in card
            assert rows == ["| depth RMSE ↓ | segmentation mIoU ↑ | normals mean° ↓ | normals 11.25° ↑ |",
                            "| 0.5000 | 40.00 | 20.0000 | 30.00 |"]  # fmt: skip
            assert "type: depth/rmse" in card and "type: surface-normal-estimation" not in card
        else:
            assert "VPD for surface-normal estimation" in card and "AutoModelForNormalEstimation" in card
            assert rows == ["| mean° ↓ | median° ↓ | 30° ↑ |", "| 21.5000 | 14.0000 | 75.00 |"]
            assert "pipeline_tag: image-to-image" in card
