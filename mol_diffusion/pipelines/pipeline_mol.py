"""MoLPipeline: sampling from a MoLTransformer2DModel with any diffusers scheduler."""

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import DDPMParallelScheduler, SchedulerMixin
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..models import MoLTransformer2DModel, RouteTrace

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Schedulers whose `step` samples with a predicted variance when it is concatenated to the model
# output. The DPM-Solver family also accepts `variance_type="learned_range"`, but its `step` only
# cuts the variance off again, keeping the first 3 channels (diffusers 0.42.1), which is wrong for
# any other channel count. The pipeline therefore drops the variance channels for every other
# scheduler, and for predictions of more than 3 channels (such as 4-channel latents), which that
# cut would shorten, it steps a copy of the scheduler without `variance_type`.
LEARNED_VARIANCE_SCHEDULERS = (DDPMScheduler, DDPMParallelScheduler)
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def denoiser_num_classes(model: torch.nn.Module) -> Optional[int]:
    """Return the number of real classes a denoiser is conditioned on, or `None` for an unconditional model.

    Each model class stores the count under its own config name, and in all three the null class of
    classifier-free guidance is the label right after the real classes:

    - [`MoLTransformer2DModel`]: `num_classes`.
    - diffusers' [`DiTTransformer2DModel`]: `num_embeds_ada_norm`. Its label table has one more row,
      the null class, because every DiT block builds its label embedding with a dropout probability
      above 0 (diffusers 0.42.1).
    - diffusers' [`UNet2DModel`]: `num_class_embeds - 1`, as the training script reserves the last
      row of the class embedding for the null class.

    Args:
        model (`torch.nn.Module`): One of the three denoisers above.

    Returns:
        `int` or `None`: The number of real classes.
    """
    config = model.config
    if isinstance(model, DiTTransformer2DModel):
        return config.num_embeds_ada_norm
    if isinstance(model, UNet2DModel):
        return None if config.num_class_embeds is None else config.num_class_embeds - 1
    return getattr(config, "num_classes", None)


