#!/usr/bin/env python
"""Convert a checkpoint released by the VPD authors (wl-zhao/VPD) into a vpd_hf model folder.

The folder holds `config.json`, `model.safetensors`, the processor files and `conversion_report.json`; load it with
`VPDModelForSegmentation` / `VPDModelForDepthEstimation` / `VPDModelForReferringSegmentation.from_pretrained(folder)`.
The task is detected from the file's keys. The Stable Diffusion folder (diffusers layout, the base model VPD was
fine-tuned from: stable-diffusion-v1-5) supplies the component configs and what the file lacks: the VAE encoder of the
"slim" segmentation file and the CLIP text encoder + tokenizer of the referring models.

Example:
  python scripts/convert_vpd_checkpoint.py \\
      --checkpoint vpd_depth_480x480.pth --trust-pickle \\
      --stable-diffusion ./stable-diffusion-v1-5 --output ./vpd-depth-nyu
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vpd_hf.conversion import TASKS, convert_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the released file (.safetensors, .pth, .ckpt)")
    parser.add_argument("--output", type=Path, required=True, help="folder to write the converted model to")
    parser.add_argument("--task", choices=TASKS, default=None, help="expected task (default: detected from the keys)")
    parser.add_argument(
        "--stable-diffusion",
        default=None,
        help="diffusers-layout Stable Diffusion folder or Hub id (its unet/ and vae/ configs; VAE, CLIP text encoder "
        "and tokenizer where the file lacks them; required for referring checkpoints). Default: SD 1.5 configs only.",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading pickled files (.pth/.ckpt/.bin/.pt). Unpickling can execute arbitrary code hidden in the "
        "file: use this only for files from a source you trust (e.g. the authors' release links), or convert them "
        "to .safetensors on an isolated machine first. Tensor-only files are read with torch's restricted unpickler; "
        "files with other Python objects (an argparse.Namespace in `args`) fall back to full unpickling.",
    )
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="dtype of the saved weights"
    )
    parser.add_argument("--class-names", nargs="+", default=None, help="segmentation label names (default: ADE20K)")
    parser.add_argument("--scene-names", nargs="+", default=None, help="depth scene names (default: NYUv2's 27)")
    parser.add_argument("--token-length", type=int, default=None, help="referring: expected tokens per expression")
    parser.add_argument(
        "--prompt-embeddings",
        type=Path,
        default=None,
        help="prompt table to use instead of the file's (e.g. the repository's segmentation/class_embeddings.pth)",
    )
    parser.add_argument(
        "--non-strict", action="store_true", help="skip (and report) file keys that match nothing instead of failing"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = convert_checkpoint(
            args.checkpoint,
            args.output,
            task=args.task,
            stable_diffusion=args.stable_diffusion,
            trust_pickle=args.trust_pickle,
            class_names=args.class_names,
            scene_names=args.scene_names,
            token_length=args.token_length,
            dtype=args.dtype,
            prompt_embeddings=args.prompt_embeddings,
            strict=not args.non_strict,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"Wrote {args.output} (report: {args.output / 'conversion_report.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
