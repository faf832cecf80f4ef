"""`use_fast_memory_format`: channels_last weights on the CPU, same predictions and checkpoints; the entry points use it."""

import pytest
import torch
from transformers import pipeline

import vpd_hf
from vpd_hf.testing_utils import perturb_weights, tiny_referring_config, tiny_segmentation_config, tiny_vpd_config


def perturbed(model):
    return perturb_weights(model, 0.05).eval()


@pytest.mark.parametrize("task", ["depth", "segmentation", "referring"])
def test_channels_last_predicts_the_same_and_saves_the_same(task, tmp_path):
    torch.manual_seed(0)
    model = perturbed(
        {
            "depth": lambda: vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config()),
            "segmentation": lambda: vpd_hf.VPDModelForSegmentation(
                tiny_segmentation_config(["a", "b"], semantic_inference_mode="whole")
            ),
            "referring": lambda: vpd_hf.VPDModelForReferringSegmentation(tiny_referring_config()),
        }[task]()
    )
    pixels = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    extra = (
        {"input_ids": torch.randint(0, 700, (2, 8), generator=torch.Generator().manual_seed(2))}
        if task == "referring"
        else {}
    )
    with torch.no_grad():
        before = model(pixel_values=pixels, **extra)[0 if task != "depth" else "predicted_depth"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.use_fast_memory_format() is model
    weight = model.vpd.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    with torch.no_grad():
        after = model(pixel_values=pixels, **extra)[0 if task != "depth" else "predicted_depth"]
    scale = float(before.abs().max())
    assert float((after - before).abs().max()) <= 1e-5 * scale
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(state[k], v) for k, v in reloaded.state_dict().items())
    assert reloaded.vpd.unet.conv_in.weight.is_contiguous()  # checkpoints stay in the default layout


def test_pipelines_run_vpd_models_channels_last_on_the_cpu(tmp_path):
    model = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config())
    model.save_pretrained(tmp_path)
    vpd_hf.VPDImageProcessor().save_pretrained(tmp_path)
    estimator = pipeline("depth-estimation", model=str(tmp_path))
    assert estimator.model.vpd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
