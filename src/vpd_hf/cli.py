"""The `vpd-hf` command line: predict, export, train, evaluate, synth, card, demo (`vpd-hf COMMAND --help`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
  vpd-hf predict --task all --model vpd-multitask photos/ --output scene_out   # depth + labels + normals, one pass
  accelerate launch -m vpd_hf.cli predict --task depth --model vpd-depth --dataset data/nyu --split validation \\
      --output nyu_depth   # sharded over the processes; rerun to resume"""


def _task_argument(value: str) -> str:
    """`--task`: one task, a comma list of dense tasks or `all`, checked at parsing (without importing torch)."""
    from .prediction import parse_tasks

    try:
        parse_tasks(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {error}".replace("`task` must be", "--task must be")
        ) from None
    return value


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
        description="Predict depth / semantic labels / surface normals / referring masks for images (paths, globs, folders) or a whole "
        "`datasets` split, writing colour visualisations and raw maps (16-bit depth PNG in mm, label PNG, normals .npy, mask PNG) "
        "plus a JSON-lines manifest. A multi-task model gives several tasks from one pass per image (`--task "
        "depth,segmentation,normals` or `--task all`); items already in the manifest are skipped. An image that cannot be read is "
        "skipped, recorded in the manifest with the reason and listed at the end; the exit status is 1 when nothing "
        "could be predicted (or, with --strict, when anything was skipped), 2 for a wrong argument.",
        epilog=PREDICT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument(
        "--task",
        required=True,
        type=_task_argument,
        help="depth, segmentation, normals or referring; several dense tasks of a multi-task model as a comma list "
        "(depth,segmentation,normals), or all (every task of the model)",
    )
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
    predict.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="model dtype (default: as saved); with --runtime openvino, bf16 = bf16 inference precision",
    )
    predict.add_argument(
        "--runtime",
        choices=["torch", "onnxruntime", "openvino"],
        default="torch",
        help="torch (a checkpoint, default) or a CPU runtime running a `vpd-hf export` folder",
    )
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.add_argument("--strict", action="store_true", help="exit with status 1 if any image was skipped")

    export = commands.add_parser(
        "export",
        help="export a VPD checkpoint to ONNX (extra `deploy`)",
        description="Export a VPD checkpoint to ONNX (torch's dynamo exporter) with a dynamic batch, height and width "
        "(multiples of 64; the processor pads), plus its config, processor and export_info.json, for `vpd-hf predict "
        "--runtime onnxruntime|openvino --model DIR`. Segmentation exports the whole-image pass; the sliding-window "
        "test procedure runs around it.",
        epilog="example:\n  vpd-hf export --model org/vpd-depth-nyu --output vpd-depth-onnx\n"
        "  vpd-hf predict --task depth --model vpd-depth-onnx --runtime openvino photos/ --output depth_out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--model", required=True, help="VPD checkpoint: Hub id or folder")
    export.add_argument("--output", required=True, type=Path, help="output folder")
    export.add_argument(
        "--task",
        choices=["depth", "segmentation", "normals", "referring"],
        default=None,
        help="default: the checkpoint's task",
    )
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="exported weights (default: fp32)")
    export.add_argument("--openvino-ir", action="store_true", help="also save OpenVINO's IR (openvino_model.xml)")
    export.add_argument("--optimize", action="store_true", help="run onnxscript's graph optimiser on the export")

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


# How the library's errors (which name Python arguments in backquotes) name them on this command line.
PREDICT_FLAGS = {
    "`model`": "`--model`",
    "`task`": "`--task`",
    "`device`": "`--device`",
    "`dataset`": "`--dataset`",
    "`dataset_config`": "`--dataset-config`",
    "`split`": "`--split`",
    "`image_column`": "`--image-column`",
    "`text_column`": "`--text-column`",
    "`batch_size`": "`--batch-size`",
    "`texts`": "`--text`",
    "`runtime`": "`--runtime`",
    "`dtype`": "`--dtype`",
}


def run_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from .prediction import predict_dataset, predict_files

    if bool(args.inputs) == bool(args.dataset):
        parser.error("predict: give either image inputs or --dataset (not both)")
    if args.batch_size < 1:
        parser.error("predict: --batch-size must be >= 1")
    if args.dataset:
        return predict_dataset(
            args.task, args.model, args.dataset, args.output, split=args.split, dataset_config=args.dataset_config,
            image_column=args.image_column, text_column=args.text_column, batch_size=args.batch_size,
            max_samples=args.max_samples, dtype=_dtype(args.dtype), progress=not args.no_progress, device=args.device,
            runtime=args.runtime,
        )  # fmt: skip
    if args.task == "referring" and not args.text:
        parser.error("predict: --task referring needs at least one --text")
    return predict_files(
        args.task, args.model, args.inputs, args.output, texts=args.text, batch_size=args.batch_size,
        device=args.device, dtype=_dtype(args.dtype), progress=not args.no_progress, runtime=args.runtime,
    )  # fmt: skip


