"""Model factory for the training script.

`build_model` maps `--model` to a builder. Only `mol` exists so far; a dense baseline (diffusers'
`DiTTransformer2DModel` or `UNet2DModel`) is added by registering a builder in `_BUILDERS` and its
class in `_MODEL_CLASSES`, plus a matching pipeline in `build_pipeline`.
"""

import argparse
from typing import Any, Optional

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

from ..models import MoLTransformer2DModel
from ..pipelines import MoLPipeline
from .errors import ConfigError

# TODO: add "dit" (DiTTransformer2DModel) and "unet" (UNet2DModel) baselines. Both need a
# class-conditional pipeline for the sample grids and the final save, which MoLPipeline is not yet.
MODEL_CHOICES = ("mol",)

_MODEL_CLASSES = {"mol": MoLTransformer2DModel}


def model_class(name: str) -> type[ModelMixin]:
    """Return the model class for a `--model` value."""
    if name not in _MODEL_CLASSES:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODEL_CHOICES)}.")
    return _MODEL_CLASSES[name]


def build_model(args: argparse.Namespace, num_classes: Optional[int], num_channels: int) -> ModelMixin:
    """Build the model that `args.model` names, filling unset config fields from the dataset.

    `sample_size` defaults to `args.resolution`, `in_channels` to `num_channels` and
    `num_classes` to the dataset's. An explicit `num_classes: null` in the config file's `model:`
    mapping keeps the model unconditional on a labelled dataset. The router loss weight flags,
    when set, override the config file's values.

    Args:
        args (`argparse.Namespace`): Parsed training flags with `model` and `model_config`.
        num_classes (`int`, *optional*): Number of classes in the dataset; None without labels.
        num_channels (`int`): Image channels of the dataset.

    Returns:
        [`ModelMixin`]: The new model.
    """
    return _BUILDERS[args.model](args, dict(args.model_config), num_classes, num_channels)


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
    if config.num_classes is None:
        return
    if dataset_classes is None:
        raise ConfigError(
            f"the model is class-conditional (num_classes={config.num_classes}) but the dataset has no labels; "
            "set `num_classes: null` under `model:` or use a labelled dataset."
        )
    if config.num_classes < dataset_classes:
        raise ConfigError(
            f"the model has num_classes={config.num_classes} but the dataset has {dataset_classes} classes; "
            f"set num_classes to at least {dataset_classes}, or remove it to use the dataset's."
        )


def build_pipeline(model: ModelMixin, scheduler: SchedulerMixin) -> DiffusionPipeline:
    """Wrap a trained model and its noise scheduler in the pipeline that samples from it."""
    return MoLPipeline(transformer=model, scheduler=scheduler)


def _build_mol(args, kwargs: dict[str, Any], num_classes, num_channels) -> MoLTransformer2DModel:
    kwargs.setdefault("sample_size", args.resolution)
    kwargs.setdefault("in_channels", num_channels)
    kwargs.setdefault("num_classes", num_classes)
    for name in ("router_balance_loss_weight", "router_z_loss_weight"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return MoLTransformer2DModel(**kwargs)


_BUILDERS = {"mol": _build_mol}
