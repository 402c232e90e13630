"""Helpers shared by the tests: tiny models, tiny train_unet.py configs and runs of the training script."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

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


REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "train_unet.py"

# The `model:` mapping of the tiny training configs: 8x8 images, 16 tokens, width 16, K = S = 2.
TINY_TRAIN_MODEL = {
    "patch_size": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_pool_blocks": 2,
    "num_routing_steps": 2,
    "router_hidden_size": 8,
}


def tiny_train_config(model: Optional[dict] = None, **settings) -> dict:
    """Return a train_unet.py config for 8x8 `builtin:digits` and a tiny MoL.

    `settings` update the top-level keys and `model` updates the `model:` mapping.
    """
    config = {
        "dataset_name": "builtin:digits",
        "resolution": 8,
        "train_batch_size": 8,
        "learning_rate": 1.0e-3,
        "lr_warmup_steps": 0,
        "ddpm_num_steps": 100,
        "seed": 0,
    }
    return {**config, **settings, "model": {**TINY_TRAIN_MODEL, **(model or {})}}


def training_command(config_path, output_dir, *flags) -> list[str]:
    """Return the command line of train_unet.py with a config file, an output folder and more flags."""
    return [sys.executable, str(TRAIN_SCRIPT), "--config", str(config_path), "--output_dir", str(output_dir), *flags]


def run_training(config_path, output_dir, *flags, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run train_unet.py from the repository root and capture its output."""
    command = training_command(config_path, output_dir, *flags)
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def read_train_log(output_dir) -> list[dict]:
    """Read the records of `train_log.jsonl`, complete lines only, since a killed run may leave a partial one."""
    text = (Path(output_dir) / "train_log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
