"""Diffusion training losses: targets per prediction type, min-SNR weighting and the learned-variance VLB."""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

# Weight of the variational bound in the hybrid loss of improved DDPM (Nichol & Dhariwal, 2021):
# L_hybrid = L_simple + 0.001 * L_vlb, where L_vlb sums the per-timestep terms L_t over all T
# timesteps. With t drawn uniformly, 0.001 * L_vlb = (0.001 * T) * E_t[L_t], so each sampled term
# is weighted by 0.001 * T (1.0 for T = 1000, as in DiT's training code).
VLB_WEIGHT_PER_TIMESTEP = 0.001


@dataclass
class TrainingLoss:
    """Loss terms of one training batch.

    Args:
        loss (`torch.Tensor`): Scalar to backpropagate: diffusion + VLB + router auxiliary loss.
        diffusion_loss (`torch.Tensor`): Scalar (optionally min-SNR weighted) MSE on the target.
        vlb_loss (`torch.Tensor`): Scalar weighted VLB term in bits per dimension; 0 without learned variance.
        aux_loss (`torch.Tensor`): Scalar weighted router losses from the model; 0 for models without a router.
        routes (`RouteTrace`, *optional*): Routes of this forward pass, when requested.
    """

    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    vlb_loss: torch.Tensor
    aux_loss: torch.Tensor
    routes: Optional[object] = None


