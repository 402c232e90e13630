"""Model card (`README.md`) for a training output folder, in the Hugging Face Hub format.

The card is written from local facts only (the flags, the model config, `train_log.jsonl`,
`eval.json` and the newest sample grid) and never contacts the hub, so it is the same offline and
before a push.
"""

import argparse
import json
import logging
import math
import os
import re
from typing import Any, Optional

from diffusers import ModelMixin
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData

from ..pipelines.pipeline_mol import denoiser_num_classes
from .monitoring import TRAIN_LOG_NAME

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
SAMPLES_FOLDER = "samples"
EVALUATION_NAME = "eval.json"  # written by train_unet.py --eval_at_end

# The card reports the mean loss over this many final updates, because one update's loss varies
# a lot with the timesteps drawn for its batch.
FINAL_LOSS_WINDOW = 50

_SAMPLE_GRID_NAME = re.compile(r"^step-(\d+)\.png$")


def latest_sample_grid(output_dir: str) -> Optional[str]:
    """Return the path of the `samples/step-N.png` with the largest N, relative to `output_dir`, or None."""
    folder = os.path.join(output_dir, SAMPLES_FOLDER)
    if not os.path.isdir(folder):
        return None
    grids = [(int(match.group(1)), name) for name in os.listdir(folder) if (match := _SAMPLE_GRID_NAME.match(name))]
    if not grids:
        return None
    return f"{SAMPLES_FOLDER}/{max(grids)[1]}"


def _grid_step(relative_path: str) -> int:
    return int(_SAMPLE_GRID_NAME.match(os.path.basename(relative_path)).group(1))


def final_loss(output_dir: str, window: int = FINAL_LOSS_WINDOW) -> tuple[Optional[int], Optional[float], int]:
    """Read the last step and the mean loss of the last `window` updates from `train_log.jsonl`.

    Returns:
        `tuple`: `(step, mean_loss, num_updates_averaged)`; `(None, None, 0)` when the log is missing
        or has no finite loss.
    """
    path = os.path.join(output_dir, TRAIN_LOG_NAME)
    if not os.path.exists(path):
        return None, None, 0
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("Skipping a malformed line of %s: %r", path, line[:80])
                continue
            if isinstance(record.get("loss"), (int, float)) and math.isfinite(record["loss"]):
                records.append(record)
    if not records:
        return None, None, 0
    last = records[-window:]
    return records[-1].get("step"), sum(record["loss"] for record in last) / len(last), len(last)


def write_model_card(
    output_dir: str,
    args: argparse.Namespace,
    model: ModelMixin,
    num_updates: int,
    vae_source: Optional[str] = None,
) -> str:
    """Write `README.md` into a training output folder.

    The card contains hub metadata (library `diffusers`, tags), the call that loads the folder, the
    dataset and main training flags, the final loss from `train_log.jsonl`, the model config and
    the newest sample grid. The scores of `eval.json` are added when it was written at step
    `num_updates`. An existing `README.md` is replaced.

    Args:
        output_dir (`str`): Training output folder holding the saved pipeline.
        args (`argparse.Namespace`): The training flags.
        model ([`ModelMixin`]): The trained model; its `config` goes into the card.
        num_updates (`int`): Optimizer updates done.
        vae_source (`str`, *optional*): The `--vae` value of a latent-space run.

    Returns:
        `str`: Path of the written card.
    """
    config = {key: value for key, value in model.config.items() if not key.startswith("_")}
    card_data = ModelCardData(
        library_name="diffusers",
        datasets=_hub_dataset(args),
        base_model=vae_source if vae_source and not os.path.isdir(vae_source) else None,
    )
    tags = ["mol-diffusion", "mixture-of-layers", "diffusers:MoLPipeline"]
    tags.append("class-conditional" if denoiser_num_classes(model) is not None else "unconditional")
    if vae_source:
        tags.append("latent-diffusion")

    body = _card_body(output_dir, args, type(model).__name__, config, denoiser_num_classes(model), num_updates, vae_source)
    card = populate_model_card(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"), tags=tags)
    path = os.path.join(output_dir, MODEL_CARD_NAME)
    card.save(path)
    return path


def _hub_dataset(args: argparse.Namespace) -> Optional[list[str]]:
    """Return the dataset as hub metadata when it is a hub dataset id; built-in sets and local folders are not."""
    name = args.dataset_name
    if name is None or name.startswith("builtin:") or os.path.exists(name):
        return None
    return [name]


def _evaluation_lines(output_dir: str, num_updates: int) -> list[str]:
    """Return a Markdown table of the scalar scores in `eval.json`, or nothing when it is missing or stale."""
    path = os.path.join(output_dir, EVALUATION_NAME)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        results = json.load(file)
    if results.get("global_step") != num_updates:
        logger.info(
            "Leaving %s out of the model card: it is from step %s, not %d.", path, results.get("global_step"), num_updates
        )
        return []
    lines = ["", "## Evaluation", "", f"From `{EVALUATION_NAME}`:", "", "| metric | value |", "| --- | --- |"]
    for key, value in sorted(results.items()):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and key != "global_step":
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return lines


def _card_body(
    output_dir: str,
    args: argparse.Namespace,
    model_class: str,
    config: dict[str, Any],
    num_classes: Optional[int],
    num_updates: int,
    vae_source: Optional[str],
) -> str:
    dataset = args.dataset_name or f"local image folder `{os.path.basename(os.path.normpath(args.train_data_dir))}`"
    space = f"the latent space of the VAE `{vae_source}`" if vae_source else "pixel space"
    log_step, loss, num_averaged = final_loss(output_dir)
    if loss is None:
        loss_text = f"not recorded (no `{TRAIN_LOG_NAME}`)"
    else:
        loss_text = f"{loss:.4f} (mean of the last {num_averaged} updates up to step {log_step})"
    call = "pipe(class_labels=[0, 1, 2], guidance_scale=2.0)" if num_classes is not None else "pipe(batch_size=4)"

    lines = [
        f"# {os.path.basename(os.path.normpath(output_dir))}",
        "",
        f"A Mixture-of-Layers diffusion model ({model_class}) trained with mol-diffusion's `train_unet.py` "
        f"in {space}.",
        "",
        "## Usage",
        "",
        "```python",
        "import mol_diffusion  # registers MoLPipeline with diffusers",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{args.hub_model_id or output_dir}")',
        f"images = {call}.images",
        "```",
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| dataset | {dataset} |",
        f"| resolution | {args.resolution} |",
        f"| optimizer updates | {num_updates} |",
        f"| batch size per device | {args.train_batch_size} |",
        f"| gradient accumulation steps | {args.gradient_accumulation_steps} |",
        f"| learning rate | {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up updates) |",
        f"| prediction type | {args.prediction_type} |",
        f"| noise schedule | {args.ddpm_beta_schedule}, {args.ddpm_num_steps} steps |",
        f"| EMA | {'yes, the saved weights are the EMA' if args.use_ema else 'no'} |",
        f"| mixed precision | {args.mixed_precision} |",
        f"| final training loss | {loss_text} |",
        "",
        "## Model config",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, default=str),
        "```",
    ]
    lines += _evaluation_lines(output_dir, num_updates)
    grid = latest_sample_grid(output_dir)
    if grid is not None:
        lines += ["", "## Samples", "", f"![Samples at training step {_grid_step(grid)}]({grid})"]
    return "\n".join(lines) + "\n"
