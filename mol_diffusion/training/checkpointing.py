"""Crash-safe training checkpoints and the final pipeline save.

Layout of a training output folder:

```
output_dir/
  model_index.json, transformer/, scheduler/   the final pipeline (DiffusionPipeline.from_pretrained)
  checkpoint-N/                                 accelerate state after N optimizer updates
    transformer/  transformer_ema/  optimizer.bin  scheduler.bin  random_states_0.pkl ...
  checkpoint-N.tmp/                             a checkpoint being written; never resumed from
  samples/step-N.png, train_log.jsonl, logs/
```

A checkpoint is written to `checkpoint-N.tmp` and renamed to `checkpoint-N` only when complete,
so `--resume_from_checkpoint latest` never picks a half-written folder.
"""

import logging
import os
import re
import shutil
import tempfile
from typing import Optional

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from diffusers.training_utils import EMAModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from .errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_SUFFIX = ".tmp"
MODEL_SUBFOLDER = "transformer"
EMA_SUBFOLDER = "transformer_ema"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """List the complete checkpoints in `output_dir`, oldest first.

    Args:
        output_dir (`str`): Training output folder.

    Returns:
        `list[tuple[int, str]]`: `(global_step, path)` of every `checkpoint-N` folder. Folders with
        another name, including unfinished `checkpoint-N.tmp` folders, are left out.
    """
    if not os.path.isdir(output_dir):
        return []
    checkpoints = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            checkpoints.append((int(match.group(1)), path))
    return sorted(checkpoints)


def checkpoint_step(path: str) -> int:
    """Return the global step N of a `checkpoint-N` folder path."""
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ConfigError(
            f"--resume_from_checkpoint {path!r}: the folder name must be {CHECKPOINT_PREFIX}N, "
            "as written by this script."
        )
    return int(match.group(1))


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """Find the checkpoint folder to resume from.

    Args:
        output_dir (`str`): Training output folder.
        resume_from_checkpoint (`str`, *optional*): `"latest"`, a checkpoint path, or a folder name
            inside `output_dir`.

    Returns:
        `str` or `None`: The checkpoint folder; None when not resuming, or when `"latest"` finds no
        complete checkpoint (a fresh run then starts).
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        unfinished = sorted(
            name for name in _listdir(output_dir)
            if name.startswith(CHECKPOINT_PREFIX) and name.endswith(TEMPORARY_SUFFIX)
        )
        if unfinished:
            logger.warning("Ignoring unfinished checkpoint folders in %s: %s", output_dir, ", ".join(unfinished))
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("No checkpoint in %s to resume from; starting a new run.", output_dir)
            return None
        return checkpoints[-1][1]

    candidates = [resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)]
    for path in candidates:
        if os.path.isdir(path):
            checkpoint_step(path)
            return path
    raise ConfigError(
        f"--resume_from_checkpoint {resume_from_checkpoint!r}: folder not found (also looked in {output_dir}); "
        "pass 'latest' or an existing checkpoint-N folder."
    )


def save_checkpoint(accelerator: Accelerator, output_dir: str, global_step: int, total_limit: Optional[int]) -> str:
    """Save the accelerate state as `checkpoint-{global_step}`, then delete checkpoints over the limit.

    The state is written to `checkpoint-{global_step}.tmp` and renamed into place when complete.
    Older checkpoints are deleted only after the new one is in place.

    Args:
        accelerator ([`Accelerator`]): The accelerator holding the prepared model, optimizer and scheduler.
        output_dir (`str`): Training output folder.
        global_step (`int`): Optimizer updates done so far.
        total_limit (`int`, *optional*): Number of checkpoints to keep; None keeps all.

    Returns:
        `str`: Path of the saved checkpoint.
    """
    final_path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    temporary_path = final_path + TEMPORARY_SUFFIX
    if accelerator.is_main_process and os.path.exists(temporary_path):
        shutil.rmtree(temporary_path)
    accelerator.wait_for_everyone()

    accelerator.save_state(temporary_path)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _replace_directory(temporary_path, final_path)
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit)
        logger.info("Saved checkpoint %s", final_path)
    accelerator.wait_for_everyone()
    return final_path


def prune_checkpoints(output_dir: str, total_limit: int) -> list[str]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain; return the deleted paths."""
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in removed:
        logger.info("Deleting checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
        shutil.rmtree(path)
    return removed


def register_state_hooks(accelerator: Accelerator, ema_model: Optional[EMAModel]) -> None:
    """Save and load the model (and its EMA) in diffusers format inside accelerate checkpoints.

    The model goes to `transformer/` and the EMA weights with their step count and decay settings to
    `transformer_ema/`, both loadable with `from_pretrained`. Optimizer, LR scheduler and RNG states
    stay in accelerate's own files.

    Args:
        accelerator ([`Accelerator`]): The accelerator; hooks are registered before `load_state`.
        ema_model ([`EMAModel`], *optional*): The EMA of the weights, created with `model_cls` and
            `model_config` so it can be saved with `save_pretrained`.
    """

    def save_model_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        if ema_model is not None:
            # save_pretrained builds a fresh model, whose initialisation would advance the global
            # RNG and change the training noise after every checkpoint.
            with torch.random.fork_rng(devices=[]):
                ema_model.save_pretrained(os.path.join(output_dir, EMA_SUBFOLDER))
        for model in models:
            accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, MODEL_SUBFOLDER))
            # Pop the weights so that accelerate does not store a second copy.
            weights.pop()

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            load_ema_state(ema_model, os.path.join(input_dir, EMA_SUBFOLDER))
            ema_model.to(accelerator.device)
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = type(model).from_pretrained(input_dir, subfolder=MODEL_SUBFOLDER)
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def load_ema_state(ema_model: EMAModel, path: str) -> None:
    """Load EMA weights and step count saved by `EMAModel.save_pretrained` into `ema_model`.

    This does what `EMAModel.from_pretrained` does without passing a path to `from_config`, which
    diffusers 0.42 deprecates, and without its warning about the EMA keys in `config.json`.
    """
    saved_config = ema_model.model_cls.load_config(path)
    averaged = ema_model.model_cls.from_config(ema_model.model_config)
    averaged.load_state_dict(load_file(os.path.join(path, SAFETENSORS_WEIGHTS_NAME)))
    state = {key: saved_config[key] for key in ema_model.state_dict() if key in saved_config}
    state["shadow_params"] = [parameter.detach() for parameter in averaged.parameters()]
    ema_model.load_state_dict(state)


