"""Model cards from training/evaluation records (YAML parsed back), licences, and push_to_hub without the network."""

import json

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

import vpd_hf
from vpd_hf.hub import (
    PAPER_METRICS,
    create_model_card,
    infer_license,
    model_card_from_run,
    push_to_hub,
    template_path,
)
from vpd_hf.testing_utils import tiny_referring_config, tiny_segmentation_config, tiny_vpd_config

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEPTH_METRICS = {"d1": 0.9641, "d2": 0.9952, "d3": 0.9989, "abs_rel": 0.0691, "sq_rel": 0.03, "rmse": 0.2541,
                 "rmse_log": 0.09, "log10": 0.0302, "silog": 8.2, "num_images": 654}  # fmt: skip


def save_model(folder, task, **config):
    if task == "depth":
        model = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config(**config))
    elif task == "segmentation":
        model = vpd_hf.VPDModelForSegmentation(tiny_segmentation_config(["wall", "floor", "ceiling"], **config))
    else:
        model = vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config(**config))
    model.save_pretrained(folder)
    return folder


def test_depth_card_from_a_run_folder_round_trips_its_metadata(tmp_path):
    folder = save_model(tmp_path / "run", "depth", base_model=SD15)
    evaluation = {"task": "depth", "model": str(folder), "dataset": "sayakpaul/nyu_depth_v2", "dataset_config": None,
                  "split": "validation", "protocol": {"depth_windows": 2, "flip": True}, "metrics": DEPTH_METRICS}  # fmt: skip
    (folder / "eval_results.json").write_text(json.dumps(evaluation))
    training = {"metrics": {}, "global_step": 25225, "train_seconds": 86400.0, "num_processes": 8,
                "config": {"task": "depth", "model": SD15, "dataset": "sayakpaul/nyu_depth_v2", "recipe": "nyu_depth",
                           "per_device_train_batch_size": 3, "gradient_accumulation_steps": 1, "crop_size": 480,
                           "learning_rate": 5e-4, "unet_lr_mult": 0.01, "weight_decay": 0.1,
                           "lr_schedule": "rise_fall", "lora_rank": 0}}  # fmt: skip
    (folder / "all_results.json").write_text(json.dumps(training))

    card = model_card_from_run(folder, repo_id="org/vpd-depth-nyu")
    card.save(tmp_path / "README.md")
    meta = metadata_load(tmp_path / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "depth-estimation"
    assert meta["license"] == "creativeml-openrail-m" and meta["base_model"] == SD15
    assert meta["datasets"] == ["sayakpaul/nyu_depth_v2"] and "vpd" in meta["tags"]
    model_name, results = model_index_to_eval_results(meta["model-index"])
    assert model_name == "vpd-depth-nyu"
    by_name = {r.metric_name: r for r in results}
    assert set(by_name) == {"RMSE", "REL", "log10", "δ1", "δ2", "δ3"}
    assert by_name["RMSE"].metric_value == pytest.approx(0.2541) and by_name["δ1"].metric_value == pytest.approx(0.9641)
    assert {r.dataset_split for r in results} == {"validation"} and {r.task_type for r in results} == {
        "depth-estimation"
    }

    text = ModelCard.load(tmp_path / "README.md").text
    assert "Synthetic-data model" not in text
    assert 'pipeline("depth-estimation", model="org/vpd-depth-nyu")' in text
    assert "VPDModelForDepthEstimation.from_pretrained" in text and "zhao2023unleashing" in text
    assert "| 0.2541 | 0.0691 | 0.0302 | 0.9641 |" in text and "3 x 8 x 1" in text and "0.0005 / x0.01" in text
    assert "2 shifted square windows + horizontal flip" in text


@pytest.mark.parametrize("task", ["segmentation", "referring"])
def test_segmentation_and_referring_cards_report_percentages(tmp_path, task):
    key = "mean_iou" if task == "segmentation" else "overall_iou"
    metrics = {key: 0.5371, "mean_iou": 0.5371, "precision@0.5": 0.8, "overall_accuracy": 0.84, "mean_accuracy": 0.65}
    card = create_model_card(task, repo_id="org/m", base_model=SD15, metrics=metrics, dataset="scene_parse_150",
                             split="validation")  # fmt: skip
    card.save(tmp_path / "README.md")
    meta = metadata_load(tmp_path / "README.md")
    _, results = model_index_to_eval_results(meta["model-index"])
    names = {r.metric_name: r.metric_value for r in results}
    headline = "mIoU" if task == "segmentation" else "oIoU"
    assert names[headline] == pytest.approx(53.71)
    assert meta["pipeline_tag"] == "image-segmentation"
    expected_tag = "semantic-segmentation" if task == "segmentation" else "referring-image-segmentation"
    assert expected_tag in meta["tags"]
    assert set(names) <= {name for _, name, _, _ in PAPER_METRICS[task]}


def test_synthetic_runs_say_so_plainly(tmp_path):
    folder = save_model(tmp_path / "run", "depth", base_model=str(tmp_path / "run" / "tiny-stable-diffusion"))
    training = {"metrics": {"rmse": 0.68, "d1": 0.73}, "global_step": 400, "num_processes": 1,
                "config": {"task": "depth", "model": "tiny-random", "dataset": "synthetic", "eval_split": "validation",
                           "per_device_train_batch_size": 8}}  # fmt: skip
    (folder / "all_results.json").write_text(json.dumps(training))
    card = model_card_from_run(folder)
    card.save(tmp_path / "README.md")
    meta = metadata_load(tmp_path / "README.md")
    assert "synthetic-data" in meta["tags"] and meta["datasets"] == ["vpd-hf/synthetic-scenes"]
    assert "base_model" not in meta  # a local folder is not a Hub id
    assert meta["license"] == "apache-2.0"
    text = ModelCard.load(tmp_path / "README.md").text
    assert "**Synthetic-data model.**" in text and "not** a depth estimator for real photographs" in text
    _, results = model_index_to_eval_results(meta["model-index"])
    assert {r.metric_name: r.metric_value for r in results} == {"RMSE": 0.68, "δ1": 0.73}


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (SD15, "creativeml-openrail-m"),
        ("CompVis/stable-diffusion-v1-4", "creativeml-openrail-m"),
        ("stabilityai/stable-diffusion-2-1-base", "openrail++"),
        ("tiny-random", "apache-2.0"),
        ("someone/my-unet", "other"),
        (None, "other"),
    ],
)
def test_licence_is_inherited_from_the_base_weights(base, expected):
    assert infer_license(base) == expected


