"""Gradient checkpointing (the UNet's own, enabled through `activation_checkpointing_enable()` as `--gradient_checkpointing`
does) gives the gradients of a plain backward pass for each task's model, fp32. Under FSDP2 it is exercised by
tests/test_fsdp.py (the resumed run trains with it and matches the uninterrupted run)."""

import copy

import pytest
import torch

import vpd_hf
from vpd_hf.testing_utils import tiny_referring_config, tiny_segmentation_config, tiny_vpd_config

# fp32, one thread: the recomputation runs the same kernels on the same inputs; reached: bit-identical gradients for
# the three tasks (the tolerance leaves room for other CPUs' kernels).
TOLERANCE = {"rtol": 1e-6, "atol": 1e-8}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the comparison does not depend on how a parallel reduction splits the work (and it is faster than
    two threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model_and_batch(task: str):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    torch.manual_seed(0)
    if task == "depth":
        model = vpd_hf.VPDModelForDepthEstimation(tiny_vpd_config())
        batch = {"pixel_values": pixels, "labels": torch.rand(2, 64, 64, generator=generator) * 5 + 0.5}
    elif task == "segmentation":
        model = vpd_hf.VPDModelForSegmentation(tiny_segmentation_config())
        batch = {"pixel_values": pixels, "labels": torch.randint(0, 5, (2, 64, 64), generator=generator)}
    else:
        config = tiny_referring_config(token_length=8)
        model = vpd_hf.VPDModelForReferringSegmentation(config)
        input_ids = torch.randint(0, config.text_config["vocab_size"], (2, 8), generator=generator)
        batch = {"pixel_values": pixels, "input_ids": input_ids,
                 "labels": torch.randint(0, 2, (2, 64, 64), generator=generator)}  # fmt: skip
    return model.train(), batch


def _gradients(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout masks in both runs (the checkpointed recomputation restores the RNG)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", ["depth", "segmentation", "referring"])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(task):
    plain, batch = _model_and_batch(task)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    unet = checkpointed.vpd.unet
    assert all(block.gradient_checkpointing for block in [*unet.down_blocks, *unet.up_blocks])
    assert not any(getattr(block, "gradient_checkpointing", False) for block in plain.vpd.unet.down_blocks)
    loss, want = _gradients(plain, batch)
    checkpointed_loss, got = _gradients(checkpointed, batch)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    assert got.keys() == want.keys()
    assert any(name.startswith("vpd.unet.") for name in got) and any(not name.startswith("vpd.") for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOLERANCE, msg=name)