def denoiser_null_class_label(model: torch.nn.Module) -> Optional[int]:
    """Return the label of the null (unconditional) class, `denoiser_num_classes(model)`; `None` if unconditional."""
    return denoiser_num_classes(model)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import mol_diffusion  # registers MoLPipeline with diffusers
        >>> from diffusers import DDIMScheduler, DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("outputs/mnist_mol_cpu")
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

        >>> # One image of each digit 0..9, with classifier-free guidance.
        >>> generator = torch.Generator().manual_seed(0)
        >>> output = pipe(
        ...     class_labels=list(range(10)),
        ...     guidance_scale=2.0,
        ...     num_inference_steps=50,
        ...     generator=generator,
        ...     return_routes=True,
        ... )
        >>> output.images[0].save("digit0.png")
        >>> first_step = output.routes[0]  # RouteTrace of the first denoising step
        >>> first_step.indices.shape  # (S, B) for sample routing: block chosen per routing step and image
        >>> first_step.block_counts()  # (K,): decisions that took each pool block
        ```
"""


@dataclass
class MoLPipelineOutput(BaseOutput):
    """Output of [`MoLPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            Generated images, in the form `output_type` selects. `"pil"` gives a list of B PIL images,
            `"np"` a (B, H, W, C) float array in [0, 1] and `"pt"` a (B, C, H, W) tensor in [0, 1].
            `"latent"` gives the final (B, C_latent, h, w) latents.
        routes (`list[RouteTrace]` or `None`):
            One route trace per denoising step, in sampling order, when `return_routes=True`, and
            `None` otherwise. Each trace covers the B requested samples only (the conditional half
            under classifier-free guidance), and its `timesteps` field holds the scheduler timestep of
            that denoising step for every sample.
    """

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]
    routes: Optional[list[RouteTrace]] = None


class MoLPipeline(DiffusionPipeline):
    r"""
    Pipeline for unconditional or class-conditional image generation with a Mixture-of-Layers
    transformer, in pixel space or, with a VAE, in latent space.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic
    methods (saving, loading, moving to a device, progress bar settings).

    Args:
        transformer ([`MoLTransformer2DModel`], [`DiTTransformer2DModel`] or [`UNet2DModel`]):
            The denoiser. Its `sample_size` and `in_channels` set the shape of the sampled latents, and
            `out_channels == 2 * in_channels` means it also predicts the variance. The diffusers models
            serve as dense baselines; see `denoiser_num_classes` for how each stores its classes.
        scheduler ([`SchedulerMixin`]):
            Any diffusers noise scheduler, for example [`DDPMScheduler`], [`DDIMScheduler`],
            [`DPMSolverMultistepScheduler`] or [`EulerDiscreteScheduler`].
        vae ([`AutoencoderKL`], *optional*):
            Decoder from latents to images. Without a VAE the transformer works in pixel space and its
            output is the image.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: Union[MoLTransformer2DModel, DiTTransformer2DModel, UNet2DModel],
        scheduler: SchedulerMixin,
        vae: Optional[AutoencoderKL] = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

        # The image processor only post-processes here, so the scale factor is informational.
        if vae is not None:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        else:
            vae_scale_factor = 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: Optional[int] = None,
        class_labels: Optional[Union[int, list[int], torch.LongTensor]] = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_routes: bool = False,
    ) -> Union[MoLPipelineOutput, tuple]:
        r"""
        Generate images by denoising Gaussian noise with the transformer and the scheduler.

        Args:
            batch_size (`int`, *optional*):
                Number of images B. Defaults to `len(class_labels)` when labels are given, else 1.
            class_labels (`int`, `list[int]` or `torch.LongTensor`, *optional*):
                Class of each image, in `[0, transformer.config.num_classes)`; B = number of labels.
                Without labels a class-conditional model samples the null (unconditional) class.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance scale g >= 0. Guidance is on when labels are given and g > 1:
                the prediction is `uncond + g * (cond - uncond)`, computed from one batched forward
                pass over the conditional and null-class inputs.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Number of denoising steps.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Random generator(s) for the initial noise and for stochastic schedulers, for
                reproducible sampling.
            output_type (`str`, *optional*, defaults to `"pil"`):
                One of `"pil"`, `"np"`, `"pt"` or `"latent"`. `"pil"` returns a list of PIL images, with
                mode `"L"` for one channel. `"np"` returns a (B, H, W, C) float array in [0, 1] and
                `"pt"` a (B, C, H, W) tensor in [0, 1]. `"latent"` returns the final latents, not decoded.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`MoLPipelineOutput`] instead of a tuple.
            return_routes (`bool`, *optional*, defaults to `False`):
                Also return the route trace of every denoising step.

        Examples:

        Returns:
            [`MoLPipelineOutput`] or `tuple`: the output dataclass if `return_dict` is `True`, else
            `(images,)`, or `(images, routes)` when `return_routes` is `True`.
        """
        # 1. Check inputs
        labels = self._prepare_class_labels(class_labels, batch_size)
        if labels is not None:
            batch_size = labels.shape[0]
        elif batch_size is None:
            batch_size = 1
        self._check_inputs(batch_size, guidance_scale, num_inference_steps, output_type, return_routes)

        device = self._execution_device
        config = self.transformer.config
        latent_channels = config.in_channels
        do_guidance = labels is not None and guidance_scale > 1.0
        if guidance_scale > 1.0 and labels is None:
            logger.warning(
                "guidance_scale=%s has no effect without class_labels, so sampling runs without guidance.",
                guidance_scale,
            )

        # 2. Class labels for the transformer: (B,), or (2B,) as [conditional, null] under guidance
        if denoiser_num_classes(self.transformer) is None:
            model_labels = None
        else:
            null_label = denoiser_null_class_label(self.transformer)
            null_labels = torch.full((batch_size,), null_label, dtype=torch.long)
            if labels is None:
                model_labels = null_labels
            elif do_guidance:
                model_labels = torch.cat([labels, null_labels])
            else:
                model_labels = labels
            model_labels = model_labels.to(device)

        # 3. Initial noise, (B, C_latent, H, W)
        scheduler = self._scheduler_for_sampling(latent_channels)
        latents = randn_tensor(
            (batch_size, latent_channels, config.sample_size, config.sample_size),
            generator=generator,
            device=device,
            dtype=self.transformer.dtype,
        )
        latents = latents * scheduler.init_noise_sigma

        # 4. Denoising loop
        scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = self._scheduler_step_kwargs(generator)
        keep_variance = self._scheduler_uses_learned_variance()
        routes = [] if return_routes else None

        for t in self.progress_bar(scheduler.timesteps):
            model_input = scheduler.scale_model_input(latents, t)
            if do_guidance:
                model_input = torch.cat([model_input, model_input])  # (2B, C, H, W)
            timesteps = t.to(device).expand(model_input.shape[0])

            # Only MoL models take `return_routes`; DiT and UNet2DModel take `class_labels` as well.
            route_kwargs = {"return_routes": True} if return_routes else {}
            output = self.transformer(model_input, timestep=timesteps, class_labels=model_labels, **route_kwargs)
            prediction = output.sample  # (B or 2B, C_out, H, W)

            if do_guidance:
                prediction = self._apply_guidance(prediction, latent_channels, guidance_scale)
            if not keep_variance:
                prediction = prediction[:, :latent_channels]

            latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample

            if return_routes:
                routes.append(self._trace_for_requested_samples(output.routes, batch_size, t))

        # 5. Decode and post-process
        if output_type == "latent":
            images = latents
        else:
            images = self._decode(latents)
            images = self.image_processor.postprocess(images, output_type=output_type)

        self.maybe_free_model_hooks()

        result = MoLPipelineOutput(images=images, routes=routes)
        if not return_dict:
            return result.to_tuple()
        return result

    def _prepare_class_labels(
        self, class_labels: Optional[Union[int, list[int], torch.Tensor]], batch_size: Optional[int]
    ) -> Optional[torch.LongTensor]:
        """Validate the requested labels and return them as a (B,) long tensor on the CPU, or None."""
        if class_labels is None:
            return None

        num_classes = denoiser_num_classes(self.transformer)
        if num_classes is None:
            raise ValueError(
                f"class_labels={class_labels!r} was given, but the transformer is unconditional "
                "(config.num_classes is None). Call the pipeline without class_labels, or load a "
                "class-conditional model."
            )

        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
                raise ValueError(
                    f"class_labels must be an integer tensor, got dtype {class_labels.dtype}. "
                    "Convert it with class_labels.long()."
                )
            labels = class_labels.detach().to("cpu", torch.long).reshape(-1)
        else:
            values = [class_labels] if isinstance(class_labels, (int, np.integer)) else list(class_labels)
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                raise ValueError(
                    f"class_labels must be an int, a list of ints or an integer tensor, got {class_labels!r}."
                )
            labels = torch.tensor(values, dtype=torch.long)

        if labels.numel() == 0:
            raise ValueError("class_labels is empty. Pass at least one label, or None for unconditional samples.")
        invalid = labels[(labels < 0) | (labels >= num_classes)]
        if invalid.numel() > 0:
            raise ValueError(
                f"class_labels contains {sorted(set(invalid.tolist()))}, outside the model's classes "
                f"[0, {num_classes}). Pass labels in 0..{num_classes - 1}."
            )
        if batch_size is not None and batch_size != labels.numel():
            raise ValueError(
                f"batch_size={batch_size} does not match the {labels.numel()} class_labels given. "
                "Leave batch_size out: one image is generated per label."
            )
        return labels

    def _check_inputs(
        self, batch_size: int, guidance_scale: float, num_inference_steps: int, output_type: str, return_routes: bool
    ):
        if return_routes and not isinstance(self.transformer, MoLTransformer2DModel):
            raise ValueError(
                f"return_routes=True needs a MoLTransformer2DModel, but the transformer is a "
                f"{type(self.transformer).__name__}, which has no router. Call the pipeline with return_routes=False."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
        if guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be >= 0, got {guidance_scale}. Use 1.0 for no guidance, or a value > 1."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")

        config = self.transformer.config
        out_channels = config.out_channels or config.in_channels
        if out_channels not in (config.in_channels, 2 * config.in_channels):
            raise ValueError(
                f"transformer.config.out_channels={out_channels} must equal in_channels={config.in_channels} "
                f"(noise prediction) or 2 * in_channels={2 * config.in_channels} (with learned variance)."
            )
        if self.vae is not None and self.vae.config.latent_channels != config.in_channels:
            raise ValueError(
                f"vae.config.latent_channels={self.vae.config.latent_channels} does not match "
                f"transformer.config.in_channels={config.in_channels}. Use a VAE with matching latents."
            )

    def _scheduler_step_kwargs(self, generator) -> dict:
        """Pass the generator to `scheduler.step` when its signature accepts one (DDPM, DDIM, Euler...)."""
        step_parameters = inspect.signature(self.scheduler.step).parameters
        if "generator" in step_parameters:
            return {"generator": generator}
        return {}

    def _scheduler_uses_learned_variance(self) -> bool:
        variance_type = self.scheduler.config.get("variance_type")
        return variance_type in LEARNED_VARIANCE_TYPES and isinstance(self.scheduler, LEARNED_VARIANCE_SCHEDULERS)

    def _scheduler_for_sampling(self, latent_channels: int) -> SchedulerMixin:
        """Return `self.scheduler`, or a copy without `variance_type` when its `step` would cut channels.

        A DPM-Solver-style scheduler made with `from_config` from a learned-variance DDPM config
        inherits `variance_type="learned_range"`, and its `step` then keeps only 3 channels. The
        pipeline already removes the variance channels, so the copy samples the same way without the cut.
        """
        scheduler = self.scheduler
        if latent_channels <= 3 or scheduler.config.get("variance_type") not in LEARNED_VARIANCE_TYPES:
            return scheduler
        if isinstance(scheduler, LEARNED_VARIANCE_SCHEDULERS):
            return scheduler
        if "variance_type" not in inspect.signature(type(scheduler).__init__).parameters:
            return scheduler
        return type(scheduler).from_config(scheduler.config, variance_type=None)

    @staticmethod
    def _apply_guidance(prediction: torch.Tensor, latent_channels: int, guidance_scale: float) -> torch.Tensor:
        """Combine a [conditional, null] batch (2B, C_out, H, W) into the guided (B, C_out, H, W) prediction.

        Guidance mixes only the first `latent_channels` channels (the noise prediction). Learned
        variance channels, if any, come from the conditional half.
        """
        cond, uncond = prediction.chunk(2)  # each (B, C_out, H, W)
        cond_noise, variance = cond[:, :latent_channels], cond[:, latent_channels:]
        uncond_noise = uncond[:, :latent_channels]
        guided_noise = uncond_noise + guidance_scale * (cond_noise - uncond_noise)
        return torch.cat([guided_noise, variance], dim=1)

    @staticmethod
    def _trace_for_requested_samples(trace: RouteTrace, batch_size: int, timestep: torch.Tensor) -> RouteTrace:
        """Keep the first B samples of a trace (the conditional half under guidance), on the CPU."""
        trace = trace.detach_cpu()
        class_labels = trace.class_labels[:batch_size] if trace.class_labels is not None else None
        return dataclasses.replace(
            trace,
            indices=trace.indices[:, :batch_size],  # (S, B) or (S, B, T)
            probs=trace.probs[:, :batch_size],  # (S, B, K) or (S, B, T, K)
            timesteps=timestep.detach().cpu().expand(batch_size).clone(),  # (B,)
            class_labels=class_labels,
        )

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Map latents to images in [-1, 1]: through the VAE if there is one, else unchanged."""
        if self.vae is None:
            return latents
        latents = latents / self.vae.config.scaling_factor
        shift_factor = getattr(self.vae.config, "shift_factor", None)
        if shift_factor is not None:
            latents = latents + shift_factor
        return self.vae.decode(latents.to(self.vae.dtype)).sample

