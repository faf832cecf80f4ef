#!/usr/bin/env python
"""What bf16 costs, and how far a bf16 prediction moves with its batch: the numbers behind the README's "Batches and
image sizes" and bf16 paragraphs.

    python scripts/measure_precision.py --random sd15              # SD-1.5 widths, random weights, 512x512
    python scripts/measure_precision.py --random tiny              # the tiny test models (perturbed weights)
    python scripts/measure_precision.py --model outputs/quickstart/depth/model ...   # saved models (e.g. quickstart's)

For each model and task, on the same image: fp32 alone (the reference), fp32 twice in one batch, bf16 alone, bf16
twice in one batch (no padding, so no size grouping: only the kernels' batch size differs). Differences are max abs
over the image divided by the fp32 output's range (depth, segmentation logits, referring foreground probability),
plus the share of pixels whose label / mask changes. bf16 runs as `--dtype bf16` does: the model cast to bfloat16
(VAE included) in channels_last. Prints a table and writes JSON (`--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

TASKS = ("depth", "segmentation", "referring")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", choices=("sd15", "tiny"), help="random-weight models of this size, all three tasks")
    parser.add_argument("--model", action="append", default=[], type=Path, help="a saved VPD model folder")
    parser.add_argument("--side", type=int, default=None, help="image side (default: 512 for sd15, 96 otherwise)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not args.random and not args.model:
        parser.error("give --random sd15|tiny or at least one --model FOLDER")
    return args


def random_models(size: str) -> dict[str, tuple[Any, Any]]:
    """(model, processor) of each task with random weights: SD-1.5 widths or the tiny test configuration."""
    import tempfile

    from transformers import CLIPTokenizer

    import vpd_hf
    from vpd_hf import testing_utils
    from vpd_hf.configuration_vpd import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    if size == "sd15":
        parts = {"unet_config": dict(SD15_UNET_CONFIG), "vae_config": dict(SD15_VAE_CONFIG)}
        text = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "projection_dim": 768}  # fmt: skip
        heads: dict[str, dict] = {"depth": {}, "segmentation": {}, "referring": {}}
    else:
        unet, vae = testing_utils.TINY_FAMILY_CONFIGS["sd15"]
        parts = {"unet_config": dict(unet), "vae_config": dict(vae)}
        text = testing_utils.tiny_clip_text_config(
            testing_utils.TINY_CLIP_VOCAB_SIZE, unet["cross_attention_dim"]
        ).to_dict()
        heads = {"depth": dict(testing_utils.TINY_DEPTH_HEAD), "segmentation": dict(testing_utils.TINY_SEGMENTATION_HEAD),
                 "referring": {"referring_decoder_channels": 32}}  # fmt: skip
    names = ["wall", "floor", "ceiling", "table", "chair", "window", "sky", "person"]
    configs = {
        "depth": vpd_hf.VPDConfig(**parts, **heads["depth"]),
        "segmentation": vpd_hf.VPDConfig(
            **parts, num_prompts=len(names), prompt_names=names, id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, attention_resolutions=[32, 16],
            semantic_inference_mode="whole", **heads["segmentation"],
        ),
        "referring": vpd_hf.VPDConfig(
            **parts, num_prompts=0, token_length=16, attention_resolutions=[32, 16], text_config=text,
            **heads["referring"],
        ),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(testing_utils.save_tiny_clip_tokenizer(folder), model_max_length=16)
    models = {}
    for seed, task in enumerate(TASKS):
        model = testing_utils.randomize_weights(vpd_hf.TASK_MODEL_CLASSES[task](configs[task]), seed=seed)
        image_processor = vpd_hf.VPDImageProcessor()
        processor = vpd_hf.VPDProcessor(image_processor, tokenizer) if task == "referring" else image_processor
        models[task] = (model, processor)
    return models


def calibrate(task: str, model, processor, image) -> None:
    """Random heads saturate (depth: `sigmoid * max_depth` of large logits is a constant map) or predict one class:
    rescale the last layer so that the fp32 prediction of `image` spans its range — depth logits ~ N(0, 1), the
    referring foreground/background margin centred — and every difference can show."""
    import torch

    if task == "segmentation":
        return
    layer = model.head.last_layer_depth[2] if task == "depth" else model.decoder.conv1_1
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output.detach()))
    try:
        predict(task, model, processor, image, 1)
    finally:
        handle.remove()
    logits = captured[0]
    with torch.no_grad():
        if task == "depth":
            mean, std = float(logits.mean()), float(logits.std())
            layer.weight /= std
            layer.bias.sub_(mean).div_(std)
        else:
            layer.bias[1] -= float((logits[:, 1] - logits[:, 0]).median())


def saved_model(folder: Path) -> tuple[str, Any, Any]:
    import vpd_hf
    from vpd_hf.configuration_vpd import VPDConfig

    config = VPDConfig.from_pretrained(folder)
    task = {"VPDModelForDepthEstimation": "depth", "VPDModelForSegmentation": "segmentation",
            "VPDModelForReferringSegmentation": "referring"}[config.architectures[0]]  # fmt: skip
    model = vpd_hf.TASK_MODEL_CLASSES[task].from_pretrained(folder).eval()
    if task == "segmentation":
        model.config.semantic_inference_mode = "whole"  # one pass: the batch is what is measured, not the windows
    processor_class = vpd_hf.VPDProcessor if task == "referring" else vpd_hf.VPDImageProcessor
    return task, model, processor_class.from_pretrained(folder)


def predict(task: str, model, processor, image, copies: int) -> dict[str, Any]:
    """The post-processed prediction of `image` run `copies` times in one batch (first copy returned)."""
    import torch

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    kwargs = {"images": [image] * copies, "return_tensors": "pt"}
    if task == "referring":
        kwargs["text"] = ["the thing on the left"] * copies
    inputs = processor(**kwargs)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        outputs = model(**inputs)
    size = [image.size[::-1]]
    if task == "depth":
        value = processor.post_process_depth_estimation(outputs, target_sizes=size * copies)[0]["predicted_depth"]
        return {"values": value}
    if task == "segmentation":
        mask = outputs.pixel_mask[0] if outputs.pixel_mask is not None else None
        scores = processor._scores_to_target(outputs.logits[:1], mask, size[0])[0]
        return {"values": scores, "labels": scores.argmax(dim=0)}
    result = processor.post_process_referring_segmentation(outputs, target_sizes=size * copies)[0]
    return {"values": result["probabilities"], "labels": result["mask"]}


def compare(got: dict, reference: dict, scale: float) -> dict[str, float]:
    out = {"max_abs_over_range": float((got["values"].float() - reference["values"].float()).abs().max()) / scale}
    if "labels" in reference:
        out["changed_pixels"] = float((got["labels"] != reference["labels"]).float().mean())
    return out


def measure(task: str, model, processor, image) -> dict[str, Any]:
    import copy

    import torch

    started = time.perf_counter()
    fp32 = predict(task, model, processor, image, 1)
    fp32_pair = predict(task, model, processor, image, 2)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16).use_fast_memory_format()
    bf16 = predict(task, bf16_model, processor, image, 1)
    bf16_pair = predict(task, bf16_model, processor, image, 2)
    scale = max(float(fp32["values"].max() - fp32["values"].min()), 1e-12)
    return {
        "fp32_range": scale,
        "fp32_batch_vs_alone": compare(fp32_pair, fp32, scale),
        "bf16_batch_vs_alone": compare(bf16_pair, bf16, scale),
        "bf16_vs_fp32": compare(bf16, fp32, scale),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    args = parse_args()
    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    side = args.side or (512 if args.random == "sd15" else 96)
    photo = Image.open(Path(__file__).resolve().parent.parent / "src" / "vpd_hf" / "assets" / "coffee.jpg")
    image = photo.convert("RGB").resize((side, side), Image.BILINEAR)
    entries: list[tuple[str, str, Any, Any]] = []
    if args.random:
        entries += [(f"random {args.random}", task, m, p) for task, (m, p) in random_models(args.random).items()]
    for folder in args.model:
        task, model, processor = saved_model(folder)
        entries.append((str(folder), task, model, processor))
    results = []
    for name, task, model, processor in entries:
        # the processors keep the image's size: the side chosen here is what the model sees
        if task == "referring":
            processor.image_processor.do_resize = False
        else:
            processor.do_resize = False
        if name.startswith("random"):
            calibrate(task, model, processor, image)
        row = {"model": name, "task": task, "side": side, **measure(task, model, processor, image)}
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "command": "python scripts/measure_precision.py " + " ".join(os.sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "results": results,
    }
    print()
    print(f"{'model':<40} {'task':<13} {'bf16 batch2 vs 1':>17} {'bf16 vs fp32':>13} {'labels bf16/fp32':>17}")
    for row in results:
        labels = row["bf16_vs_fp32"].get("changed_pixels")
        print(f"{row['model'][-40:]:<40} {row['task']:<13} {row['bf16_batch_vs_alone']['max_abs_over_range']:>17.4f} "
              f"{row['bf16_vs_fp32']['max_abs_over_range']:>13.4f} "
              f"{'' if labels is None else f'{labels:.4f}':>17}")  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
