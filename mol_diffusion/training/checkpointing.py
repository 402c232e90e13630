"""Crash-safe training checkpoints and the final pipeline save.

Layout of a training output folder:

```
output_dir/
  model_index.json, transformer/, scheduler/   the final pipeline (DiffusionPipeline.from_pretrained)
  checkpoint-N/                                 accelerate state after N optimizer updates
    transformer/  transformer_ema/  optimizer.bin  scheduler.bin  random_states_0.pkl ...
    rng_state_0.safetensors                     torch RNG states of process 0, restored on resume
    training_state.json                         data seed, epoch and batches done in that epoch
  checkpoint-N.tmp/                             a checkpoint being written; never resumed from
  samples/step-N.png, train_log.jsonl, logs/
```

A checkpoint is written to `checkpoint-N.tmp`, flushed to disk with fsync and renamed to
`checkpoint-N` only when complete, so `--resume_from_checkpoint latest` never picks a half-written
folder, even after `kill -9`.
"""

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from diffusers.training_utils import EMAModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_SUFFIX = ".tmp"
MODEL_SUBFOLDER = "transformer"
EMA_SUBFOLDER = "transformer_ema"
TRAINING_STATE_NAME = "training_state.json"
RNG_STATE_NAME = "rng_state_{process_index}.safetensors"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# Folders left by a save that was killed: checkpoints being written, folders being replaced, and
# pipeline staging folders of `save_pipeline_atomically`.
_UNFINISHED_NAME = re.compile(rf"^({CHECKPOINT_PREFIX}\d+|\.replaced-.*|\.pipeline-.*){re.escape(TEMPORARY_SUFFIX)}$")


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


@dataclass
class DataPosition:
    """Position of a run in its training data, saved in every checkpoint so that a resumed run gets the same batches.

    Args:
        data_seed (`int`): Seed of the shuffle order and of the random augmentations; see
            [`EpochSeededDataset`].
        epoch (`int`): The epoch in progress, counted from 0.
        batches_done (`int`): Batches of that epoch that this process has consumed.
    """

    data_seed: int
    epoch: int = 0
    batches_done: int = 0


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    global_step: int,
    total_limit: Optional[int],
    data_position: Optional[DataPosition] = None,
) -> str:
    """Save the training state as `checkpoint-{global_step}`, then delete checkpoints over the limit.

    The state is written to `checkpoint-{global_step}.tmp`, flushed to disk and renamed into place
    when complete. Older checkpoints, and unfinished folders left by killed saves, are deleted only
    after the new checkpoint is in place.

    Args:
        accelerator ([`Accelerator`]): The accelerator holding the prepared model, optimizer and scheduler.
        output_dir (`str`): Training output folder.
        global_step (`int`): Optimizer updates done so far.
        total_limit (`int`, *optional*): Number of checkpoints to keep; None keeps all.
        data_position ([`DataPosition`], *optional*): Written to `training_state.json`, so that
            `load_checkpoint` can resume with the same data order.

    Returns:
        `str`: Path of the saved checkpoint.
    """
    final_path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    temporary_path = final_path + TEMPORARY_SUFFIX
    if accelerator.is_main_process and os.path.exists(temporary_path):
        shutil.rmtree(temporary_path)
    accelerator.wait_for_everyone()

    accelerator.save_state(temporary_path)
    save_rng_state(temporary_path, accelerator.process_index)
    if accelerator.is_main_process and data_position is not None:
        state = {"global_step": global_step, **asdict(data_position)}
        with open(os.path.join(temporary_path, TRAINING_STATE_NAME), "w", encoding="utf-8") as file:
            json.dump(state, file, indent=2)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _fsync_tree(temporary_path)
        _replace_directory(temporary_path, final_path)
        _fsync_directory(output_dir)
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit)
        remove_unfinished_saves(output_dir)
        logger.info("Saved checkpoint %s", final_path)
    accelerator.wait_for_everyone()
    return final_path


def load_checkpoint(accelerator: Accelerator, path: str) -> Optional[DataPosition]:
    """Restore model, EMA, optimizer, LR scheduler and RNG states from a checkpoint folder.

    Everything is read without unpickling arbitrary objects: the weights from safetensors by the
    hooks of `register_state_hooks`, and accelerate's `.bin` and `.pkl` files with
    `torch.load(weights_only=True)`. The torch RNG states are then set again from
    `rng_state_{process}.safetensors`, because accelerate (1.16) only logs at INFO level when its
    pickled RNG file fails to load.

    Args:
        accelerator ([`Accelerator`]): The accelerator, after `prepare` and `register_state_hooks`.
        path (`str`): A `checkpoint-N` folder.

    Returns:
        [`DataPosition`] or `None`: The saved data position; None for checkpoints written without one.

    Raises:
        ConfigError: When a file of the checkpoint is missing, truncated, or contains objects that
            `weights_only=True` rejects.
    """
    try:
        accelerator.load_state(path, load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as error:
        raise ConfigError(
            f"cannot load checkpoint {path}: a file contains objects that torch.load(weights_only=True) rejects "
            f"({_error_summary(error, prefer='Unsupported global')}). Move the folder aside and resume from "
            "another checkpoint."
        ) from None
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, SafetensorError) as error:
        raise ConfigError(
            f"cannot load checkpoint {path}: {_error_summary(error)}. Move the folder aside and resume from "
            "another checkpoint."
        ) from None
    restore_rng_state(path, accelerator.process_index)
    return read_data_position(path)


def read_data_position(path: str) -> Optional[DataPosition]:
    """Read the [`DataPosition`] of a checkpoint folder; None when it has no `training_state.json`."""
    state_path = os.path.join(path, TRAINING_STATE_NAME)
    if not os.path.isfile(state_path):
        return None
    try:
        with open(state_path, encoding="utf-8") as file:
            state = json.load(file)
        return DataPosition(int(state["data_seed"]), int(state["epoch"]), int(state["batches_done"]))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{state_path} is invalid ({error!r}); resume from another checkpoint with --resume_from_checkpoint."
        ) from None


