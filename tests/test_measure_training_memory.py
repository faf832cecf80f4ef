"""`scripts/measure_training_memory.py` (the training-memory table of README/BENCHMARKS) on the tiny model: its row
reports what it ran, and its predicted bytes equal the parameter/gradient/AdamW count done here by hand."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_training_memory.py"
GIB = 1024**3

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _run(monkeypatch, tmp_path, *arguments: str) -> dict:
    table = tmp_path / "rows.jsonl"
    monkeypatch.setenv("VPD_MEMORY_TABLE", str(table))
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run as a script: it imports the benchmark harness
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--tiny", "--crop", "64", *arguments])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    (line,) = table.read_text().splitlines()
    return json.loads(line)


def test_lora_row_with_a_bf16_frozen_unet_predicts_two_bytes_per_frozen_unet_weight(monkeypatch, tmp_path):
    import torch

    from vpd_hf import VPDModelForDepthEstimation
    from vpd_hf.testing_utils import tiny_vpd_config
    from vpd_hf.training.lora import add_unet_lora

    row = _run(monkeypatch, tmp_path, "--mode", "lora", "--frozen_bf16", "--checkpointing", "--steps", "2")
    assert row["mode"] == "lora r16" and row["frozen_bf16"] and row["bf16_autocast"] and row["checkpointing"]
    assert len(row["seconds_per_step"]) == 2 and all(t > 0 for t in row["seconds_per_step"])
    assert row["peak_rss_gib_per_process"][0] >= row["peak_rss_before_steps_gib"] > 0

    torch.manual_seed(0)
    model = VPDModelForDepthEstimation(tiny_vpd_config())
    model.vpd.vae.requires_grad_(False)
    add_unet_lora(model, 16)
    unet_frozen = sum(p.numel() for n, p in model.named_parameters() if ".unet." in f".{n}" and not p.requires_grad)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < unet_frozen < parameters and (row["parameters"], row["trainable"]) == (parameters, trainable)
    expected = 4 * (parameters - unet_frozen) + 2 * unet_frozen + 12 * trainable
    assert row["predicted_gib_this_run"] == round(expected / GIB, 2)
    # FSDP shards all of it, frozen base included
    assert row["predicted_gib_per_gpu"] == {str(n): round(expected // n / GIB, 2) for n in (1, 2, 8)}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--mode", "full", "--frozen_bf16"], "--frozen_bf16 needs --mode lora"),
        (["--backbone", "sdxl"], "--tiny builds the tiny"),
    ],
)
def test_contradictory_options_are_refused(monkeypatch, tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        _run(monkeypatch, tmp_path, *arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
