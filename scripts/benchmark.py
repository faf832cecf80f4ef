#!/usr/bin/env python
"""Speed and memory of VPD inference and training, against the official design and a Marigold-style loop.

Models have random weights, on the UNet of `--backbone` (`sd15`: Stable Diffusion 1.5, `sd21`: SD 2.1, `sdxl`: SDXL
base; see `vpd_hf.backbones`) at the real size (`--size full`; `sd15` is an alias kept for old commands) or the tiny
test size (`--size tiny`, for CI smoke runs). They are built once, saved with `save_pretrained` under `--cache-dir`,
and every measurement runs in a
fresh process that loads them with `from_pretrained(dtype=...)`, so each peak-memory figure belongs to one
configuration. Per task and dtype (inference) the worker measures, on the same inputs and weights:

* `model`: the vpd_hf forward (VAE encoder + UNet pass + head) over `--batch-sizes` x `--resolutions`: latency and
  images/s; `pipeline`: the transformers pipeline on PIL images (processor + model + post-processing);
* `bare`: stock diffusers `AutoencoderKL.encode` + `UNet2DConditionModel` at t = 1 with the task's context, plus the
  task head timed alone on the UNet features (`bare+head`): the floor the pipeline is compared with;
* `capture`: the UNet pass with VPD's attention-map processors against the same pass with SDPA everywhere;
* `marigold`: one VAE encode + `--marigold-steps` UNet calls per image (the cost profile of generative depth, without
  its VAE decodes: a lower bound);
* `reference`: the official design, fp32 with attention probabilities materialised in every layer and its attention
  store (`vpd_hf.attention.reference_attention`); the fast path's output is checked against it (relative L2 error);
* FLOPs of one forward (`torch.utils.flop_counter`, 2 per multiply-add) and the fraction of the measured bf16 matmul
  rate of the device they reach.

Training (`--train-modes`): one optimiser step (forward with labels, backward, AdamW) at `--train-resolution` and
`--train-batch-size`: `full` fine-tuning (fp32 weights, bf16 autocast), `checkpointing` (the same with activation
checkpointing), `lora` (rank 16 on the UNet attention, frozen base weights in bf16, trainable weights in fp32),
`reference` (the official design: fp32, every attention materialised, no autocast). Reports seconds per step and
peak memory (RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA).

Multi-task (`--multitask`): one `VPDModelForDensePrediction` forward with 2 heads (depth + segmentation) and with 3
(+ normals) against the single-task models of those tasks run one after the other (depth and normals: the official
scene-prompt models; segmentation: 150 class prompts, one pass), at the first `--resolutions` side, batch 1, for each of
`--dtypes`, the A and B runs alternated within each repeat. The models share one copy of the backbone weights (random;
the timings do not depend on their values), so the comparison fits in the memory of one SD-size model per dtype.

Prints Markdown tables and writes JSON (`--json`). Examples:

    python scripts/benchmark.py --tasks depth --dtypes fp32 bf16 --json outputs/bench-cpu.json          # CPU
    python scripts/benchmark.py --backbone sdxl --tasks depth --dtypes bf16 --resolutions 512 1024 \
        --json outputs/bench-cpu-sdxl.json                                                                # SDXL
    python scripts/benchmark.py --device cuda --tasks depth segmentation referring --dtypes bf16 fp32 \\
        --batch-sizes 1 16 32 --repeats 10 --warmup 3 --train-modes full checkpointing lora reference \\
        --train-resolution 480 --json outputs/bench-h100.json                                            # GPU
    python scripts/benchmark.py --multitask --dtypes fp32 bf16 --repeats 2 --json outputs/bench-multitask.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TASKS = ("depth", "segmentation", "referring")
BACKBONES = ("sd15", "sd21", "sdxl")
SIZES = ("full", "tiny", "sd15")  # "sd15": the old name of "full"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TRAIN_MODES = ("full", "checkpointing", "lora", "reference")
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}  # relative L2 error of the fast path vs the fp32 reference
TEXT = "the small dog on the left of the red chair"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["depth"], help="tasks to measure")
    parser.add_argument("--backbone", choices=BACKBONES, default="sd15", help="UNet family (random weights)")
    parser.add_argument("--size", choices=SIZES, default="full", help="real-size or tiny test model ('sd15' = full)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if available")
    parser.add_argument("--dtypes", nargs="*", choices=sorted(DTYPES), default=["fp32", "bf16"], help="inference")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512], help="square input sides")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1], help="batch sizes of the model forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--marigold-steps", type=int, default=10, help="UNet calls of the Marigold-style loop (0: off)")
    parser.add_argument("--no-reference", action="store_true", help="skip the official-design reference path")
    parser.add_argument("--no-bare", action="store_true", help="skip the stock diffusers floor and capture overhead")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the pipeline timings (model forward only)")
    parser.add_argument("--train-modes", nargs="*", choices=TRAIN_MODES, default=[], help="training step measurements")
    parser.add_argument("--train-resolution", type=int, default=480, help="training crop side")
    parser.add_argument("--train-batch-size", type=int, default=1, help="training batch size")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (model + inputs)")
    parser.add_argument("--contiguous", action="store_true",
                        help="keep the default (NCHW) memory format for inference; without either flag, inference "
                             "uses the library's default, `use_fast_memory_format` (channels_last on CPU)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (measured after warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "vpd_hf_benchmark_models")
    parser.add_argument("--multitask", action="store_true",
                        help="time one multi-task forward (2 and 3 heads) against the single-task models in turn")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size == "sd15":
        args.size = "full"
    if any(r % 8 or r < 64 for r in [*args.resolutions, args.train_resolution]):
        parser.error("--resolutions and --train-resolution must be multiples of 8, at least 64")
    if min([*args.batch_sizes, args.train_batch_size, args.repeats]) < 1 or args.warmup < 0:
        parser.error("batch sizes and --repeats must be >= 1, --warmup >= 0")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by the workers
# ---------------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return name


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int, device: str) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeats}


def reset_peak_memory(device: str) -> bool:
    """CUDA: resets the allocator's peak. CPU (Linux): resets the process's peak RSS (VmHWM) to its current RSS, so
    that the next reading is the peak of what ran since (model resident + the measured work), not of loading.
    Returns whether it could (not on a CPU without /proc: the reading then stays the lifetime peak)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_gb(device: str) -> float:
    """Peak since the last reset: allocated tensors on CUDA; resident set size (VmHWM) on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024**2
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def matmul_rate_tflops(device: str, dtype_name: str = "bf16") -> float:
    """Measured dense matmul rate of the device in `dtype_name` (TFLOP/s, 2 FLOPs per multiply-add)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    result = timed(lambda: a @ b, repeats=10 if device == "cuda" else 3, warmup=2, device=device)
    return 2 * n**3 / result["min_s"] / 1e12


