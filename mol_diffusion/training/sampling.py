"""Sample grids written during training, one row per class."""

import logging
import os
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image

from ..pipelines import MoLPipeline
from ..pipelines.pipeline_mol import denoiser_num_classes

logger = logging.getLogger(__name__)

# Grid rows for class-conditional models; a dataset with more classes shows the first ones.
MAX_GRID_CLASSES = 16


def sampling_scheduler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    """Return a DDIM scheduler with the training noise schedule (learned variance is not used by DDIM)."""
    config = {key: value for key, value in noise_scheduler.config.items() if key != "variance_type"}
    return DDIMScheduler.from_config(config)


@torch.no_grad()
def save_sample_grid(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    path: str,
    images_per_row: int,
    num_inference_steps: int,
    guidance_scale: float,
    ema_model: Optional[EMAModel] = None,
    seed: int = 0,
    vae: Optional[AutoencoderKL] = None,
) -> str:
    """Sample a grid with `MoLPipeline` and DDIM and save it as a PNG.

    A class-conditional model gets one row per class (the first `MAX_GRID_CLASSES` classes); an
    unconditional model gets one row. The seed is fixed, so grids of successive steps start from the
    same noise and show how the samples evolve. With `ema_model`, the EMA weights are swapped in for
    sampling and the training weights restored afterwards.

    Args:
        model (`torch.nn.Module`): The unwrapped MoL model.
        noise_scheduler ([`DDPMScheduler`]): Training scheduler; its schedule configures DDIM.
        path (`str`): Output PNG path; parent folders are created.
        images_per_row (`int`): Images per row.
        num_inference_steps (`int`): DDIM steps.
        guidance_scale (`float`): Classifier-free guidance scale; 1.0 means none.
        ema_model ([`EMAModel`], *optional*): EMA weights to sample with.
        seed (`int`): Seed of the initial noise.
        vae ([`AutoencoderKL`], *optional*): Decoder for a latent-space model; the grid then shows
            decoded images.

    Returns:
        `str`: The path written.
    """
    num_classes = denoiser_num_classes(model)
    if num_classes is not None:
        num_rows = min(num_classes, MAX_GRID_CLASSES)
        if num_rows < num_classes:
            logger.info("Sample grid shows the first %d of %d classes.", num_rows, num_classes)
        request = {"class_labels": [label for label in range(num_rows) for _ in range(images_per_row)]}
    else:
        request = {"batch_size": images_per_row}

    was_training = model.training
    model.eval()
    if ema_model is not None:
        ema_model.store(model.parameters())
        ema_model.copy_to(model.parameters())
    try:
        pipeline = MoLPipeline(transformer=model, scheduler=sampling_scheduler(noise_scheduler), vae=vae)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = pipeline(
            **request,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="pt",
        ).images  # (rows * images_per_row, C, H, W) in [0, 1]
    finally:
        if ema_model is not None:
            ema_model.restore(model.parameters())
        model.train(was_training)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(images, path, nrow=images_per_row)
    return path
