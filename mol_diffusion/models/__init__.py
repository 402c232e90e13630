from .layer_router import LayerRouter, RouteTrace
from .mol_transformer_2d import MoLTransformer2DModel, MoLTransformer2DModelOutput
from .route_table import RouteTable

__all__ = ["LayerRouter", "MoLTransformer2DModel", "MoLTransformer2DModelOutput", "RouteTable", "RouteTrace"]
