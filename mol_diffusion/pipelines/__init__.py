import diffusers

from .pipeline_mol import MoLPipeline, MoLPipelineOutput

# `DiffusionPipeline.from_pretrained(folder)` finds the pipeline class named by `_class_name` in
# model_index.json with `getattr(diffusers, name)` (diffusers 0.42.1, `_get_pipeline_class`), so a
# saved MoLPipeline folder loads only if the class is an attribute of the `diffusers` module.
# Registering it here, on `import mol_diffusion`, avoids `trust_remote_code` and a copy of this
# file in every saved folder.
if getattr(diffusers, "MoLPipeline", None) is None:
    setattr(diffusers, "MoLPipeline", MoLPipeline)

__all__ = ["MoLPipeline", "MoLPipelineOutput"]