def test_templates_ship_for_every_task_and_bad_inputs_are_named(tmp_path):
    for task in ("depth", "segmentation", "referring"):
        text = template_path(task).read_text()
        assert text.startswith("---\n{{ card_data }}\n---") and "{{ results_table }}" in text
    with pytest.raises(ValueError, match="`task` must be one of"):
        create_model_card("pose")
    with pytest.raises(ValueError, match=r"no config\.json"):
        model_card_from_run(tmp_path)
    with pytest.raises(ValueError, match="not a file"):
        model_card_from_run(save_model(tmp_path / "m", "depth"), eval_file=tmp_path / "missing.json")


class FakeApi:
    """Records the calls `push_to_hub` makes instead of reaching the network."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit"


def test_push_to_hub_writes_the_card_and_uploads_the_folder_once(tmp_path):
    folder = save_model(tmp_path / "run", "referring", base_model=SD15)
    (folder / "checkpoints").mkdir()
    api = FakeApi()
    assert push_to_hub(folder, "org/vpd-ref", private=True, api=api) == "commit"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    upload = api.calls[1][2]
    assert upload["folder_path"] == str(folder) and "checkpoints/*" in upload["ignore_patterns"]
    meta = metadata_load(folder / "README.md")
    assert meta["base_model"] == SD15 and "model-index" not in meta  # nothing evaluated: no results claimed
    text = (folder / "README.md").read_text()
    assert "# vpd-ref: VPD for referring image segmentation" in text
    assert "No evaluation results were recorded" in text
    for bad in ("", "a/b/c", None):
        with pytest.raises(ValueError, match="`repo_id`"):
            push_to_hub(folder, bad, api=api)


def test_from_stable_diffusion_records_the_base_model(tiny_sd_dir):
    model = vpd_hf.VPDModelForDepthEstimation.from_stable_diffusion(tiny_sd_dir, show_progress=False)
    assert model.config.base_model == str(tiny_sd_dir)
    with pytest.raises(TypeError, match="`base_model`"):
        tiny_vpd_config(base_model=3)
