"""transformers' `depth-estimation` pipeline on VPD checkpoints, with a real photo."""

import builtins
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from vpd_hf import VPDImageProcessor, VPDModelForDepthEstimation
from vpd_hf.examples import load_example_image
from vpd_hf.testing_utils import TINY_DEPTH_HEAD


@pytest.fixture(scope="module")
def vpd_folder(tiny_sd_dir, tmp_path_factory):
    """A VPD depth checkpoint made from the tiny SD folder, saved with its image processor."""
    folder = tmp_path_factory.mktemp("vpd-depth")
    model = VPDModelForDepthEstimation.from_stable_diffusion(tiny_sd_dir, show_progress=False, **TINY_DEPTH_HEAD)
    with torch.no_grad():  # a head whose output varies over the image, so that resizing is observable
        for module in model.head.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.weight.normal_(std=module.weight[0].numel() ** -0.5, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(folder)
    VPDImageProcessor().save_pretrained(folder)
    return folder


def test_photo_is_real():
    photo = load_example_image()
    assert photo.size == (600, 400) and photo.mode == "RGB"
    assert np.asarray(photo).std() > 20  # a photograph, not a flat test card


def test_pipeline_on_a_photo_matches_the_manual_path(vpd_folder, monkeypatch):
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("the pipeline asked about remote code"))
    estimator = pipeline("depth-estimation", model=str(vpd_folder))
    assert type(estimator.model) is VPDModelForDepthEstimation
    assert type(estimator.image_processor) is VPDImageProcessor
    photo = load_example_image()
    result = estimator(photo)
    depth = result["predicted_depth"]
    assert depth.shape == (400, 600)
    assert float(depth.min()) > 0 and float(depth.max()) < estimator.model.config.max_depth
    assert float(depth.std()) > 0
    assert isinstance(result["depth"], Image.Image) and result["depth"].size == (600, 400)

    processor = VPDImageProcessor.from_pretrained(vpd_folder)
    inputs = processor(images=photo, return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 3, 448, 640)  # 400x600 -> 427x640, padded to multiples of 64
    with torch.no_grad():
        outputs = estimator.model(**inputs)
    manual = processor.post_process_depth_estimation(outputs, target_sizes=[(400, 600)])[0]["predicted_depth"]
    torch.testing.assert_close(depth, manual)


def test_pipeline_batches_images_of_different_sizes(vpd_folder):
    estimator = pipeline("depth-estimation", model=str(vpd_folder))
    photo = load_example_image()
    results = estimator([photo, photo.resize((200, 300)), photo.convert("L")])
    assert [tuple(r["predicted_depth"].shape) for r in results] == [(400, 600), (300, 200), (400, 600)]


def test_pipeline_in_bfloat16(vpd_folder):
    estimator = pipeline("depth-estimation", model=str(vpd_folder), dtype=torch.bfloat16)
    assert estimator.model.dtype == torch.bfloat16
    depth = estimator(load_example_image())["predicted_depth"]
    assert depth.dtype == torch.float32 and depth.shape == (400, 600) and torch.isfinite(depth).all()


def test_pipeline_on_a_path(vpd_folder):
    from vpd_hf.examples import example_image_path

    result = pipeline("depth-estimation", model=str(vpd_folder))(str(example_image_path()))
    assert result["predicted_depth"].shape == (400, 600)


def test_checkpoint_loads_through_remote_code_without_the_package(vpd_folder, tmp_path):
    """`auto_map` + copied code let users without vpd_hf load the checkpoint with trust_remote_code."""
    config = json.loads((vpd_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForDepthEstimation"] == "modeling_vpd.VPDModelForDepthEstimation"
    assert (vpd_folder / "modeling_vpd.py").is_file() and (vpd_folder / "image_processing_vpd.py").is_file()
    script = textwrap.dedent(
        f"""
        import sys, torch
        from PIL import Image
        from transformers import pipeline
        estimator = pipeline("depth-estimation", model={str(vpd_folder)!r}, trust_remote_code=True)
        assert "vpd_hf" not in sys.modules, "the package was imported"
        assert type(estimator.model).__module__.startswith("transformers_modules")
        depth = estimator(Image.open({str(tmp_path / "photo.png")!r}))["predicted_depth"]
        torch.save(depth, {str(tmp_path / "depth.pt")!r})
        """
    )
    load_example_image().save(tmp_path / "photo.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    estimator = pipeline("depth-estimation", model=str(vpd_folder))
    # vpd_hf's pipeline runs channels_last on the CPU (rounding differs by ~1e-4); the remote code keeps the default
    estimator.model.to(memory_format=torch.contiguous_format)
    local = estimator(Image.open(tmp_path / "photo.png"))
    torch.testing.assert_close(torch.load(tmp_path / "depth.pt"), local["predicted_depth"])
