"""Sample images from a trained MoL pipeline folder and save them as a grid.

Example:
    python sample.py --model_dir outputs/mnist_mol_cpu --class_labels all --num_images 8 \
        --guidance_scale 2.0 --output outputs/mnist_mol_cpu_grid.png
"""

import argparse
import logging
import math
import os
import sys

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from torchvision.utils import save_image

import mol_diffusion  # noqa: F401  (registers MoLPipeline with diffusers, so from_pretrained finds it)
from mol_diffusion import MoLPipeline

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
GRID_PADDING = 2


class SampleError(Exception):
    """A user error in the arguments or the model folder, reported as one line without a traceback."""


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sample images from a saved MoLPipeline folder.")
    parser.add_argument(
        "--model_dir",
        type=str,
        required=True,
        help="Pipeline folder written by train_unet.py (its --output_dir) or by MoLPipeline.save_pretrained.",
    )
    parser.add_argument(
        "--num_images",
        type=positive_int,
        default=8,
        help="Images per class label with --class_labels (one grid row per label), else the total number of images.",
    )
    parser.add_argument(
        "--class_labels",
        type=str,
        default=None,
        help='"all" for every class of the model, or a comma-separated list such as 0,1,7. '
        "Without it a class-conditional model samples its null (unconditional) class.",
    )
    parser.add_argument(
        "--guidance_scale",
        type=non_negative_float,
        default=1.0,
        help="Classifier-free guidance scale. Guidance is on above 1 and needs --class_labels.",
    )
    parser.add_argument(
        "--scheduler",
        choices=[*SCHEDULERS, "keep"],
        default="ddim",
        help='Sampling scheduler, built from the saved scheduler config. "keep" uses the saved scheduler as is.',
    )
    parser.add_argument("--num_inference_steps", type=positive_int, default=50, help="Denoising steps.")
    parser.add_argument("--seed", type=int, default=0, help="Image i of the run is drawn from seed + i.")
    parser.add_argument(
        "--output", type=str, default="samples.png", help="Path of the grid PNG. Missing parent folders are created."
    )
    parser.add_argument(
        "--save_individual",
        type=str,
        default=None,
        metavar="DIR",
        help="Also save every image as its own PNG in this folder.",
    )
    parser.add_argument("--device", type=str, default="cpu", help='Torch device, e.g. "cpu" or "cuda".')
    parser.add_argument(
        "--batch_size", type=positive_int, default=64, help="Maximum images per pipeline call, to bound memory."
    )

    # ---------------------------------------------------------------------------------------------
    # Route plots: a later `--plot_routes FILE.png` option goes here.
    # ---------------------------------------------------------------------------------------------

    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SampleError(f"--device {name!r} is not a valid torch device ({error}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {name} was requested, but CUDA is not available here. Use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SampleError(f"--device {name} was requested, but MPS is not available here. Use --device cpu.")
    return device


def load_pipeline(model_dir: str) -> MoLPipeline:
    # Check the folder first: from_pretrained would take a missing local path for a Hub repository id.
    if not os.path.isdir(model_dir):
        raise SampleError(f"--model_dir {model_dir} does not exist or is not a folder.")
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        raise SampleError(
            f"--model_dir {model_dir} has no model_index.json. Pass a pipeline folder (model_index.json, "
            "transformer/, scheduler/), as written by train_unet.py in its --output_dir or by "
            "MoLPipeline.save_pretrained."
        )

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    if not isinstance(pipe, MoLPipeline):
        raise SampleError(
            f"--model_dir {model_dir} contains a {type(pipe).__name__}, but sample.py needs a MoLPipeline folder."
        )
    return pipe


def build_scheduler(name: str, pipe: MoLPipeline):
    if name == "keep":
        return pipe.scheduler
    scheduler_class = SCHEDULERS[name]
    if scheduler_class is DPMSolverMultistepScheduler:
        # A learned-variance config (variance_type="learned_range") would make DPM-Solver keep the first
        # 3 output channels (diffusers 0.42.1), which breaks other channel counts. The pipeline already
        # passes it the noise prediction only.
        return scheduler_class.from_config(pipe.scheduler.config, variance_type=None)
    return scheduler_class.from_config(pipe.scheduler.config)


def parse_class_labels(value, num_classes, model_dir: str):
    """Turn the --class_labels string into a list of ints checked against the model, or None."""
    if value is None:
        return None
    if num_classes is None:
        raise SampleError(
            f"--class_labels {value} was given, but the model in {model_dir} is unconditional "
            "(num_classes is None). Remove --class_labels."
        )
    if value.strip() == "all":
        return list(range(num_classes))

    try:
        labels = [int(item) for item in value.split(",") if item.strip()]
    except ValueError:
        message = f'--class_labels {value!r} must be "all" or comma-separated integers such as 0,1,7.'
        raise SampleError(message) from None
    if not labels:
        raise SampleError(f'--class_labels {value!r} contains no labels. Use "all" or a list such as 0,1,7.')
    invalid = sorted({label for label in labels if not 0 <= label < num_classes})
    if invalid:
        raise SampleError(
            f"--class_labels {value} contains {invalid}, outside the model's classes 0..{num_classes - 1}."
        )
    return labels


def generate(pipe: MoLPipeline, args, labels, device: torch.device) -> torch.Tensor:
    """Sample every requested image in calls of at most --batch_size, as one (N, C, H, W) tensor in [0, 1]."""
    if labels is None:
        image_labels = [None] * args.num_images
    else:
        image_labels = [label for label in labels for _ in range(args.num_images)]  # row-major: one row per label

    # One generator per image, so image i is the same whatever --batch_size is.
    generators = [torch.Generator(device=device).manual_seed(args.seed + i) for i in range(len(image_labels))]

    num_batches = math.ceil(len(image_labels) / args.batch_size)
    logger.info("Sampling %d images in %d pipeline calls.", len(image_labels), num_batches)
    batches = []
    for start in range(0, len(image_labels), args.batch_size):
        batch_labels = image_labels[start : start + args.batch_size]
        output = pipe(
            batch_size=None if labels is not None else len(batch_labels),
            class_labels=batch_labels if labels is not None else None,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            generator=generators[start : start + args.batch_size],
            output_type="pt",
        )
        batches.append(output.images.cpu())
    return torch.cat(batches)


def main(args):
    # 1. Setup
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    device = resolve_device(args.device)

    # 2. Pipeline and scheduler
    pipe = load_pipeline(args.model_dir)
    pipe.scheduler = build_scheduler(args.scheduler, pipe)
    pipe = pipe.to(device)
    labels = parse_class_labels(args.class_labels, pipe.transformer.config.num_classes, args.model_dir)
    if args.guidance_scale > 1 and labels is None:
        logger.warning("--guidance_scale %s has no effect without --class_labels.", args.guidance_scale)

    # 3. Sampling
    images = generate(pipe, args, labels, device)  # (N, C, H, W) in [0, 1]

    # 4. Grid: one row per label, or a near-square grid without labels
    columns = args.num_images if labels is not None else math.ceil(math.sqrt(len(images)))
    output_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(output_dir, exist_ok=True)
    save_image(images, args.output, nrow=columns, padding=GRID_PADDING)
    logger.info("Wrote a %d-image grid to %s", len(images), args.output)

    # 5. Individual images
    if args.save_individual is not None:
        os.makedirs(args.save_individual, exist_ok=True)
        for index, image in enumerate(images):
            suffix = f"_label{labels[index // args.num_images]}" if labels is not None else ""
            save_image(image, os.path.join(args.save_individual, f"{index:05d}{suffix}.png"))
        logger.info("Wrote %d images to %s", len(images), args.save_individual)

    # ---------------------------------------------------------------------------------------------
    # 6. Route plots: `--plot_routes FILE.png` goes here. It will call the pipeline with
    #    return_routes=True in generate() and plot the collected RouteTrace list.
    # ---------------------------------------------------------------------------------------------


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except SampleError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