def relative_error(fast, reference) -> float:
    fast, reference = fast.float(), reference.float()
    return float((fast - reference).norm() / reference.norm().clamp_min(1e-12))


def model_path(args: argparse.Namespace, task: str) -> Path:
    return args.cache_dir / f"{args.backbone}-{args.size}-{task}"


# ---------------------------------------------------------------------------------------------------------------------
# models: built once with random weights, saved, then loaded by every worker
# ---------------------------------------------------------------------------------------------------------------------


def backbone_configs(backbone: str, full: bool) -> dict[str, Any]:
    """`VPDConfig` arguments of the backbone's UNet and VAE, and its text encoder config(s) for referring models."""
    from vpd_hf import backbones, testing_utils
    from vpd_hf.configuration_vpd import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    # SD 1.5's CLIP ViT-L/14 text encoder
    clip_l = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "projection_dim": 768}  # fmt: skip
    if full:
        unet, vae = {"sd15": (SD15_UNET_CONFIG, SD15_VAE_CONFIG), "sd21": (backbones.SD21_UNET_CONFIG, SD15_VAE_CONFIG),
                     "sdxl": (backbones.SDXL_UNET_CONFIG, backbones.SDXL_VAE_CONFIG)}[backbone]  # fmt: skip
        text = {"sd15": [clip_l], "sd21": [backbones.SD21_TEXT_CONFIG],
                "sdxl": [backbones.SDXL_TEXT_CONFIG, backbones.SDXL_TEXT_CONFIG_2]}[backbone]  # fmt: skip
    else:
        family = {"sd15": "sd15", "sd21": "sd2", "sdxl": "sdxl"}[backbone]
        unet, vae = testing_utils.TINY_FAMILY_CONFIGS[family]
        vocab = testing_utils.TINY_CLIP_VOCAB_SIZE
        if backbone == "sdxl":
            first, second = testing_utils.TINY_SDXL_TEXT_WIDTHS
            text = [testing_utils.tiny_clip_text_config(vocab, first).to_dict(),
                    testing_utils.tiny_clip_text_config(vocab, second, testing_utils.TINY_SDXL_POOLED_DIM).to_dict()]  # fmt: skip
        else:
            text = [testing_utils.tiny_clip_text_config(vocab, unet["cross_attention_dim"]).to_dict()]
    return {"unet_config": dict(unet), "vae_config": dict(vae), "text_configs": [dict(t) for t in text]}


