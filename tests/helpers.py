"""Helpers shared by the model tests."""

import torch

from mol_diffusion import MoLTransformer2DModel

TINY_MODEL_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=1, num_attention_heads=2, attention_head_dim=8, router_hidden_size=16
)


def perturb_weights_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Add Gaussian noise to every weight in place, so the zero-initialised adaLN gates and outputs open."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(std * torch.randn_like(parameter))
    return model


def make_tiny_model(perturb: bool = True, **config) -> MoLTransformer2DModel:
    """Build an 8x8 model from `TINY_MODEL_CONFIG` updated by `config`, seeded with 0."""
    torch.manual_seed(0)
    model = MoLTransformer2DModel(**{**TINY_MODEL_CONFIG, **config})
    return perturb_weights_(model) if perturb else model