def report_predictions(counts: dict[str, Any], output: Path, strict: bool) -> int:
    """Prints the summary (stderr) and the counts (one JSON line, stdout); returns the exit status: 1 when images were
    skipped and the folder holds no prediction at all (nothing could be done), or with `strict`; else 0."""
    skipped = counts.get("skipped_items", {})
    summary = f"vpd-hf predict: {counts['predicted']} predicted, {counts['already_done']} already done"
    summary += f", {len(skipped)} skipped" + (":" if skipped else "")
    print(summary, file=sys.stderr)
    for item_id, reason in skipped.items():
        print(f"  {item_id}: {reason}", file=sys.stderr)  # also in the manifest, with the input's path
    print(json.dumps({"output": str(output), **counts}))
    if skipped and (strict or counts["predicted"] + counts["already_done"] == 0):
        return 1
    return 0


def _hub_unreachable(repo_id: str) -> str | None:
    """Why the Hub cannot be used now (offline mode, or no answer to one request without retries), else None."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    if huggingface_hub.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=10)
    except HfHubHTTPError:
        pass  # an answer (e.g. the repository does not exist yet): the Hub is there
    except Exception as error:  # the HTTP client's connection errors
        return f"the Hub cannot be reached ({type(error).__name__}: {error})"
    return None


def run_card(args: argparse.Namespace) -> Path:
    if args.push:
        if not args.repo_id:
            raise SystemExit("vpd-hf card: --push needs --repo-id")
        # Checked first: without a network the upload would fail only after the card is built, with a traceback.
        reason = _hub_unreachable(args.repo_id)
        if reason:
            raise ValueError(f"`--push` to {args.repo_id!r}: {reason}. Write the card without --push, and push when "
                             "online.")  # fmt: skip
    from .hub import model_card_from_run, push_to_hub, save_model_card

    card = model_card_from_run(args.folder, repo_id=args.repo_id, eval_file=args.eval_file)
    path = save_model_card(card, args.folder)
    if args.push:
        push_to_hub(args.folder, args.repo_id, card=card, private=args.private or None)
    return path


def train_usage() -> int:
    """`vpd-hf train` without arguments: the usage, not a run of the defaults into outputs/train."""
    from .training.config import build_parser as build_train_parser

    build_train_parser(prog="vpd-hf train").print_usage(sys.stderr)
    print("vpd-hf train: give the run's options, e.g. --recipe nyu_depth --model SD_FOLDER_OR_ID --dataset DATA "
          "--output_dir OUT; `vpd-hf train --help` lists them all.", file=sys.stderr)  # fmt: skip
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        command, rest = argv[0], argv[1:]
        if command == "train":
            if not rest:
                return train_usage()
            from .training.commands import train_main

            train_main(rest, prog="vpd-hf train")
        elif command == "evaluate":
            from .training.commands import evaluate_main

            evaluate_main(rest, prog="vpd-hf evaluate")
        else:
            from .data.synthetic import main as synth_main

            synth_main(rest, prog="vpd-hf synth")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "predict":
            return report_predictions(run_predict(args, parser), args.output, args.strict)
        if args.command == "export":
            from .export import export_model

            info = export_model(args.model, args.output, task=args.task, opset=args.opset, dtype=args.dtype,
                                optimize=args.optimize, openvino_ir=args.openvino_ir)  # fmt: skip
            print(json.dumps(info))
        elif args.command == "card":
            print(run_card(args))
        else:
            from .demo import launch

            launch(args.depth_model, args.segmentation_model, args.referring_model, device=args.device,
                   server_port=args.port, share=args.share)  # fmt: skip
    except (TypeError, ValueError, OSError) as error:
        # Wrong arguments and unusable files are the user's to fix: a message naming them, not a traceback.
        message = str(error)
        if args.command in ("predict", "export"):
            for name, flag in PREDICT_FLAGS.items():
                message = message.replace(name, flag)
        parser.exit(2, f"vpd-hf {args.command}: error: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
