"""Evaluate a saved pipeline folder: Frechet distance, real-data floor and class accuracy.

Example:
    python -m mol_diffusion.evaluation --model_dir outputs/mnist_mol_cpu --num_samples 1000 \
        --guidance_scale 2.0 --scheduler ddim --output outputs/mnist_mol_cpu_eval.json
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import DiffusionPipeline

import mol_diffusion  # noqa: F401  (registers MoLPipeline with diffusers, so from_pretrained finds it)

from .classifier import DEFAULT_DATASET, get_digit_classifier
from .evaluator import SCHEDULERS, evaluate_pipeline, pipeline_num_classes
from .inception import load_inception_feature_extractor

logger = logging.getLogger(__name__)

# Rows of the printed table, in order. The other result keys go to the JSON file only.
TABLE_ROWS = (
    "frechet_distance",
    "real_floor",
    "class_accuracy",
    "real_class_accuracy",
    "classifier_test_accuracy",
    "num_samples",
    "num_reference_images",
    "reference_resolution",
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "sampling_seconds",
    "seconds_per_image",
)


class EvaluationError(Exception):
    """A user error in the arguments or the model folder, reported as one line without a traceback."""


def integer_at_least(minimum: int):
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return number

    return parse


def non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mol_diffusion.evaluation",
        description=(
            "Sample from a saved pipeline folder and report the Frechet distance of the samples to the "
            "held-out split, the same distance for real training images (the floor), and the share of "
            "samples that the digit classifier assigns to the requested class."
        ),
    )

    parser.add_argument(
        "--model_dir", required=True, help="Pipeline folder with model_index.json, as written by train_unet.py."
    )
    parser.add_argument(
        "--num_samples", type=integer_at_least(2), default=1000, help="Images to sample (default: 1000)."
    )
    parser.add_argument(
        "--guidance_scale",
        type=non_negative_float,
        default=1.0,
        help="Classifier-free guidance scale (default: 1.0, no guidance).",
    )
    parser.add_argument(
        "--num_inference_steps", type=integer_at_least(1), default=50, help="Denoising steps (default: 50)."
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="Sample with this scheduler, built from the saved scheduler config (default: the saved scheduler).",
    )

    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise and of the real floor sample.")
    parser.add_argument(
        "--batch_size", type=integer_at_least(1), default=100, help="Images per pipeline call (default: 100)."
    )

    parser.add_argument(
        "--metric",
        choices=("digits", "inception"),
        default="digits",
        help="Features of the Frechet distance: the digit classifier (default) or Inception v3 (FID).",
    )
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="State dict of torchvision's inception_v3 (.safetensors or .pth) for --metric inception.",
    )

    parser.add_argument("--output", default=None, help="JSON file for all results. Parent folders are created.")
    parser.add_argument(
        "--unconditional",
        action="store_true",
        help="Sample a class-conditional model without labels (null class), so no class accuracy.",
    )
    parser.add_argument(
        "--dataset_name", default=DEFAULT_DATASET, help=f"Reference dataset (default: {DEFAULT_DATASET})."
    )
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="Cache folder of the digit classifier (default: $MOL_DIFFUSION_CACHE or ~/.cache/mol_diffusion).",
    )
    parser.add_argument(
        "--native_resolution_reference",
        action="store_true",
        help="Compare with the reference images at the dataset's resolution. By default they are resized to "
             "the sample resolution first, as the training data was.",
    )
    parser.add_argument("--device", default="cpu", help="Device for sampling and features (default: cpu).")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        results = run(args)
    except (EvaluationError, ValueError, FileNotFoundError) as error:
        logger.debug("Evaluation failed.", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 1

    print(format_table(results))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("Wrote %s.", output)
    return 0


def run(args: argparse.Namespace) -> dict:
    # 1. Arguments that need no loading.
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise EvaluationError(f"--model_dir {model_dir} does not exist. Pass the --output_dir of train_unet.py.")
    if not (model_dir / "model_index.json").is_file():
        raise EvaluationError(
            f"--model_dir {model_dir} has no model_index.json. Pass a pipeline folder (model_index.json, "
            "transformer/, scheduler/), as written by train_unet.py or MoLPipeline.save_pretrained."
        )
    if args.inception_weights is not None and args.metric != "inception":
        raise EvaluationError("--inception_weights is only used with --metric inception. Add --metric inception.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"--device {args.device} was requested, but CUDA is not available. Pass --device cpu.")

    # 2. Feature extractors, before sampling so that missing weights fail fast.
    feature_extractor = None
    if args.metric == "inception":
        feature_extractor = load_inception_feature_extractor(args.inception_weights, device=args.device)
    classifier = get_digit_classifier(cache_dir=args.cache_dir, dataset_name=args.dataset_name, device=args.device)

    # 3. Pipeline, sampling and scores.
    pipeline = DiffusionPipeline.from_pretrained(str(model_dir)).to(args.device)
    class_conditional = pipeline_num_classes(pipeline) is not None and not args.unconditional
    if not class_conditional and args.guidance_scale != 1.0:
        raise EvaluationError(
            f"--guidance_scale {args.guidance_scale} needs class-conditional sampling, but the model is "
            "unconditional or --unconditional was given. Pass --guidance_scale 1.0."
        )
    results = evaluate_pipeline(
        pipeline,
        num_samples=args.num_samples,
        class_conditional=class_conditional,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        scheduler=args.scheduler,
        seed=args.seed,
        batch_size=args.batch_size,
        feature_extractor=feature_extractor,
        classifier=classifier,
        dataset_name=args.dataset_name,
        match_resolution=not args.native_resolution_reference,
    )
    results["model_dir"] = str(model_dir)
    return results


def format_table(results: dict) -> str:
    """Format the main results as a two-column text table."""
    name = "frechet_distance" if results["metric"] == "digit_classifier" else "fid"
    rows = [("metric", f"{name} ({results['metric']}, {results['feature_dim']}-d features)")]
    for key in TABLE_ROWS:
        value = results.get(key)
        if value is None:
            value = "n/a"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        rows.append((key, str(value)))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


if __name__ == "__main__":
    sys.exit(main())
