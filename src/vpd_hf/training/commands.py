"""The training and evaluation command lines (`scripts/train.py`, `scripts/evaluate.py`, `vpd-hf train|evaluate`).

Arguments are parsed before torch and the models are imported, so `--help` and a mistyped option answer at once
instead of after seconds of imports."""

from __future__ import annotations

import json
from typing import Any


def train_main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Fine-tunes the model the arguments describe (`vpd_hf.training.train`) and returns its result."""
    from .config import parse_config

    config = parse_config(argv, prog=prog)
    from .trainer import train

    return train(config)


def evaluate_main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Evaluates a checkpoint with its task's protocol; prints the metrics as JSON and returns them."""
    from .config import EVALUATION_OPTIONS, build_parser, config_from_arguments

    parser = build_parser(
        EVALUATION_OPTIONS,
        description="Evaluate a VPD checkpoint with its task's protocol (depth: shifted windows + flip, Eigen crop; "
        "segmentation: sliding windows, optional multi-scale + flip; referring: every expression); distributed "
        "under `accelerate launch`.",
        epilog="Example: accelerate launch scripts/evaluate.py --task depth --model vpd-depth-nyu "
        "--dataset data/nyu --eval_split validation --output_file vpd-depth-nyu/eval_results.json",
        prog=prog,
    )
    parser.add_argument("--output_file", default=None, help="Write the metrics here as JSON.")
    arguments = vars(parser.parse_args(argv))
    output_file = arguments.pop("output_file")
    config = config_from_arguments(arguments)
    from .evaluation import evaluate_checkpoint

    metrics = evaluate_checkpoint(config, output_file)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    return metrics


__all__ = ["evaluate_main", "train_main"]
