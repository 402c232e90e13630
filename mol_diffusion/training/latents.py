"""Latent-space training: load a frozen VAE, encode training images, optionally cache the encodings.

The denoiser then works on VAE latents, as in Stable Diffusion and DiT. A latent is
`(z - shift_factor) * scaling_factor`, where z is a sample (or the mean) of the VAE's posterior
`latent_dist`. `MoLPipeline` inverts both factors before it decodes, so a pipeline saved with
the VAE returns images.
"""

import logging
from typing import Optional

import torch
from diffusers import AutoencoderKL, ModelMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from .errors import ConfigError

logger = logging.getLogger(__name__)

LATENT_SAMPLING_CHOICES = ("sample", "mode")

# Key of the cached posterior parameters in a batch: mean and log-variance concatenated along
# the channel axis, (B, 2 * C_latent, h, w), as `DiagonalGaussianDistribution` expects.
LATENT_PARAMETERS_KEY = "latent_parameters"


def load_vae(name_or_path: str, device: Optional[torch.device] = None, cache_dir: Optional[str] = None) -> AutoencoderKL:
    """Load an [`AutoencoderKL`], frozen and in eval mode.

    Args:
        name_or_path (`str`): A folder written by `AutoencoderKL.save_pretrained`, or a hub model id
            such as `stabilityai/sd-vae-ft-ema`, which needs network access or a filled hub cache.
        device (`torch.device`, *optional*): Device to move the VAE to.
        cache_dir (`str`, *optional*): Hub cache folder.

    Returns:
        [`AutoencoderKL`]: The VAE in float32, with `requires_grad` off for all its parameters.

    Raises:
        ConfigError: The VAE cannot be loaded.
    """
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--vae {name_or_path!r}: failed to load an AutoencoderKL ({error}). Pass a folder that contains "
            "config.json and the VAE weights, or a hub model id when the hub is reachable."
        ) from error
    if vae.config.in_channels not in (1, 3):
        raise ConfigError(
            f"--vae {name_or_path!r} encodes {vae.config.in_channels}-channel images, but training images are "
            "grayscale (1 channel) or RGB (3 channels); use a VAE for one of these."
        )
    vae.requires_grad_(False)
    vae.eval()
    if device is not None:
        vae.to(device)
    return vae


