"""Model factory for the training script.

`build_model` maps `--model` to a builder: `mol` (MoLTransformer2DModel) or one of two dense
baselines from diffusers, `dit` (DiTTransformer2DModel) and `unet` (UNet2DModel). All three are
trained by the same loop and saved in a `MoLPipeline`, so every comparison uses the same sampler.
"""

import argparse
from typing import Any, Optional

from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, ModelMixin, SchedulerMixin, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding

from ..models import MoLTransformer2DModel
from ..pipelines import MoLPipeline
from ..pipelines.pipeline_mol import denoiser_num_classes
from .errors import ConfigError

MODEL_CHOICES = ("mol", "dit", "unet")

_MODEL_CLASSES = {"mol": MoLTransformer2DModel, "dit": DiTTransformer2DModel, "unet": UNet2DModel}

# Config key that sets the class count of each model, for error messages.
_CLASS_COUNT_KEYS = {MoLTransformer2DModel: "num_classes", DiTTransformer2DModel: "num_embeds_ada_norm"}

# Defaults for the keys that the `model:` mapping leaves out. The DiT gets the width, depth and patch
# of the MoL defaults (4 heads x 32, 8 block applications, patch 2) instead of diffusers' DiT-XL/2
# size. The UNet has 1.16M parameters at sample_size 16 with 10 classes, close to the 1.29M of the
# default MoL pool of 4 blocks.
DIT_DEFAULTS = {"num_layers": 8, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2}
UNET_DEFAULTS = {"block_out_channels": (32, 64, 64), "layers_per_block": 1}


def model_class(name: str) -> type[ModelMixin]:
    """Return the model class for a `--model` value."""
    if name not in _MODEL_CLASSES:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODEL_CHOICES)}.")
    return _MODEL_CLASSES[name]


def build_model(
    args: argparse.Namespace, num_classes: Optional[int], num_channels: int, sample_size: Optional[int] = None
) -> ModelMixin:
    """Build the model that `args.model` names, filling unset config fields from the dataset.

    `sample_size` defaults to the `sample_size` argument or else `args.resolution`, `in_channels`
    to `num_channels` and `num_classes` to the dataset's. An explicit `num_classes: null` in the
    config file's `model:` mapping keeps the model unconditional on a labelled dataset. The router
    loss weight flags, when set, override the config file's values.

    Args:
        args (`argparse.Namespace`): Parsed training flags with `model` and `model_config`.
        num_classes (`int`, *optional*): Number of classes in the dataset; None without labels.
        num_channels (`int`): Channels of the model input: image channels, or latent channels with a VAE.
        sample_size (`int`, *optional*): Side of the model input; the latent size with a VAE.

    Returns:
        [`ModelMixin`]: The new model.
    """
    kwargs = dict(args.model_config)
    kwargs.setdefault("sample_size", sample_size or args.resolution)
    return _BUILDERS[args.model](args, kwargs, num_classes, num_channels)


def compile_model(model: ModelMixin, **compile_kwargs: Any) -> ModelMixin:
    """Compile the model's forward pass in place with `torch.compile` and return it.

    `nn.Module.compile` keeps the module's class and parameter names, so `save_pretrained`,
    accelerate checkpoints and `unwrap_model` work as without compilation. The routing dispatch
    counts the samples per block on the host (`torch.bincount`), which breaks the graph at each
    routing step, and group sizes that change between steps trigger recompilation until dynamo
    marks them dynamic.

    Args:
        model ([`ModelMixin`]): The model to compile.
        compile_kwargs: Passed to `torch.compile`, e.g. `backend` or `mode`; the default backend is inductor.

    Returns:
        [`ModelMixin`]: The same model object.
    """
    model.compile(**compile_kwargs)
    return model