def save_pipeline_atomically(pipeline: DiffusionPipeline, output_dir: str) -> None:
    """Save a pipeline so that `output_dir` itself loads with `DiffusionPipeline.from_pretrained`.

    The pipeline is saved into a temporary folder inside `output_dir`. The old `model_index.json`
    is removed first, each component folder is then moved into place with `os.replace`, and the new
    `model_index.json` comes last, so a folder interrupted mid-save has no `model_index.json` and
    fails to load instead of mixing old and new components. Checkpoints and logs stay untouched.

    Args:
        pipeline ([`DiffusionPipeline`]): The pipeline to save.
        output_dir (`str`): Training output folder.
    """
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".pipeline-", suffix=TEMPORARY_SUFFIX, dir=output_dir)
    try:
        pipeline.save_pretrained(staging)
        index_path = os.path.join(output_dir, "model_index.json")
        if os.path.exists(index_path):
            os.remove(index_path)
        for name in sorted(os.listdir(staging)):
            if name != "model_index.json":
                _replace_directory(os.path.join(staging, name), os.path.join(output_dir, name))
        os.replace(os.path.join(staging, "model_index.json"), index_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_directory(source: str, destination: str) -> None:
    """Move `source` to `destination`, replacing an existing file or folder there."""
    if os.path.isdir(destination) and not os.path.islink(destination):
        # os.replace cannot overwrite a non-empty folder, so the old one is moved aside first.
        stale = tempfile.mkdtemp(prefix=".replaced-", suffix=TEMPORARY_SUFFIX, dir=os.path.dirname(destination))
        os.replace(destination, os.path.join(stale, "old"))
        os.replace(source, destination)
        shutil.rmtree(stale)
    else:
        os.replace(source, destination)


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []

