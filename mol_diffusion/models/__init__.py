from .layer_router import LayerRouter, RouteTrace
from .mol_transformer_2d import MoLTransformer2DModel, MoLTransformer2DModelOutput

__all__ = ["LayerRouter", "MoLTransformer2DModel", "MoLTransformer2DModelOutput", "RouteTrace"]
