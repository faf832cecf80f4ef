"""The `vpd-hf` command line: predict, train, evaluate, synth, card, demo (`vpd-hf COMMAND --help`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Commands whose arguments belong to another parser (the scripts' own): everything after the name is passed on.
DELEGATED = {
    "train": "fine-tune VPD with accelerate (every option of scripts/train.py)",
    "evaluate": "evaluate a VPD checkpoint with its task's protocol (options of scripts/evaluate.py)",
    "synth": "render the offline synthetic indoor-scene dataset as parquet",
}
PREDICT_EXAMPLES = """examples:
  vpd-hf predict --task depth --model org/vpd-depth-nyu photos/*.jpg --output depth_out
  vpd-hf predict --task segmentation --model vpd-seg photos/ --output seg_out --batch-size 4
  vpd-hf predict --task referring --model vpd-ref street.jpg --text "the man in the red shirt" --output ref_out
  accelerate launch -m vpd_hf.cli predict --task depth --model vpd-depth --dataset data/nyu --split validation \\
      --output nyu_depth   # sharded over the processes; rerun to resume"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vpd-hf",
        description="VPD (Visual Perception with a pre-trained Diffusion model) on transformers + diffusers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`vpd-hf COMMAND --help` describes each command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    predict = commands.add_parser(
        "predict",
        help="predict images or a dataset split into PNG files",
        description="Predict depth / semantic labels / referring masks for images (paths, globs, folders) or a whole "
        "`datasets` split, writing colour visualisations and raw maps (16-bit depth PNG in mm, label PNG, mask PNG) "
        "plus a JSON-lines manifest; items already in the manifest are skipped.",
        epilog=PREDICT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("--task", required=True, choices=["depth", "segmentation", "referring"])
    predict.add_argument("--model", required=True, help="VPD checkpoint: Hub id or folder")
    predict.add_argument("inputs", nargs="*", help="image files, glob patterns or folders")
    predict.add_argument("--text", action="append", default=None, help="referring: an expression (repeatable)")
    predict.add_argument("--dataset", default=None, help="instead of inputs: a Hub dataset id or a local folder")
    predict.add_argument("--dataset-config", default=None, help="dataset configuration (e.g. scenes / referring)")
    predict.add_argument("--split", default="validation", help="dataset split (default: validation)")
    predict.add_argument("--image-column", default="image", help="dataset image column (default: image)")
    predict.add_argument("--text-column", default="answer", help="referring: dataset expression column")
    predict.add_argument("--max-samples", type=int, default=None, help="only the first N rows of the split")
    predict.add_argument("--output", required=True, type=Path, help="output folder")
    predict.add_argument("--batch-size", type=int, default=1, help="images per forward (default: 1)")
    predict.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if available)")
    predict.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default: as saved)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")

    card = commands.add_parser(
        "card",
        help="write (and optionally upload) the model card of a saved model folder",
        description="Generate README.md (a Hub model card with model-index results) for a VPD model folder from its "
        "config.json, all_results.json (training) and eval_results.json (scripts/evaluate.py --output_file).",
        epilog="example:\n  vpd-hf card vpd-depth-nyu --repo-id org/vpd-depth-nyu "
        "--eval-file vpd-depth-nyu/eval_results.json --push",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    card.add_argument("folder", type=Path, help="a folder written by save_pretrained / scripts/train.py")
    card.add_argument("--repo-id", default=None, help="Hub repository (org/name) named in the card")
    card.add_argument(
        "--eval-file", type=Path, default=None, help="evaluation JSON (default: FOLDER/eval_results.json)"
    )
    card.add_argument("--push", action="store_true", help="also upload the folder with its card to --repo-id")
    card.add_argument("--private", action="store_true", help="create the repository as private when pushing")

    demo = commands.add_parser(
        "demo",
        help="launch the Gradio demo (extra `demo`)",
        description="A local Gradio app for the three tasks: image in; depth colour map / segmentation overlay / "
        "referring mask for a typed sentence out. Give at least one model folder or Hub id.",
        epilog="example:\n  vpd-hf demo --depth-model org/vpd-depth-nyu --referring-model org/vpd-refcoco",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--depth-model", default=None)
    demo.add_argument("--segmentation-model", default=None)
    demo.add_argument("--referring-model", default=None)
    demo.add_argument("--device", default=None)
    demo.add_argument("--port", type=int, default=None)
    demo.add_argument("--share", action="store_true", help="create a public gradio.live link")

    for name, text in DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _dtype(name: str | None):
    if name is None:
        return None
    import torch

    return getattr(torch, DTYPES[name])


def run_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, int]:
    from .prediction import predict_dataset, predict_files

    if bool(args.inputs) == bool(args.dataset):
        parser.error("predict: give either image inputs or --dataset (not both)")
    if args.batch_size < 1:
        parser.error("predict: --batch-size must be >= 1")
    if args.dataset:
        return predict_dataset(
            args.task, args.model, args.dataset, args.output, split=args.split, dataset_config=args.dataset_config,
            image_column=args.image_column, text_column=args.text_column, batch_size=args.batch_size,
            max_samples=args.max_samples, dtype=_dtype(args.dtype), progress=not args.no_progress,
        )  # fmt: skip
    if args.task == "referring" and not args.text:
        parser.error("predict: --task referring needs at least one --text")
    return predict_files(
        args.task, args.model, args.inputs, args.output, texts=args.text, batch_size=args.batch_size,
        device=args.device, dtype=_dtype(args.dtype), progress=not args.no_progress,
    )  # fmt: skip


def run_card(args: argparse.Namespace) -> Path:
    from .hub import model_card_from_run, push_to_hub, save_model_card

    card = model_card_from_run(args.folder, repo_id=args.repo_id, eval_file=args.eval_file)
    path = save_model_card(card, args.folder)
    if args.push:
        if not args.repo_id:
            raise SystemExit("vpd-hf card: --push needs --repo-id")
        push_to_hub(args.folder, args.repo_id, card=card, private=args.private or None)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        command, rest = argv[0], argv[1:]
        if command == "train":
            from .training.trainer import main as train_main

            train_main(rest, prog="vpd-hf train")
        elif command == "evaluate":
            from .training.evaluation import main as evaluate_main

            evaluate_main(rest, prog="vpd-hf evaluate")
        else:
            from .data.synthetic import main as synth_main

            synth_main(rest, prog="vpd-hf synth")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "predict":
            counts = run_predict(args, parser)
            print(json.dumps({"output": str(args.output), **counts}))
        elif args.command == "card":
            print(run_card(args))
        else:
            from .demo import launch

            launch(args.depth_model, args.segmentation_model, args.referring_model, device=args.device,
                   server_port=args.port, share=args.share)  # fmt: skip
    except (TypeError, ValueError) as error:
        parser.exit(2, f"vpd-hf {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