def build_and_save(args: argparse.Namespace, task: str) -> None:
    """A random-weight model of `task` on `args.backbone` at `args.size`, saved with its processor (runs in its own
    process)."""
    import torch
    from transformers import CLIPTokenizer

    import vpd_hf
    from vpd_hf.prompts import ADE20K_CLASS_NAMES
    from vpd_hf.testing_utils import TINY_DEPTH_HEAD, TINY_SEGMENTATION_HEAD, save_tiny_clip_tokenizer

    torch.manual_seed(0)
    full = args.size == "full"
    parts = backbone_configs(args.backbone, full)
    text_configs = parts.pop("text_configs")
    if task == "depth":
        config = vpd_hf.VPDConfig(**parts, **({} if full else TINY_DEPTH_HEAD))
        model = vpd_hf.VPDModelForDepthEstimation(config)
    elif task == "segmentation":
        names = list(ADE20K_CLASS_NAMES)
        config = vpd_hf.VPDConfig(
            **parts, num_prompts=150, prompt_names=names, id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, attention_resolutions=[32, 16],
            semantic_inference_mode="slide", **({} if full else TINY_SEGMENTATION_HEAD),
        )  # fmt: skip
        model = vpd_hf.VPDModelForSegmentation(config)
    else:
        with tempfile.TemporaryDirectory() as folder:  # the offline tokenizer (a subset of CLIP's vocabulary)
            tokenizer = CLIPTokenizer.from_pretrained(save_tiny_clip_tokenizer(folder), model_max_length=40)
        extra: dict[str, Any] = {"text_config": text_configs[0]}
        if len(text_configs) == 2:  # SDXL: the second encoder pads with "!" (tokenizer_2)
            extra["text_config_2"] = {**text_configs[1], "pad_token_id": tokenizer.convert_tokens_to_ids("!"),
                                      "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
        if not full:
            extra["referring_decoder_channels"] = 32
        config = vpd_hf.VPDConfig(**parts, num_prompts=0, token_length=40, attention_resolutions=[32, 16], **extra)
        model = vpd_hf.VPDModelForReferringSegmentation(config)
    generator = torch.Generator().manual_seed(1)
    for table in (model.vpd.prompt_embeddings, model.vpd.pooled_prompt_embeddings):
        if table is not None:
            table.normal_(generator=generator)
    out = model_path(args, task)
    model.save_pretrained(out)
    if task == "referring":
        vpd_hf.VPDProcessor(vpd_hf.VPDImageProcessor.for_task("referring"), tokenizer).save_pretrained(out)
    else:
        vpd_hf.VPDImageProcessor.for_task(task).save_pretrained(out)
    (out / "benchmark_ready").write_text("ok")


def load_model(args: argparse.Namespace, task: str, dtype, device: str, inference: bool = True):
    """The saved model in `dtype` on `device`; for inference in the memory format the pipelines use
    (`use_fast_memory_format`) unless `--channels-last` / `--contiguous` say otherwise."""
    import torch

    import vpd_hf

    start = time.perf_counter()
    model = vpd_hf.TASK_MODEL_CLASSES[task].from_pretrained(model_path(args, task), dtype=dtype).to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    elif inference and not args.contiguous:
        model.use_fast_memory_format()
    return model, time.perf_counter() - start


def is_channels_last(model) -> bool:
    import torch

    weight = model.vpd.unet.conv_in.weight
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


class TaskRunner:
    """Inputs and forward calls of one task, so that every path runs on the same tensors."""

    def __init__(self, args: argparse.Namespace, task: str, model, device: str, dtype) -> None:
        import torch

        self.task, self.model, self.device, self.dtype = task, model, device, dtype
        self.args = args
        if task == "referring":
            import vpd_hf

            processor = vpd_hf.VPDProcessor.from_pretrained(model_path(args, task))
            self.input_ids = processor(text=[TEXT], return_tensors="pt")["input_ids"].to(device)
        self.generator = torch.Generator().manual_seed(0)

    def pixels(self, batch: int, side: int):
        import torch

        generator = torch.Generator().manual_seed(batch * 100003 + side)
        pixels = torch.rand(batch, 3, side, side, generator=generator) * 2 - 1
        pixels = pixels.to(self.device, self.dtype)
        return pixels.contiguous(memory_format=torch.channels_last) if is_channels_last(self.model) else pixels

    def forward(self, pixels):
        """The model's single-pass output (depth map / logits)."""
        model = self.model
        if self.task == "depth":
            return model(pixels).predicted_depth
        if self.task == "segmentation":
            return model.dense_logits(pixels)
        ids = self.input_ids.expand(pixels.shape[0], -1)
        return model(pixel_values=pixels, input_ids=ids).logits

    def check_outputs(self, pixels) -> dict[str, Any]:
        """What the correctness check compares: the backbone's feature maps and attention maps (captured from the
        forward) and the task output, as float32. The backbone is compared too because a random-weight head can
        saturate (e.g. the depth head's sigmoid), which would hide differences in its input."""
        captured = {}
        handle = self.model.vpd.register_forward_hook(lambda module, args, output: captured.setdefault("out", output))
        try:
            output = self.forward(pixels)
        finally:
            handle.remove()
        backbone = captured["out"]
        checks = {f"feature_map_{i}": t.float() for i, t in enumerate(backbone.feature_maps)}
        checks.update({f"attention_map_{i}": t.float() for i, t in enumerate(backbone.attention_maps or ())})
        checks["output"] = output.float()
        return checks

    def unet_conditioning(self, latents) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for `latents`, as the model builds them (context, and SDXL's
        `added_cond_kwargs`)."""
        vpd, batch = self.model.vpd, latents.shape[0]
        if self.task == "depth":
            embeds, pooled = vpd.get_prompt_embeddings(None, batch), vpd.get_pooled_prompt_embeddings(None, batch)
        elif self.task == "segmentation":
            embeds, pooled = None, None
        else:
            embeds, pooled = self.model.encode_text_and_pooled(self.input_ids.expand(batch, -1))
        return vpd.unet_conditioning(latents, embeds, pooled)

    def head_call(self, pixels):
        """A function running only the task head (depth head / FPN neck + head / LAVT decoder) on the inputs it gets
        for `pixels`, captured by a pre-hook during one forward."""
        model = self.model
        first = {"depth": getattr(model, "head", None), "segmentation": getattr(model, "neck", None),
                 "referring": getattr(model, "decoder", None)}[self.task]  # fmt: skip
        captured = {}
        handle = first.register_forward_pre_hook(
            lambda module, args, kwargs: captured.setdefault("inputs", (args, kwargs)), with_kwargs=True
        )
        try:
            self.forward(pixels)
        finally:
            handle.remove()
        args, kwargs = captured["inputs"]
        if self.task == "segmentation":
            return lambda: model.head(model.neck(*args, **kwargs))
        return lambda: first(*args, **kwargs)

    def pipeline(self, side: int):
        import numpy as np
        import torch
        from PIL import Image
        from transformers import pipeline

        import vpd_hf

        path = model_path(self.args, self.task)
        image = Image.fromarray((np.random.default_rng(side).random((side, side, 3)) * 255).astype(np.uint8))
        size = {"height": side, "width": side}
        device = 0 if self.device == "cuda" else -1
        if self.task == "referring":
            processor = vpd_hf.VPDProcessor.from_pretrained(path)
            processor.image_processor.size = size
            referring = pipeline("referring-image-segmentation", model=self.model, processor=processor, device=device)
            pipe = lambda images, **kwargs: referring(images, text=TEXT, **kwargs)  # noqa: E731
        else:
            image_processor = vpd_hf.VPDImageProcessor.for_task(self.task, size=size)
            name = "depth-estimation" if self.task == "depth" else "image-segmentation"
            pipe = pipeline(name, model=self.model, image_processor=image_processor, device=device, dtype=self.dtype)
        if self.args.contiguous:  # the pipelines apply the library's default format; --contiguous measures without
            self.model.to(memory_format=torch.contiguous_format)
        return pipe, image


# ---------------------------------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------------------------------


def inference_worker(args: argparse.Namespace, task: str, dtype_name: str) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.utils.flop_counter import FlopCounterMode

    from vpd_hf.attention import reference_attention

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[dtype_name])
    reset_peak_memory(device)
    model, load_s = load_model(args, task, dtype, device)
    load_peak_gb = peak_memory_gb(device)
    reset_peak_memory(device)
    if args.compile:
        model.vpd.unet.compile()
    runner = TaskRunner(args, task, model, device, dtype)
    repeats, warmup = args.repeats, args.warmup + (2 if args.compile else 0)
    result: dict[str, Any] = {"task": task, "dtype": dtype_name, "device": device, "load_s": load_s,
                              "load_peak_memory_gb": load_peak_gb}  # fmt: skip
    result["vae_dtype"] = str(model.vpd.vae.encoder.conv_in.weight.dtype).replace("torch.", "")
    result["threads"] = torch.get_num_threads()
    result["memory_format"] = "channels_last" if is_channels_last(model) else "contiguous"

    with torch.inference_mode():
        # 1. the vpd_hf forward over batch sizes and resolutions, then the pipeline
        result["model"] = {}
        for side in args.resolutions:
            for batch in args.batch_sizes:
                pixels = runner.pixels(batch, side)
                timing = timed(lambda p=pixels: runner.forward(p), repeats, warmup, device)
                timing["images_per_s"] = batch / timing["median_s"]
                result["model"][f"{side}x{batch}"] = timing
        side = args.resolutions[0]
        result["pipeline"] = {}
        pipe, image = runner.pipeline(side) if not args.no_pipeline else (None, None)
        for batch in args.batch_sizes if not args.no_pipeline else ():
            images = [image] * batch if batch > 1 else image
            kwargs = {"batch_size": batch} if batch > 1 else {}
            timing = timed(lambda i=images, k=kwargs: pipe(i, **k), repeats, warmup, device)
            timing["images_per_s"] = batch / timing["median_s"]
            result["pipeline"][f"{side}x{batch}"] = timing
        result["peak_memory_gb"] = peak_memory_gb(device)

        # 2. FLOPs of one forward at each resolution (batch 1)
        result["gflops"] = {}
        for side in args.resolutions:
            counter = FlopCounterMode(display=False)
            with counter:
                runner.forward(runner.pixels(1, side))
            result["gflops"][str(side)] = counter.get_total_flops() / 1e9
        result["matmul_tflops_bf16"] = matmul_rate_tflops(device, "bf16")
        if dtype_name != "bf16":
            result[f"matmul_tflops_{dtype_name}"] = matmul_rate_tflops(device, dtype_name)

        pixels = runner.pixels(1, side)
        fast = runner.check_outputs(pixels)
        if not all(torch.isfinite(t).all() for t in fast.values()):
            raise FloatingPointError(f"{task} {dtype_name}: non-finite output")

        # 3. the stock diffusers floor, the head alone, and the attention-capture overhead
        if not args.no_bare:
            config = model.config
            unet = UNet2DConditionModel(**config.unet_config)
            unet.load_state_dict(model.vpd.unet.state_dict(), strict=False)
            vae = AutoencoderKL(**config.vae_config)
            vae.load_state_dict(model.vpd.vae.state_dict(), strict=False)
            del vae.decoder
            unet, vae = unet.to(device, dtype).eval(), vae.to(device, dtype).eval()
            if is_channels_last(model):  # the floor in the same memory format as the model
                unet, vae = unet.to(memory_format=torch.channels_last), vae.to(memory_format=torch.channels_last)
            conditioning = runner.unet_conditioning(model.vpd.encode_images(pixels))
            timestep = torch.ones(1, dtype=torch.long, device=device)

            def bare():
                latents = vae.encode(pixels).latent_dist.mode()
                return unet(latents, timestep, **conditioning).sample

            result["bare"] = timed(bare, repeats, warmup, device)
            result["head"] = timed(runner.head_call(pixels), repeats, warmup, device)
            result["bare_plus_head_s"] = result["bare"]["median_s"] + result["head"]["median_s"]

            latents = model.vpd.encode_images(pixels)
            vpd_unet = model.vpd.unet

            def unet_pass():
                with model.vpd._recorder.record():
                    return vpd_unet(latents, timestep, **conditioning)

            result["unet_with_capture"] = timed(unet_pass, repeats, warmup, device)
            saved = vpd_unet.attn_processors
            vpd_unet.set_attn_processor(AttnProcessor2_0())
            result["unet_sdpa_only"] = timed(unet_pass, repeats, warmup, device)
            vpd_unet.set_attn_processor(saved)
            result["capture_overhead"] = (
                result["unet_with_capture"]["median_s"] / result["unet_sdpa_only"]["median_s"] - 1
            )

            # 4. Marigold-style: one encode, N UNet calls
            if args.marigold_steps:

                def marigold():
                    latents = vae.encode(pixels).latent_dist.mode()
                    for _ in range(args.marigold_steps):
                        latents_out = unet(latents, timestep, **conditioning).sample
                    return latents_out

                result["marigold"] = timed(marigold, max(1, repeats // 2), min(warmup, 1), device)
                result["marigold"]["steps"] = args.marigold_steps
            del unet, vae

    # 5. the official design: fp32, every attention materialised, attention store
    if not args.no_reference:
        model.float()
        reference_runner = TaskRunner(args, task, model, device, torch.float32)
        ref_pixels = pixels.float()
        with torch.inference_mode(), reference_attention(model.vpd.unet) as store:
            result["reference"] = timed(
                lambda: (store.clear(), reference_runner.forward(ref_pixels)), repeats, warmup, device
            )
            store.clear()
            reference_out = reference_runner.check_outputs(ref_pixels)
            result["reference"]["stored_maps"] = len(store)
        errors = {name: relative_error(fast[name], reference_out[name]) for name in fast}
        error = max(errors.values())
        result["correctness"] = {"relative_l2_error": error, "per_output": errors, "tolerance": TOLERANCE[dtype_name],
                                 "ok": error <= TOLERANCE[dtype_name]}  # fmt: skip
    return result


def training_worker(args: argparse.Namespace, task: str, mode: str) -> dict[str, Any]:
    import torch

    from vpd_hf.attention import reference_attention
    from vpd_hf.training.lora import add_unet_lora, cast_frozen_weights
    from vpd_hf.training.optimization import build_optimizer

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    reset_peak_memory(device)
    model, _ = load_model(args, task, torch.float32, device, inference=False)
    model.train()
    if mode == "checkpointing":
        model.gradient_checkpointing_enable()
    if mode == "lora":
        add_unet_lora(model, rank=16, alpha=16)
        # Frozen base weights in bf16, trainable ones in fp32 (as diffusers' LoRA training scripts do).
        cast_frozen_weights(model, torch.bfloat16)
    optimizer = build_optimizer(model, task, 1e-5, 0.01, unet_lr_mult=1.0, fused=True if device == "cuda" else None)
    side, batch = args.train_resolution, args.train_batch_size
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {"pixel_values": (torch.rand(batch, 3, side, side, generator=generator) * 2 - 1)}
    if task == "depth":
        inputs["labels"] = torch.rand(batch, side, side, generator=generator) * 9 + 0.5
    elif task == "segmentation":
        inputs["labels"] = torch.randint(0, model.config.num_labels, (batch, side, side), generator=generator)
    else:
        runner = TaskRunner(args, task, model, device, torch.float32)
        inputs["input_ids"] = runner.input_ids.expand(batch, -1)
        inputs["labels"] = torch.randint(0, 2, (batch, side, side), generator=generator)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    reset_peak_memory(device)  # the peak of the training steps (weights, gradients, optimiser state, activations)

    autocast = mode != "reference"

    def step():
        scope = reference_attention(model.vpd.unet) if mode == "reference" else contextlib.nullcontext()
        with scope, torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{task} {mode}: non-finite training loss")

    result = {"task": task, "mode": mode, "device": device, "resolution": side, "batch_size": batch}
    result["step"] = timed(step, max(1, args.repeats - 1), max(1, args.warmup), device)
    result["peak_memory_gb"] = peak_memory_gb(device)
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["total_parameters"] = sum(p.numel() for p in model.parameters())
    result["threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------------------------------------------------------------
# the parent process
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# multi-task: one pass for several heads against one model per task
# ---------------------------------------------------------------------------------------------------------------------

MULTITASK_COMPARISONS = {"2 heads": ("depth", "segmentation"), "3 heads": ("depth", "segmentation", "normals")}


def _tie_backbone(model, source) -> None:
    """Makes `model`'s VAE encoder, UNet and TextAdapter use `source`'s parameter tensors (same shapes)."""
    for name in ("vae", "unet", "text_adapter"):
        mine, theirs = getattr(model.vpd, name), dict(getattr(source.vpd, name).named_parameters())
        for full_name, _ in list(mine.named_parameters()):
            parent, _, leaf = full_name.rpartition(".")
            (mine.get_submodule(parent) if parent else mine)._parameters[leaf] = theirs[full_name]


def build_multitask_models(args: argparse.Namespace) -> dict[str, Any]:
    """The 3-head and 2-head multi-task models and the single-task depth, segmentation and normals models, random,
    in float32, sharing the 3-head model's backbone parameters (built one at a time: one extra SD-size UNet at most)."""
    import torch

    import vpd_hf
    from vpd_hf.prompts import ADE20K_CLASS_NAMES
    from vpd_hf.testing_utils import TINY_DEPTH_HEAD, TINY_SEGMENTATION_HEAD

    full = args.size == "full"
    parts = backbone_configs(args.backbone, full)
    parts.pop("text_configs")
    heads = {} if full else {**TINY_DEPTH_HEAD, **TINY_SEGMENTATION_HEAD}
    names = list(ADE20K_CLASS_NAMES)
    classes = dict(prompt_names=names, id2label=dict(enumerate(names)), semantic_inference_mode="whole")
    specs = {
        "multitask 3 heads": (vpd_hf.VPDModelForDensePrediction, ["depth", "segmentation", "normals"], classes),
        "multitask 2 heads": (vpd_hf.VPDModelForDensePrediction, ["depth", "segmentation"], classes),
        "depth": (vpd_hf.VPDModelForDepthEstimation, ["depth"], {}),
        "segmentation": (vpd_hf.VPDModelForSegmentation, ["segmentation"], classes),
        "normals": (vpd_hf.VPDModelForNormalEstimation, ["normals"], {}),
    }
    torch.manual_seed(0)
    models: dict[str, Any] = {}
    for key, (model_class, tasks, extra) in specs.items():
        model = model_class(vpd_hf.VPDConfig(tasks=tasks, **parts, **heads, **extra)).eval()
        model.vpd.prompt_embeddings.normal_(generator=torch.Generator().manual_seed(1))
        if models:
            _tie_backbone(model, models["multitask 3 heads"])
        models[key] = model
    return models


def multitask_benchmark(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Seconds per forward (median over `--repeats`, after `--warmup`) of each multi-task model and of its tasks'
    single-task models one after the other, per dtype; A and B alternate within each repeat."""
    import copy

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    side = args.resolutions[0]
    base = build_multitask_models(args)
    results: dict[str, Any] = {"resolution": side, "batch_size": 1, "threads": torch.get_num_threads(), "runs": {}}
    sets = {}
    for dtype_name in args.dtypes:
        models = copy.deepcopy(base)  # one deepcopy: the shared backbone stays shared
        for model in models.values():  # the fast path of `from_pretrained(dtype=...)` + `use_fast_memory_format`
            model.to(device=device, dtype=getattr(torch, DTYPES[dtype_name]))
            model.vpd.vae.float()
            model.use_fast_memory_format()
        sets[dtype_name] = models
    del base
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, side, side, generator=generator) * 2 - 1

    def runner(models: dict[str, Any], keys: tuple[str, ...], dtype) -> Any:
        pixels = images.to(device, dtype)
        if device == "cpu":
            pixels = pixels.contiguous(memory_format=torch.channels_last)

        def run() -> None:
            with torch.no_grad():
                for key in keys:
                    models[key](pixels)
            synchronize(device)

        return run

    for dtype_name, models in sets.items():
        dtype = getattr(torch, DTYPES[dtype_name])
        cases = {}
        for label, tasks in MULTITASK_COMPARISONS.items():
            cases[f"multitask {label}"] = runner(models, (f"multitask {label}",), dtype)
            cases[f"single-task {' + '.join(tasks)}"] = runner(models, tasks, dtype)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.warmup):  # every model once (the single-task runs of 2 heads are a part of those of 3)
            runner(models, tuple(models), dtype)()
        for _ in range(args.repeats):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            print(f"multitask {dtype_name}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  file=sys.stderr)  # fmt: skip
        medians = {name: statistics.median(values) for name, values in times.items()}
        ratios = {
            label: medians[f"multitask {label}"] / medians[f"single-task {' + '.join(tasks)}"]
            for label, tasks in MULTITASK_COMPARISONS.items()
        }
        results["runs"][dtype_name] = {"median_s": medians, "times_s": times, "ratio": ratios}
    return results


def print_multitask_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    env, bench = report["environment"], report["multitask"]
    machine = env.get("gpu") or f"{env['cpu']} ({env['cores']} cores, {bench['threads']} threads)"
    print(f"# VPD multi-task benchmark, {args.backbone} backbone, {args.size} size, device {env['device']}: {machine}")
    print(f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}")
    print(f"command: python scripts/{report['command']}\n")
    side = bench["resolution"]
    print(f"## One forward, {side}x{side}, batch 1 (seconds, median of {args.repeats}, A/B alternated)\n")
    print("| dtype | heads | one multi-task forward | single-task models in turn | ratio |\n|---|---|---|---|---|")
    for dtype_name, run in bench["runs"].items():
        for label, tasks in MULTITASK_COMPARISONS.items():
            multi = run["median_s"][f"multitask {label}"]
            single = run["median_s"][f"single-task {' + '.join(tasks)}"]
            print(f"| {dtype_name} | {' + '.join(tasks)} | {multi:.2f} | {single:.2f} | {run['ratio'][label]:.2f}x |")


def environment(device: str) -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def run_worker(args: argparse.Namespace, spec: str, allow_failure: bool = False) -> dict:
    """Runs one measurement in a fresh process. With `allow_failure`, a worker that dies (e.g. killed for memory on a
    small machine) is recorded as an error row instead of ending the run."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, __file__, *sys.argv[1:], "--_worker", f"{spec}:{out}"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-6000:])
        out.unlink(missing_ok=True)
        killed = " (killed: out of memory?)" if completed.returncode in (-9, 137) else ""
        message = f"benchmark worker {spec} failed (exit {completed.returncode}){killed}"
        if not allow_failure:
            raise SystemExit(message)
        _, task, variant = spec.split("/")
        return {"task": task, "mode": variant, "error": message}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def worker_main(args: argparse.Namespace) -> None:
    spec, out = args._worker.split(":", 1)
    kind, task, variant = spec.split("/")
    if kind == "build":
        build_and_save(args, task)
        result: dict[str, Any] = {"built": task}
    elif kind == "infer":
        result = inference_worker(args, task, variant)
    else:
        result = training_worker(args, task, variant)
    Path(out).write_text(json.dumps(result))


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def print_report(report: dict, args: argparse.Namespace) -> None:
    env = report["environment"]
    machine = env.get("gpu") or f"{env['cpu']} ({env['cores']} cores)"
    print(f"# VPD benchmark, {args.backbone} backbone, {args.size} size, device {env['device']}: {machine}")
    print(f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, peft {env['peft']}")
    print(f"command: python scripts/{report['command']}\n")
    if report["inference"]:
        side = args.resolutions[0]
        print(f"## Inference, {side}x{side}, batch 1 (seconds, median)\n")
        print("| task | dtype | model | pipeline | bare VAE+UNet | bare+head | pipeline / bare+head | reference (fp32, "
              "naive attn) | speed-up vs reference | Marigold-style | speed-up vs Marigold | capture overhead | "
              "GFLOPs | % of bf16 matmul rate | rel. error vs reference | peak memory (GB): loading / inference |")  # fmt: skip
        print("|---" * 16 + "|")
        for run in report["inference"]:
            model_s = run["model"][f"{side}x1"]["median_s"]
            pipe_s = run["pipeline"].get(f"{side}x1", {}).get("median_s")
            bare = run.get("bare", {}).get("median_s")
            bare_head = run.get("bare_plus_head_s")
            ref = run.get("reference", {}).get("median_s")
            mari = run.get("marigold", {}).get("median_s")
            gflops = run["gflops"][str(side)]
            rate = gflops / 1e3 / model_s / run["matmul_tflops_bf16"]
            error = run.get("correctness", {}).get("relative_l2_error")
            overhead = run.get("capture_overhead")
            print(
                f"| {run['task']} | {run['dtype']} | {fmt(model_s)} | {fmt(pipe_s)} | {fmt(bare)} | {fmt(bare_head)} "
                f"| {fmt(pipe_s / bare_head if pipe_s and bare_head else None, 2)} | {fmt(ref)} "
                f"| {fmt(ref / model_s if ref else None, 2)} | {fmt(mari)} | {fmt(mari / model_s if mari else None, 2)} "
                f"| {'—' if overhead is None else f'{100 * overhead:+.1f} %'} | {gflops:.0f} | {100 * rate:.1f} % "
                f"| {'—' if error is None else f'{error:.1e}'} | {fmt(run.get('load_peak_memory_gb'), 2)} "
                f"/ {run['peak_memory_gb']:.2f} |"
            )
        rows = [(run, key, t) for run in report["inference"] for key, t in run["model"].items()]
        if len(rows) > len(report["inference"]):
            print("\n## Throughput of the model forward (images/s)\n")
            print("| task | dtype | resolution x batch | latency (s) | images/s |\n|---|---|---|---|---|")
            for run, key, timing in rows:
                print(f"| {run['task']} | {run['dtype']} | {key} | {timing['median_s']:.4f} "
                      f"| {timing['images_per_s']:.2f} |")  # fmt: skip
    if report["training"]:
        print("\n## Training step (forward + backward + AdamW)\n")
        print("| task | mode | resolution x batch | s / step | peak memory (GB) | trainable parameters |")
        print("|---|---|---|---|---|---|")
        for run in report["training"]:
            if "error" in run:
                print(f"| {run['task']} | {run['mode']} | {args.train_resolution}x{args.train_batch_size} "
                      f"| {run['error']} | — | — |")  # fmt: skip
                continue
            print(f"| {run['task']} | {run['mode']} | {run['resolution']}x{run['batch_size']} "
                  f"| {run['step']['median_s']:.3f} | {run['peak_memory_gb']:.2f} | {run['trainable_parameters']:,} |")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args._worker:
        worker_main(args)
        return
    device = resolve_device(args.device)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "environment": environment(device),
        "inference": [],
        "training": [],
    }
    if args.multitask:
        report["multitask"] = multitask_benchmark(args, device)
        print_multitask_report(report, args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        return
    for task in args.tasks:
        if not (model_path(args, task) / "benchmark_ready").is_file():
            print(f"building the random {args.size} {args.backbone} {task} model in {model_path(args, task)} ...",
                  file=sys.stderr)  # fmt: skip
            run_worker(args, f"build/{task}/-")
        for dtype in args.dtypes:
            print(f"inference: {task} {dtype} ...", file=sys.stderr)
            report["inference"].append(run_worker(args, f"infer/{task}/{dtype}"))
        for mode in args.train_modes:
            print(f"training: {task} {mode} ...", file=sys.stderr)
            report["training"].append(run_worker(args, f"train/{task}/{mode}", allow_failure=True))
    print_report(report, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    failed = [r for r in report["inference"] if not r.get("correctness", {}).get("ok", True)]
    if failed:
        raise SystemExit(
            f"fast path differs from the reference beyond tolerance: {[(r['task'], r['dtype']) for r in failed]}"
        )


if __name__ == "__main__":
    main()
