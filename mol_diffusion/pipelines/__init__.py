from .pipeline_mol import MoLPipeline, MoLPipelineOutput

__all__ = ["MoLPipeline", "MoLPipelineOutput"]