def check_model_matches_dataset(model: ModelMixin, dataset_classes: Optional[int]) -> None:
    """Raise `ConfigError` when the model's classes or output channels do not fit the dataset.

    Args:
        model ([`ModelMixin`]): The built model.
        dataset_classes (`int`, *optional*): Number of classes in the dataset; None without labels.
    """
    config = model.config
    out_channels = config.out_channels or config.in_channels
    if out_channels not in (config.in_channels, 2 * config.in_channels):
        raise ConfigError(
            f"model out_channels={out_channels} is invalid: use in_channels={config.in_channels}, "
            f"or {2 * config.in_channels} to learn the variance."
        )
    num_classes = denoiser_num_classes(model)
    if num_classes is None:
        return
    # UNet2DModel counts the null class in num_class_embeds, so its key takes one more than the classes.
    key = _CLASS_COUNT_KEYS.get(type(model), "num_class_embeds")
    extra = 1 if key == "num_class_embeds" else 0
    if dataset_classes is None:
        raise ConfigError(
            f"the model is class-conditional ({num_classes} classes) but the dataset has no labels; "
            f"set `{key}: null` under `model:` or use a labelled dataset."
        )
    if num_classes < dataset_classes:
        raise ConfigError(
            f"the model has {num_classes} classes ({key}={num_classes + extra}) but the dataset has "
            f"{dataset_classes} classes; set {key} to at least {dataset_classes + extra}, or remove it to "
            "use the dataset's."
        )


def build_pipeline(
    model: ModelMixin, scheduler: SchedulerMixin, vae: Optional[AutoencoderKL] = None
) -> DiffusionPipeline:
    """Wrap a trained model, its noise scheduler and, for latent-space models, the VAE in a pipeline."""
    return MoLPipeline(transformer=model, scheduler=scheduler, vae=vae)


def _build_mol(args, kwargs: dict[str, Any], num_classes, num_channels) -> MoLTransformer2DModel:
    kwargs.setdefault("in_channels", num_channels)
    kwargs.setdefault("num_classes", num_classes)
    for name in ("router_balance_loss_weight", "router_z_loss_weight"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return MoLTransformer2DModel(**kwargs)


def _build_dit(args, kwargs: dict[str, Any], num_classes, num_channels) -> DiTTransformer2DModel:
    for key, value in DIT_DEFAULTS.items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("in_channels", num_channels)
    kwargs.setdefault("num_embeds_ada_norm", num_classes)
    if kwargs["num_embeds_ada_norm"] is None:
        raise ConfigError(
            "--model dit needs class labels: DiTTransformer2DModel embeds a class label in every block "
            "(num_embeds_ada_norm). Train it on a labelled dataset, or use --model mol or --model unet."
        )
    model = DiTTransformer2DModel(**kwargs)

    # In training mode each DiT block's label embedding replaces labels by the null class with
    # probability 0.1, each block drawing on its own (diffusers 0.42.1, `LabelEmbedding.token_drop`).
    # Setting the probability to 0 leaves --class_dropout_prob of the training loop as the only label
    # dropout, as for the other models. The null row stays in the table, because its size is fixed
    # at construction. NOTE: a DiT loaded with from_pretrained has the in-model dropout on again.
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def _build_unet(args, kwargs: dict[str, Any], num_classes, num_channels) -> UNet2DModel:
    for key, value in UNET_DEFAULTS.items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("in_channels", num_channels)
    kwargs.setdefault("out_channels", kwargs["in_channels"])  # diffusers' default is 3
    # Self-attention at every level but the first (largest) one, and in the middle block.
    num_levels = len(kwargs["block_out_channels"])
    kwargs.setdefault("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * (num_levels - 1))
    kwargs.setdefault("up_block_types", ("AttnUpBlock2D",) * (num_levels - 1) + ("UpBlock2D",))
    # One class embedding per class plus the null class, the last row.
    kwargs.setdefault("num_class_embeds", None if num_classes is None else num_classes + 1)
    return UNet2DModel(**kwargs)


_BUILDERS = {"mol": _build_mol, "dit": _build_dit, "unet": _build_unet}
