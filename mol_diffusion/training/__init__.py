"""Helpers for `train_unet.py`: flags and config files, model factory, losses, checkpoints and logs."""

from .checkpointing import list_checkpoints, resolve_resume_checkpoint, save_checkpoint, save_pipeline_atomically
from .config import parse_training_args
from .errors import ConfigError
from .losses import TrainingLoss, compute_training_loss
from .models import MODEL_CHOICES, build_model, build_pipeline

__all__ = [
    "ConfigError",
    "MODEL_CHOICES",
    "TrainingLoss",
    "build_model",
    "build_pipeline",
    "compute_training_loss",
    "list_checkpoints",
    "parse_training_args",
    "resolve_resume_checkpoint",
    "save_checkpoint",
    "save_pipeline_atomically",
]
