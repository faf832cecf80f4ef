"""`from_pretrained(dtype=...)` reads safetensors tensor by tensor (pread, no memory map) and loads exactly what
transformers' own path loads."""

from unittest import mock

import pytest
import safetensors
import torch
from transformers import AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

import vpd_hf
import vpd_hf.weights_loading as weights_loading
from vpd_hf.testing_utils import perturb_weights, tiny_referring_config, tiny_segmentation_config, tiny_vpd_config


def perturbed(model):
    return perturb_weights(model, 0.01)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    torch.manual_seed(0)
    models = {
        "depth": vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config()),
        "segmentation": vpd_hf.VPDModelForSegmentation(tiny_segmentation_config(["a", "b"])),
        "referring": vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config()),
    }
    for task, model in models.items():
        perturbed(model).save_pretrained(root / task)
    perturbed(vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config())).save_pretrained(
        root / "sharded", max_shard_size="1MB"
    )
    return root


def backends_opened():
    """Records the `backend` of every safetensors file opened while active."""
    opened = []
    real = safetensors.safe_open

    def spy(*args, **kwargs):
        opened.append(kwargs.get("backend", "mmap"))
        return real(*args, **kwargs)

    return opened, mock.patch.object(weights_loading, "safe_open", spy)


@pytest.mark.parametrize("folder", ["depth", "segmentation", "referring", "sharded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"])
def test_cast_load_reads_by_pread_and_equals_the_default_path(saved, folder, dtype):
    cls = {
        "depth": vpd_hf.VPDModelForDepthEstimation,
        "sharded": vpd_hf.VPDModelForDepthEstimation,
        "segmentation": vpd_hf.VPDModelForSegmentation,
        "referring": vpd_hf.VPDModelForReferringSegmentation,
    }[folder]
    opened, patch = backends_opened()
    with patch:
        fast = cls.from_pretrained(saved / folder, dtype=dtype)
    assert opened and set(opened) == {"pread"}
    assert len(opened) == (len(list((saved / folder).glob("*.safetensors"))))
    # transformers' own path: a device_map is one of the arguments left to it
    default = cls.from_pretrained(saved / folder, dtype=dtype, device_map="cpu")
    expected, got = default.state_dict(), fast.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert fast.name_or_path == str(saved / folder)
    assert not any(p.requires_grad for p in fast.vpd.vae.parameters())  # frozen parts stay frozen


def test_auto_classes_take_the_tensor_by_tensor_path(saved):
    opened, patch = backends_opened()
    with patch:
        model = AutoModelForDepthEstimation.from_pretrained(saved / "depth", dtype=torch.bfloat16)
        segmenter = AutoModelForSemanticSegmentation.from_pretrained(saved / "segmentation", dtype=torch.bfloat16)
    assert opened == ["pread", "pread"]
    assert model.dtype == segmenter.dtype == torch.bfloat16


def test_other_loads_are_left_to_transformers(saved):
    opened, patch = backends_opened()
    with patch:
        vpd_hf.VPDModelForDepthEstimation.from_pretrained(saved / "depth")  # no cast
        vpd_hf.VPDModelForDepthEstimation.from_pretrained(saved / "depth", dtype="auto")
        vpd_hf.VPDModelForDepthEstimation.from_pretrained(saved / "depth", dtype=torch.bfloat16, max_depth=5.0)
    assert opened == []