def diffusion_target(
    scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Return the regression target for the scheduler's `prediction_type`.

    Args:
        scheduler ([`DDPMScheduler`]): Noise scheduler; its config sets the prediction type.
        clean (`torch.Tensor` of shape `(B, C, H, W)`): Clean images x_0.
        noise (`torch.Tensor` of shape `(B, C, H, W)`): The noise added to make x_t.
        timesteps (`torch.LongTensor` of shape `(B,)`): Timestep of each sample.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)`: The noise (`epsilon`), the velocity (`v_prediction`)
        or the clean image (`sample`).
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or sample.")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Return the per-sample min-SNR loss weights of Hang et al. (2023), shape `(B,)`.

    The weight turns the loss on the model's target into min(SNR, gamma) times the loss on x_0:
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, and min(SNR, gamma) for
    sample prediction. A timestep with SNR exactly 0 gets weight 1 for epsilon and v.
    """
    snr = compute_snr(scheduler, timesteps)  # (B,)
    clipped = torch.clamp(snr, max=snr_gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        return clipped
    return torch.where(snr > 0, weights, torch.ones_like(weights))


def predicted_clean_sample(
    scheduler: DDPMScheduler, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Convert a model prediction of the scheduler's `prediction_type` into a predicted x_0, `(B, C, H, W)`."""
    alpha_prod = _per_sample(scheduler.alphas_cumprod, timesteps, noisy)  # (B, 1, 1, 1)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha_prod).sqrt() * model_output) / alpha_prod.sqrt()
    if prediction_type == "v_prediction":
        return alpha_prod.sqrt() * noisy - (1 - alpha_prod).sqrt() * model_output
    return model_output


def learned_range_vlb(
    scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    predicted_clean: torch.Tensor,
    variance_output: torch.Tensor,
) -> torch.Tensor:
    """Compute the variational-bound term L_t per sample, in bits per dimension, shape `(B,)`.

    The model's log-variance interpolates between log(beta_tilde_t) and log(beta_t) with
    `frac = (variance_output + 1) / 2`, as `DDPMScheduler(variance_type="learned_range")` does when
    sampling. For t > 0 the term is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0 it is
    the negative log-likelihood of x_0 under a Gaussian discretised to 256 pixel levels. Pass
    `predicted_clean` detached so that this term trains only the variance (improved DDPM).

    Args:
        scheduler ([`DDPMScheduler`]): The training noise scheduler.
        clean (`torch.Tensor` of shape `(B, C, H, W)`): Clean images x_0 in [-1, 1].
        noisy (`torch.Tensor` of shape `(B, C, H, W)`): Noisy images x_t.
        timesteps (`torch.LongTensor` of shape `(B,)`): Timestep of each sample.
        predicted_clean (`torch.Tensor` of shape `(B, C, H, W)`): The model's x_0 prediction.
        variance_output (`torch.Tensor` of shape `(B, C, H, W)`): The model's variance channels, in [-1, 1].

    Returns:
        `torch.Tensor` of shape `(B,)`: L_t of each sample, averaged over dimensions.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)
    alpha_prod = alphas_cumprod[timesteps]  # (B,)
    previous = alphas_cumprod[(timesteps - 1).clamp(min=0)]
    alpha_prod_prev = torch.where(timesteps > 0, previous, torch.ones_like(alpha_prod))  # 1 before t = 0
    beta = 1 - alpha_prod / alpha_prod_prev
    posterior_variance = beta * (1 - alpha_prod_prev) / (1 - alpha_prod)

    # The posterior variance is 0 at t = 0, so its log is clipped to the value at t = 1.
    variance_at_one = (1 - alphas_cumprod[1] / alphas_cumprod[0]) * (1 - alphas_cumprod[0]) / (1 - alphas_cumprod[1])
    posterior_log_variance = torch.log(torch.where(timesteps > 0, posterior_variance, variance_at_one))

    view = (-1,) + (1,) * (noisy.dim() - 1)  # (B,) -> (B, 1, 1, 1)
    mean_coef_clean = (beta * alpha_prod_prev.sqrt() / (1 - alpha_prod)).view(view)
    mean_coef_noisy = ((1 - alpha_prod_prev) * (1 - beta).sqrt() / (1 - alpha_prod)).view(view)
    true_mean = mean_coef_clean * clean + mean_coef_noisy * noisy
    model_mean = mean_coef_clean * predicted_clean + mean_coef_noisy * noisy

    fraction = (variance_output.float() + 1) / 2
    model_log_variance = fraction * torch.log(beta).view(view) + (1 - fraction) * posterior_log_variance.view(view)

    kl = _normal_kl(true_mean, posterior_log_variance.view(view), model_mean, model_log_variance)
    decoder_nll = -_discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_log_variance)
    per_element = torch.where((timesteps == 0).view(view), decoder_nll, kl)
    return per_element.flatten(1).mean(dim=1) / math.log(2.0)


def compute_training_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    scheduler: DDPMScheduler,
    snr_gamma: Optional[float] = None,
    class_dropout_prob: float = 0.0,
    null_class_label: Optional[int] = None,
    use_class_labels: bool = True,
    return_routes: bool = False,
) -> TrainingLoss:
    """Noise a batch, run the model and compute the training loss.

    Args:
        model (`torch.nn.Module`): The denoiser; `model(x_t, t, class_labels=...)` returns an output
            with `sample` and, for MoL models, `aux_loss` and `routes`.
        batch (`dict`): `"pixel_values"` `(B, C, H, W)` in [-1, 1] and optional `"class_labels"` `(B,)`.
        scheduler ([`DDPMScheduler`]): Training noise scheduler; its prediction type sets the target.
        snr_gamma (`float`, *optional*): Min-SNR weighting gamma; None for plain MSE.
        class_dropout_prob (`float`): Probability of replacing each label by `null_class_label`.
        null_class_label (`int`, *optional*): Label of the unconditional class; None skips dropout.
        use_class_labels (`bool`): Pass the batch's labels to the model; False for an unconditional model.
        return_routes (`bool`): Ask a MoL model for its route trace.

    Returns:
        [`TrainingLoss`]: The scalar loss and its parts.
    """
    clean = batch["pixel_values"]
    labels = batch.get("class_labels") if use_class_labels else None
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)

    if labels is not None and class_dropout_prob > 0 and null_class_label is not None:
        drop = torch.rand(labels.shape, device=labels.device) < class_dropout_prob
        labels = torch.where(drop, torch.full_like(labels, null_class_label), labels)

    model_kwargs = {"class_labels": labels} if labels is not None else {}
    if return_routes:
        model_kwargs["return_routes"] = True
    output = model(noisy, timesteps, **model_kwargs)

    channels = clean.shape[1]
    prediction = output.sample[:, :channels].float()  # (B, C, H, W)
    target = diffusion_target(scheduler, clean, noise, timesteps)
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").flatten(1).mean(dim=1)  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)
    diffusion_loss = per_sample.mean()

    vlb_loss = torch.zeros((), device=clean.device)
    if output.sample.shape[1] == 2 * channels:
        predicted_clean = predicted_clean_sample(scheduler, prediction.detach(), noisy, timesteps)
        vlb = learned_range_vlb(scheduler, clean, noisy, timesteps, predicted_clean, output.sample[:, channels:])
        vlb_loss = VLB_WEIGHT_PER_TIMESTEP * scheduler.config.num_train_timesteps * vlb.mean()

    aux_loss = getattr(output, "aux_loss", None)
    if aux_loss is None:
        aux_loss = torch.zeros((), device=clean.device)
    return TrainingLoss(
        loss=diffusion_loss + vlb_loss + aux_loss,
        diffusion_loss=diffusion_loss,
        vlb_loss=vlb_loss,
        aux_loss=aux_loss,
        routes=getattr(output, "routes", None),
    )


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a per-timestep table at `timesteps` and shape it to broadcast over `like`, `(B, 1, ..., 1)`."""
    gathered = values.to(device=like.device, dtype=torch.float32)[timesteps]
    return gathered.view((-1,) + (1,) * (like.dim() - 1))


def _normal_kl(mean1, log_variance1, mean2, log_variance2) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (
        -1.0
        + log_variance2
        - log_variance1
        + torch.exp(log_variance1 - log_variance2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_variance2)
    )


def _discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood per element of images in [-1, 1] under a Gaussian discretised to 256 levels, in nats.

    Each pixel level is a bin of width 2/255; the outermost bins extend to -inf and +inf.
    """
    inverse_std = torch.exp(-log_scales)
    upper = inverse_std * (x - means + 1.0 / 255.0)
    lower = inverse_std * (x - means - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    bin_probability = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(
        x < -0.999,
        log_cdf_upper,
        torch.where(x > 0.999, log_survival_lower, torch.log(bin_probability)),
    )
