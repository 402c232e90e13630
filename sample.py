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
from diffusers import DiffusionPipeline
from torchvision.utils import save_image

import mol_diffusion  # noqa: F401  (registers MoLPipeline with diffusers, so from_pretrained finds it)
from mol_diffusion import MoLPipeline, MoLTransformer2DModel
from mol_diffusion.pipelines.pipeline_mol import denoiser_num_classes
from mol_diffusion.pipelines.schedulers import SCHEDULERS, scheduler_from_name
from mol_diffusion.visualization import concatenate_traces, plot_routes

logger = logging.getLogger(__name__)

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

    parser.add_argument(
        "--plot_routes",
        type=str,
        default=None,
        metavar="FILE.png",
        help="Also write route plots of the sampled images to this PNG: block choice per routing step and "
        "timestep, block usage, router entropy and, for token routing, the block of each patch.",
    )

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
        message = (
            f"--model_dir {model_dir} has no model_index.json. Pass a pipeline folder (model_index.json, "
            "transformer/, scheduler/), as written by train_unet.py in its --output_dir or by "
            "MoLPipeline.save_pretrained."
        )
        if os.path.basename(os.path.normpath(model_dir)).startswith("checkpoint-"):
            message += (
                " This looks like a training checkpoint, which only --resume_from_checkpoint reads; "
                "pass the training --output_dir that contains it."
            )
        raise SampleError(message)

    # use_safetensors=True: weights load from safetensors only, never from pickled .bin files.
    try:
        pipe = DiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    except (OSError, ValueError) as error:  # missing or truncated files, invalid configs
        message = " ".join(str(error).split())
        raise SampleError(f"--model_dir {model_dir} could not be loaded: {message}") from None
    if not isinstance(pipe, MoLPipeline):
        raise SampleError(
            f"--model_dir {model_dir} contains a {type(pipe).__name__}, but sample.py needs a MoLPipeline folder."
        )
    return pipe


def build_scheduler(name: str, pipe: MoLPipeline):
    if name == "keep":
        return pipe.scheduler
    return scheduler_from_name(name, pipe.scheduler.config)


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

    items = [item.strip() for item in value.split(",")]
    if not any(items):
        raise SampleError(f'--class_labels {value!r} contains no labels. Use "all" or a list such as 0,1,7.')
    if not all(items):
        raise SampleError(f"--class_labels {value!r} has an empty item between commas; remove the extra comma.")
    try:
        labels = [int(item) for item in items]
    except ValueError:
        message = f'--class_labels {value!r} must be "all" or comma-separated integers such as 0,1,7.'
        raise SampleError(message) from None
    invalid = sorted({label for label in labels if not 0 <= label < num_classes})
    if invalid:
        raise SampleError(
            f"--class_labels {value} contains {invalid}, outside the model's classes 0..{num_classes - 1}."
        )
    return labels


def generate(pipe: MoLPipeline, args, labels, device: torch.device, route_traces=None) -> torch.Tensor:
    """Sample every requested image in calls of at most --batch_size, as one (N, C, H, W) tensor in [0, 1].

    When `route_traces` is a list, one `RouteTrace` per denoising step, covering all N images, is appended to it.
    """
    if labels is None:
        image_labels = [None] * args.num_images
    else:
        image_labels = [label for label in labels for _ in range(args.num_images)]  # row-major: one row per label

    # One generator per image, so image i is the same whatever --batch_size is.
    generators = [torch.Generator(device=device).manual_seed(args.seed + i) for i in range(len(image_labels))]

    num_batches = math.ceil(len(image_labels) / args.batch_size)
    logger.info("Sampling %d images in %d pipeline calls.", len(image_labels), num_batches)
    batches = []
    routes_per_call = []
    for start in range(0, len(image_labels), args.batch_size):
        batch_labels = image_labels[start : start + args.batch_size]
        output = pipe(
            batch_size=None if labels is not None else len(batch_labels),
            class_labels=batch_labels if labels is not None else None,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            generator=generators[start : start + args.batch_size],
            output_type="pt",
            return_routes=route_traces is not None,
        )
        batches.append(output.images.cpu())
        routes_per_call.append(output.routes)
    if route_traces is not None:
        # Every call runs the same denoising steps, so the traces of step i join along the batch.
        route_traces.extend(concatenate_traces(step_traces) for step_traces in zip(*routes_per_call))
    return torch.cat(batches)


def main(args):
    # 1. Setup
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    device = resolve_device(args.device)

    # 2. Pipeline and scheduler
    pipe = load_pipeline(args.model_dir)
    pipe.scheduler = build_scheduler(args.scheduler, pipe)
    pipe = pipe.to(device)
    if args.plot_routes and not isinstance(pipe.transformer, MoLTransformer2DModel):
        raise SampleError(
            f"--plot_routes needs a MoL model, but the transformer in {args.model_dir} is a "
            f"{type(pipe.transformer).__name__}, which has no router. Remove --plot_routes."
        )
    labels = parse_class_labels(args.class_labels, denoiser_num_classes(pipe.transformer), args.model_dir)
    if args.guidance_scale > 1 and labels is None:
        logger.warning("--guidance_scale %s has no effect without --class_labels.", args.guidance_scale)

    # 3. Sampling
    route_traces = [] if args.plot_routes else None
    images = generate(pipe, args, labels, device, route_traces)  # (N, C, H, W) in [0, 1]

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

    # 6. Route plots
    if args.plot_routes:
        plot_routes(route_traces, args.plot_routes, images=images, title=f"Routes of {len(images)} samples")


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except SampleError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
