"""Mixture of Layers (MoL) diffusion backbones for Hugging Face diffusers."""

from .models import LayerRouter, MoLTransformer2DModel, MoLTransformer2DModelOutput, RouteTable, RouteTrace
from .pipelines import MoLPipeline, MoLPipelineOutput

__version__ = "0.1.0"

__all__ = [
    "LayerRouter",
    "MoLPipeline",
    "MoLPipelineOutput",
    "MoLTransformer2DModel",
    "MoLTransformer2DModelOutput",
    "RouteTable",
    "RouteTrace",
]