def save_rng_state(folder: str, process_index: int) -> None:
    """Save this process's torch CPU RNG state, and the CUDA states when CUDA is in use, as safetensors."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device_index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{device_index}"] = state
    os.makedirs(folder, exist_ok=True)
    save_file(states, os.path.join(folder, RNG_STATE_NAME.format(process_index=process_index)))


def restore_rng_state(folder: str, process_index: int) -> bool:
    """Set the torch CPU and CUDA RNG states saved by `save_rng_state`.

    RNGs of other devices (MPS, XPU, ...) keep the states that accelerate restored.

    Returns:
        `bool`: False when the folder has no RNG file (checkpoints written before it existed).
    """
    path = os.path.join(folder, RNG_STATE_NAME.format(process_index=process_index))
    if not os.path.isfile(path):
        logger.warning("%s has no RNG state file, so the random draws after resuming may differ.", folder)
        return False
    try:
        states = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ConfigError(
            f"cannot read {path} ({error}); resume from another checkpoint with --resume_from_checkpoint."
        ) from None
    torch.set_rng_state(states["torch"])
    # NOTE: the CUDA states are saved and set like the CPU one, but this branch has only run on CPU-only machines.
    if torch.cuda.is_available():
        for device_index in range(torch.cuda.device_count()):
            if f"cuda_{device_index}" in states:
                torch.cuda.set_rng_state(states[f"cuda_{device_index}"], device_index)
    return True


class EpochSeededDataset(torch.utils.data.Dataset):
    """A map-style dataset whose shuffle order and random augmentations depend only on (seed, epoch, index).

    Pass `generator` to the `DataLoader` (with `shuffle=True`) and call `begin_epoch(epoch)` before
    iterating each epoch. The shuffle order then comes from `generator` alone, and each item is built
    with torch's global CPU RNG seeded from (seed, epoch, index), then restored. So a run resumed in the
    middle of an epoch gets the batches of the uninterrupted run, whichever batches it skips, and data
    loading never moves the global RNG that draws the training noise. With DataLoader workers, the
    items are also independent of how they are spread over the workers.

    Only torch's RNG is seeded per item; augmentations drawing from Python's `random` or NumPy are
    not reproduced (torchvision's transforms use torch's).

    Args:
        dataset (`torch.utils.data.Dataset`): Map-style dataset to wrap.
        seed (`int`): Data seed in [0, 2**32).
    """

    # Odd 32-bit constant (2**32 / golden ratio): item seeds base + index * constant are distinct
    # for the indices of one epoch. Torch's CPU generator uses the low 32 bits of a seed.
    _ITEM_SEED_STRIDE = 0x9E3779B9

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.generator = torch.Generator()
        self._item_seed_base = 0
        self.begin_epoch(0)

    # Not named `set_epoch`: accelerate's DataLoaderShard calls `dataset.set_epoch` with its own pass
    # counter, which restarts at 0 in a resumed run.
    def begin_epoch(self, epoch: int) -> None:
        """Seed the shuffle generator and the item seeds of `epoch`."""
        shuffle_seed, item_seed_base = np.random.SeedSequence(self.seed, spawn_key=(epoch,)).generate_state(2)
        self.generator.manual_seed(int(shuffle_seed))
        self._item_seed_base = int(item_seed_base)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        # The DataLoader fetches a whole batch with one call, so the RNG is forked once per batch.
        items = []
        with torch.random.fork_rng(devices=[]):
            for index in indices:
                seed = (self._item_seed_base + index * self._ITEM_SEED_STRIDE) % 2**32
                torch.random.default_generator.manual_seed(seed)
                items.append(self.dataset[index])
        return items


def prune_checkpoints(output_dir: str, total_limit: int) -> list[str]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain; return the deleted paths."""
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in removed:
        logger.info("Deleting checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
        # Renamed first, so a kill during the deletion leaves a `.tmp` folder that resume ignores.
        doomed = path + TEMPORARY_SUFFIX
        if os.path.exists(doomed):
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
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
            loaded = type(model).from_pretrained(input_dir, subfolder=MODEL_SUBFOLDER, use_safetensors=True)
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


def remove_unfinished_saves(output_dir: str) -> list[str]:
    """Delete folders left by saves that were killed (`checkpoint-N.tmp` and others); return their paths.

    Call it only when no save of this output folder is in progress, since a folder being written
    looks the same as one left by a killed save.
    """
    removed = []
    for name in sorted(_listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if _UNFINISHED_NAME.match(name) and os.path.isdir(path) and not os.path.islink(path):
            logger.info("Deleting %s, left by an interrupted save.", path)
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _fsync_tree(path: str) -> None:
    """Flush every file under `path`, then the folders, to disk, so a rename after it survives a power loss."""
    for root, _, files in os.walk(path):
        for name in files:
            file_descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(file_descriptor)
            finally:
                os.close(file_descriptor)
        _fsync_directory(root)


def _fsync_directory(path: str) -> None:
    # Folders can be opened and flushed on POSIX systems only.
    if os.name != "posix":
        return
    file_descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(file_descriptor)
    finally:
        os.close(file_descriptor)


def _error_summary(error: Exception, prefer: Optional[str] = None) -> str:
    """Shorten an error message to one sentence: the first of the line containing `prefer`, else of the first line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]  # no ANSI colours
    lines = [line for line in lines if line] or [type(error).__name__]
    chosen = next((line for line in lines if prefer and prefer in line), lines[0])
    return chosen.split(". ")[0].rstrip(".")


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []

