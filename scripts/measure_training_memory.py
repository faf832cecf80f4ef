#!/usr/bin/env python
"""Peak memory and time of VPD training steps (depth model, AdamW), measured beside the bytes predicted from the
parameter, gradient and optimiser-state counts.

    # one row, in a fresh process (peak RSS of the whole process, and of the training steps alone):
    flock /tmp/vpd-heavy.lock python scripts/measure_training_memory.py --mode lora --checkpointing --batch 1
    # FSDP2 over 2 CPU processes (peak per process):
    flock /tmp/vpd-heavy.lock accelerate launch --config_file configs/accelerate/cpu_fsdp.yaml \\
        scripts/measure_training_memory.py --mode full --batch 1

The model has the SD-1.5 size (VPDConfig's defaults: 860 M-parameter UNet, VAE encoder, depth head) with random
weights (nothing is downloaded); `--backbone sdxl` the SDXL size (2.6 B-parameter UNet), `--tiny` the test model. Each
row prints one JSON line: measured peak RSS per process, seconds per step (the last of `--steps`), parameter counts,
and the predicted bytes before activations: the weights as stored (4 bytes per parameter in fp32, as under bf16
autocast, which keeps fp32 weights; 2 for the frozen UNet with `--frozen_bf16`), gradients 4 and AdamW 8 bytes per
trainable parameter; under FSDP all three divide by the number of devices.
"""

from __future__ import annotations

import argparse
import json
import os
import time

GIB = 1024**3


def predicted_bytes(weight_bytes: int, trainable: int, devices: int = 1, sharded: bool = False) -> int:
    """Weights + gradients + AdamW states (fp32) per device, before activations; `sharded`: FSDP over `devices`."""
    total = weight_bytes + 12 * trainable
    return total // devices if sharded else total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["full", "lora"], default="full")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true", help="the UNet's gradient checkpointing")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    parser.add_argument(
        "--frozen_bf16", action="store_true", help="LoRA only: the frozen UNet stored in bf16 (implies --bf16)"
    )
    parser.add_argument("--backbone", choices=["sd15", "sdxl"], default="sd15", help="the UNet's size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--crop", type=int, default=480)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (to try the script)")
    args = parser.parse_args()
    if args.frozen_bf16 and args.mode != "lora":
        parser.error("--frozen_bf16 needs --mode lora (without LoRA the UNet trains in fp32)")
    args.bf16 = args.bf16 or args.frozen_bf16
    if args.tiny and args.backbone != "sd15":
        parser.error("--tiny builds the tiny SD-1.5-layout test model; leave --backbone out")

    import torch
    from accelerate import Accelerator

    import vpd_hf
    from benchmark import peak_memory_gb, reset_peak_memory  # the harness's readings (this folder)
    from vpd_hf.backbones import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG
    from vpd_hf.testing_utils import tiny_vpd_config
    from vpd_hf.training.launch import enable_fsdp_on_cpu, use_cpu_for_distributed
    from vpd_hf.training.lora import add_unet_lora, cast_frozen_weights
    from vpd_hf.training.sharding import broadcast_from_main, end_run, is_fsdp

    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=use_cpu_for_distributed())
    enable_fsdp_on_cpu(accelerator)
    torch.manual_seed(0)
    if args.tiny:
        config = tiny_vpd_config()
    elif args.backbone == "sdxl":
        config = vpd_hf.VPDConfig(unet_config=SDXL_UNET_CONFIG, vae_config=SDXL_VAE_CONFIG)
    else:
        config = vpd_hf.VPDConfig()
    model = vpd_hf.VPDModelForDepthEstimation(config).train()
    model.vpd.vae.requires_grad_(False)  # frozen in every VPD run
    if args.mode == "lora":
        add_unet_lora(model, args.lora_rank)
        if args.frozen_bf16:
            cast_frozen_weights(model, torch.bfloat16)
    if args.checkpointing:
        model.activation_checkpointing_enable()
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    if is_fsdp(accelerator):
        broadcast_from_main(model, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    after_prepare = peak_memory_gb("cpu")
    peak_was_reset = reset_peak_memory("cpu")

    generator = torch.Generator().manual_seed(accelerator.process_index)
    times = []
    for _ in range(args.steps):
        pixels = torch.rand(args.batch, 3, args.crop, args.crop, generator=generator) * 2 - 1
        depth = torch.rand(args.batch, args.crop, args.crop, generator=generator) * 9 + 0.5
        start = time.perf_counter()
        loss = model(pixel_values=pixels, labels=depth).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    steps_peak = peak_memory_gb("cpu")
    peaks = accelerator.gather(torch.tensor([max(steps_peak, after_prepare), steps_peak], dtype=torch.float64))
    if accelerator.is_main_process:
        processes = accelerator.num_processes
        row = {
            "mode": args.mode + (f" r{args.lora_rank}" if args.mode == "lora" else ""),
            "backbone": "tiny" if args.tiny else args.backbone,
            "frozen_bf16": args.frozen_bf16,
            "checkpointing": args.checkpointing,
            "bf16_autocast": args.bf16,
            "batch": args.batch,
            "crop": args.crop,
            "processes": processes,
            "fsdp": is_fsdp(accelerator),
            "parameters": parameters,
            "trainable": trainable,
            "peak_rss_gib_per_process": [round(float(p), 2) for p in peaks.view(-1, 2)[:, 0]],
            # the training steps alone (from the RSS they start at); null where the peak could not be reset
            "steps_peak_rss_gib_per_process": [round(float(p), 2) for p in peaks.view(-1, 2)[:, 1]]
            if peak_was_reset
            else None,
            "peak_rss_before_steps_gib": round(after_prepare, 2),
            "seconds_per_step": [round(t, 2) for t in times],
            "predicted_gib_this_run": round(
                predicted_bytes(weight_bytes, trainable, processes, is_fsdp(accelerator)) / GIB, 2
            ),
            "predicted_gib_per_gpu": {
                str(n): round(predicted_bytes(weight_bytes, trainable, n, sharded=n > 1) / GIB, 2) for n in (1, 2, 8)
            },
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "tiny": args.tiny,
        }
        print(json.dumps(row), flush=True)
        path = os.environ.get("VPD_MEMORY_TABLE")
        if path:
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    del model, optimizer  # see `end_run`: sharded modules must be collected before the process group goes
    end_run(accelerator)


if __name__ == "__main__":
    main()