def vae_downscale_factor(vae: AutoencoderKL) -> int:
    """Return how many image pixels one latent pixel spans along each side: 2 per down block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_geometry(vae: AutoencoderKL, resolution: int) -> tuple[int, int]:
    """Return the `(channels, size)` of the latents of `resolution x resolution` images.

    Raises:
        ConfigError: `resolution` is not a multiple of the VAE's downscale factor.
    """
    factor = vae_downscale_factor(vae)
    if resolution % factor != 0:
        raise ConfigError(
            f"--resolution {resolution} is not a multiple of the VAE's downscale factor {factor}; "
            f"use a resolution such as {max(factor, resolution // factor * factor)}."
        )
    return vae.config.latent_channels, resolution // factor


def check_model_matches_latents(model: ModelMixin, latent_channels: int, latent_size: int) -> None:
    """Raise `ConfigError` when the model's `in_channels` or `sample_size` differ from the latents'."""
    config = model.config
    if config.in_channels != latent_channels or config.sample_size != latent_size:
        raise ConfigError(
            f"the model takes in_channels={config.in_channels} and sample_size={config.sample_size}, but the "
            f"VAE gives latents with {latent_channels} channels and size {latent_size}; remove in_channels "
            "and sample_size from the `model:` config so they default to the latent shape."
        )


class LatentEncoder:
    """Turns training batches of images into scaled VAE latents.

    Args:
        vae ([`AutoencoderKL`]): The frozen VAE; its `scaling_factor` and `shift_factor` scale the latents.
        sampling (`str`, *optional*, defaults to `"sample"`): `"sample"` draws z from the posterior,
            as diffusers' latent training examples do. `"mode"` takes its mean, so the training
            targets carry no encoder noise.
        batch_size (`int`, *optional*, defaults to 64): Images per VAE call when caching a dataset.
    """

    def __init__(self, vae: AutoencoderKL, sampling: str = "sample", batch_size: int = 64):
        if sampling not in LATENT_SAMPLING_CHOICES:
            raise ValueError(f"sampling must be one of {LATENT_SAMPLING_CHOICES}, got {sampling!r}.")
        self.vae = vae
        self.sampling = sampling
        self.batch_size = batch_size
        shift_factor = getattr(vae.config, "shift_factor", None)
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = 0.0 if shift_factor is None else shift_factor

    @torch.no_grad()
    def posterior_parameters(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images `(B, C, H, W)` in [-1, 1] to posterior parameters `(B, 2 * C_latent, h, w)`."""
        pixel_values = pixel_values.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.encode(pixel_values).latent_dist.parameters

    def latents_from_parameters(self, parameters: torch.Tensor) -> torch.Tensor:
        """Draw (or take the mean of) z from posterior parameters and scale it: `(B, C_latent, h, w)`."""
        posterior = DiagonalGaussianDistribution(parameters.float())
        z = posterior.sample() if self.sampling == "sample" else posterior.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def encode_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return a copy of a training batch whose `pixel_values` are latents.

        Args:
            batch (`dict`): Either `"pixel_values"` images `(B, C, H, W)` in [-1, 1], or the
                `"latent_parameters"` of a [`CachedLatentDataset`]; `"class_labels"` passes through.

        Returns:
            `dict`: `"pixel_values"` latents `(B, C_latent, h, w)` in float32 on the VAE's device,
            plus the batch's other entries.
        """
        batch = dict(batch)
        parameters = batch.pop(LATENT_PARAMETERS_KEY, None)
        if parameters is None:
            parameters = self.posterior_parameters(batch["pixel_values"])
        batch["pixel_values"] = self.latents_from_parameters(parameters.to(self.vae.device))
        return batch

    def cache(self, dataset: torch.utils.data.Dataset, show_progress: bool = True) -> "CachedLatentDataset":
        """Encode every item of a training dataset once.

        The posterior parameters are stored, not a latent sample, so `sampling="sample"` still draws
        fresh encoder noise for every batch. Crops and flips are drawn once, when the item is encoded.

        Args:
            dataset (`torch.utils.data.Dataset`): Items with `"pixel_values"` and optional `"class_labels"`.
            show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

        Returns:
            [`CachedLatentDataset`]: The encodings on the CPU, in dataset order.
        """
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
        parameters, labels = [], []
        for batch in tqdm(loader, desc="Encoding latents", unit="batch", disable=not show_progress):
            parameters.append(self.posterior_parameters(batch["pixel_values"]).float().cpu())
            if "class_labels" in batch:
                labels.append(batch["class_labels"])
        parameters = torch.cat(parameters)  # (N, 2 * C_latent, h, w)
        labels = torch.cat(labels) if labels else None  # (N,)

        latents = self.latents_from_parameters(parameters[: self.batch_size])
        logger.info(
            "Cached the VAE posteriors of %d images (%.1f MiB); scaled latents of the first batch have "
            "standard deviation %.3f (a scaling_factor suited to this VAE gives about 1).",
            len(parameters), parameters.numel() * 4 / 2**20, latents.std().item(),
        )
        return CachedLatentDataset(parameters, labels)


class CachedLatentDataset(torch.utils.data.Dataset):
    """VAE posterior parameters of a whole training set, with its class labels.

    Args:
        parameters (`torch.Tensor` of shape `(N, 2 * C_latent, h, w)`): Posterior mean and log-variance.
        class_labels (`torch.LongTensor` of shape `(N,)`, *optional*): Class of each item.

    Items are `{"latent_parameters": (2 * C_latent, h, w), "class_labels": 0-d long}`, without
    `"class_labels"` when there are no labels; [`LatentEncoder.encode_batch`] turns a batch of them
    into latents.
    """

    def __init__(self, parameters: torch.Tensor, class_labels: Optional[torch.LongTensor] = None):
        if class_labels is not None and len(class_labels) != len(parameters):
            raise ValueError(
                f"class_labels has {len(class_labels)} entries but parameters has {len(parameters)}; "
                "pass one label per item."
            )
        self.parameters = parameters
        self.class_labels = class_labels

    def __len__(self) -> int:
        return len(self.parameters)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {LATENT_PARAMETERS_KEY: self.parameters[index]}
        if self.class_labels is not None:
            item["class_labels"] = self.class_labels[index]
        return item
