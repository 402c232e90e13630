"""Command-line flags and YAML config files for the training script.

`parse_training_args` merges three sources, highest precedence first: flags given on the
command line, top-level keys of the `--config` YAML file, and the flag defaults. The YAML
file's `model:` mapping holds constructor arguments of the model class that `--model`
selects. Every key is checked by name, type and range, and each problem raises
`ConfigError` with a message that names the key, the value and the fix.
"""

import argparse
import difflib
import inspect
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import yaml
from accelerate.utils import is_tensorboard_available, is_wandb_available
from diffusers.optimization import SchedulerType

from .errors import ConfigError
from .latents import LATENT_SAMPLING_CHOICES
from .models import MODEL_CHOICES, model_class

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
LOGGER_CHOICES = ("none", "tensorboard", "wandb")
# Namespace entries left out of training_args.json and tracker configs: bookkeeping, and secrets.
NOT_RECORDED_FLAGS = ("explicit_flags", "hub_token")
# piecewise_constant needs step rules, which no flag sets.
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType if kind.value != "piecewise_constant")


class _ConfigArgumentParser(argparse.ArgumentParser):
    """ArgumentParser that raises `ConfigError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise ConfigError(f"{message} (run with --help to list the flags)")


def build_parser() -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    """Build the training flag parser.

    Returns:
        `tuple[argparse.ArgumentParser, list[argparse.Action]]`: The parser and the actions of
        every flag except `--help`, in the order they were added.
    """
    parser = _ConfigArgumentParser(
        description="Train a Mixture of Layers diffusion model (or a dense baseline) with accelerate.",
        allow_abbrev=False,
    )
    actions = []

    def add(*names, **kwargs):
        actions.append(parser.add_argument(*names, **kwargs))

    # Config file and model family.
    add("--config", type=str, default=None,
        help="YAML file whose top-level keys are flag names and whose `model:` mapping holds model "
             "constructor arguments. Flags given on the command line override the file.")
    add("--model", type=str, default="mol", choices=MODEL_CHOICES,
        help="Backbone: `mol` (MoLTransformer2DModel), `dit` (diffusers DiTTransformer2DModel) or "
             "`unet` (diffusers UNet2DModel).")

    # Data.
    add("--dataset_name", type=str, default=None,
        help="`builtin:mnist5k`, `builtin:digits`, a dataset name for `datasets.load_dataset`, or a local "
             "dataset folder.")
    add("--dataset_config_name", type=str, default=None, help="Config name of the dataset, if it has several.")
    add("--train_data_dir", type=str, default=None,
        help="Local image folder to train on instead of --dataset_name; sub-folders are class labels.")
    add("--cache_dir", type=str, default=None, help="Cache folder for `datasets`.")
    add("--resolution", type=int, default=64, help="Training image size in pixels (images are square).")
    add("--center_crop", action=argparse.BooleanOptionalAction, default=False,
        help="Center-crop to --resolution after resizing instead of cropping at a random position.")
    add("--random_flip", action=argparse.BooleanOptionalAction, default=False,
        help="Flip training images horizontally with probability 0.5.")
    add("--train_batch_size", type=int, default=16, help="Batch size per device for training.")
    add("--eval_batch_size", type=int, default=8,
        help="Images per row of the sample grids: per class when the model is class-conditional.")
    add("--dataloader_num_workers", type=int, default=0,
        help="DataLoader worker processes; 0 loads data in the main process.")

    # Length of training and optimisation.
    add("--num_epochs", type=int, default=100, help="Training epochs; ignored when --max_train_steps is set.")
    add("--max_train_steps", type=int, default=None,
        help="Total optimizer updates; overrides --num_epochs when set.")
    add("--max_train_minutes", type=float, default=None,
        help="Stop at the first optimizer update past this many minutes of training, then save a checkpoint and "
             "the pipeline as at the end. Minutes are counted as `elapsed_seconds` in train_log.jsonl: wall-clock "
             "time of the training loop, sample grids and checkpoints included, summed over resumed runs. The "
             "learning-rate schedule still spans --max_train_steps (or --num_epochs).")
    add("--gradient_accumulation_steps", type=int, default=1,
        help="Batches whose gradients are accumulated before each optimizer update.")
    add("--learning_rate", type=float, default=1e-4, help="Peak learning rate, reached after the warm-up.")
    add("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS,
        help="Learning-rate schedule from `diffusers.optimization.get_scheduler`.")
    add("--lr_warmup_steps", type=int, default=500, help="Optimizer updates of linear learning-rate warm-up.")
    add("--adam_beta1", type=float, default=0.95, help="AdamW beta1.")
    add("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    add("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay.")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient norm clipping threshold.")

    # Exponential moving average of the weights.
    add("--use_ema", action=argparse.BooleanOptionalAction, default=False,
        help="Keep an EMA of the weights; sample grids and the saved pipeline use the EMA weights.")
    add("--ema_inv_gamma", type=float, default=1.0, help="Inverse gamma of the EMA warm-up schedule.")
    add("--ema_power", type=float, default=3 / 4, help="Power of the EMA warm-up schedule.")
    add("--ema_max_decay", type=float, default=0.9999, help="Maximum EMA decay.")
    add("--ema_min_decay", type=float, default=0.0, help="Minimum EMA decay.")

    # Diffusion objective.
    add("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"),
        help="Mixed precision mode for accelerate.")
    add("--prediction_type", type=str, default="epsilon", choices=PREDICTION_TYPES,
        help="What the model predicts: the noise, the velocity v or the clean sample.")
    add("--ddpm_num_steps", type=int, default=1000, help="Diffusion timesteps of the DDPMScheduler.")
    add("--ddpm_beta_schedule", type=str, default="linear", choices=BETA_SCHEDULES,
        help="Beta schedule of the DDPMScheduler.")
    add("--snr_gamma", type=float, default=None,
        help="Min-SNR loss weighting gamma (5.0 is the usual value); unset means unweighted MSE.")
    add("--class_dropout_prob", type=float, default=0.1,
        help="Probability of replacing a class label by the null class, for classifier-free guidance.")
    add("--router_balance_loss_weight", type=float, default=None,
        help="Weight of the router load-balance loss; sets the model config field of the same name.")
    add("--router_z_loss_weight", type=float, default=None,
        help="Weight of the router z-loss; sets the model config field of the same name.")

    # Checkpoints, samples and logs.
    add("--output_dir", type=str, default="outputs/mol-model",
        help="Folder for checkpoints, sample grids, logs and the final pipeline.")
    add("--checkpointing_steps", type=int, default=500,
        help="Save an accelerate checkpoint `checkpoint-N` every this many optimizer updates.")
    add("--checkpoints_total_limit", type=int, default=None,
        help="Keep at most this many checkpoints; the oldest are deleted.")
    add("--resume_from_checkpoint", type=str, default=None,
        help="`latest` or a checkpoint folder (absolute, or relative to --output_dir) to resume from.")
    add("--seed", type=int, default=None, help="Random seed for model initialisation, data order and noise.")
    add("--logger", type=str, default="none", choices=LOGGER_CHOICES, help="Experiment tracker.")
    add("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir.")
    add("--log_every_steps", type=int, default=50,
        help="Log the route count of each pool block over this many updates; 0 turns it off.")
    add("--router_collapse_threshold", type=float, default=0.9,
        help="Warn when one pool block takes more than this share of the routes within a --log_every_steps "
             "window (learned routing only).")
    add("--route_plot_every_steps", type=int, default=0,
        help="Write `routes/step-N.png` (route heatmaps of a fixed batch noised to 10 timesteps) every this "
             "many updates and at the end; 0 turns it off.")
    add("--sample_every_steps", type=int, default=0,
        help="Write `samples/step-N.png` every this many updates and at the end; 0 turns it off.")
    add("--sample_inference_steps", type=int, default=50, help="DDIM steps for the sample grids.")
    add("--sample_guidance_scale", type=float, default=1.0,
        help="Classifier-free guidance scale for the sample grids; 1.0 means no guidance.")
    add("--max_nonfinite_steps", type=int, default=10,
        help="Stop with a checkpoint after this many consecutive updates with a non-finite loss.")

    # Evaluation of the saved pipeline.
    add("--eval_at_end", action=argparse.BooleanOptionalAction, default=False,
        help="After saving the pipeline, sample --eval_num_samples images with DDIM and write the Frechet distance "
             "in digit-classifier features, its real-data floor and the class accuracy to eval.json in "
             "--output_dir (as `python -m mol_diffusion.evaluation` does).")
    add("--eval_num_samples", type=int, default=1000,
        help="Images sampled for --eval_at_end; at least 2, and no more per class than the floor split holds.")
    add("--eval_guidance_scale", type=float, default=1.0,
        help="Classifier-free guidance scale for --eval_at_end; 1.0 means no guidance.")
    add("--eval_inference_steps", type=int, default=50, help="DDIM steps for --eval_at_end.")
    add("--eval_dataset_name", type=str, default=None,
        help="Labelled dataset with `train` and `test` splits that scores --eval_at_end (its classifier and "
             "held-out split); defaults to --dataset_name.")

    # Latent space, speed and publishing.
    add("--vae", type=str, default=None,
        help="Train in the latent space of this AutoencoderKL: a local folder saved with save_pretrained, or a "
             "hub id such as stabilityai/sd-vae-ft-ema (needs network access). The model's in_channels and "
             "sample_size then default to the latent channels and --resolution / the VAE downscale factor, and "
             "the saved pipeline includes the VAE.")
    add("--vae_latent_sampling", type=str, default="sample", choices=LATENT_SAMPLING_CHOICES,
        help="Encode images to a sample of the VAE posterior (`sample`) or to its mean (`mode`).")
    add("--cache_latents", action=argparse.BooleanOptionalAction, default=False,
        help="Encode the whole dataset with the VAE once before training instead of every batch. Faster, but "
             "random crops and flips are drawn once, not per epoch. Needs --vae.")
    add("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
        help="Recompute block activations in the backward pass: less memory, about one more forward pass of compute.")
    add("--torch_compile", action=argparse.BooleanOptionalAction, default=False,
        help="Compile the model with torch.compile (inductor). The first updates take minutes to compile.")
    add("--push_to_hub", action=argparse.BooleanOptionalAction, default=False,
        help="Upload the output folder (pipeline, model card, sample grids, log; no checkpoints) to the Hugging "
             "Face Hub at the end. Needs network access and a token; not tested offline.")
    add("--hub_model_id", type=str, default=None,
        help="Hub repository for --push_to_hub, `namespace/name` or `name`; defaults to the --output_dir name.")
    add("--hub_token", type=str, default=None,
        help="Hub token for --push_to_hub; by default the token of `hf auth login` or the HF_TOKEN variable. "
             "Never written to training_args.json or sent to trackers.")
    return parser, actions


# Range checks applied after merging, so flags and config keys get the same checks.
_POSITIVE_INTS = (
    "resolution", "train_batch_size", "eval_batch_size", "num_epochs", "max_train_steps",
    "gradient_accumulation_steps", "ddpm_num_steps", "checkpointing_steps", "checkpoints_total_limit",
    "sample_inference_steps", "max_nonfinite_steps", "eval_inference_steps",
)
_NON_NEGATIVE_INTS = (
    "dataloader_num_workers", "lr_warmup_steps", "log_every_steps", "sample_every_steps", "route_plot_every_steps",
)
_POSITIVE_FLOATS = (
    "learning_rate", "adam_epsilon", "max_grad_norm", "ema_inv_gamma", "snr_gamma", "max_train_minutes",
)
_NON_NEGATIVE_FLOATS = (
    "adam_weight_decay", "ema_power", "router_balance_loss_weight", "router_z_loss_weight",
    "sample_guidance_scale", "eval_guidance_scale",
)
_PROBABILITIES = ("class_dropout_prob", "ema_max_decay", "ema_min_decay", "router_collapse_threshold")
_HALF_OPEN_UNIT = ("adam_beta1", "adam_beta2")


def parse_training_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse training flags and the optional `--config` YAML file into one namespace.

    Args:
        argv (`Sequence[str]`, *optional*):
            Command-line arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        `argparse.Namespace`: One attribute per flag, plus `model_config` (`dict`, the YAML
        file's `model:` mapping, empty without a file) and `explicit_flags` (`set[str]`, the
        flags given on the command line).

    Raises:
        ConfigError: For an unknown flag or key, a value of the wrong type or range, or an
            unreadable config file.
    """
    parser, actions = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        option_strings = [name for action in actions for name in action.option_strings]
        raise ConfigError(_unknown_name_message("flag", unknown[0].split("=")[0], option_strings))

    # Parse again with a parser whose defaults are all suppressed: what remains was typed on the
    # command line.
    explicit_parser, explicit_actions = build_parser()
    for action in explicit_actions:
        action.default = argparse.SUPPRESS
    explicit = vars(explicit_parser.parse_args(argv))

    args.model_config = {}
    if args.config is not None:
        file_values, args.model_config = load_config_file(args.config, actions)
        for key, value in file_values.items():
            if key not in explicit:
                setattr(args, key, value)
    args.explicit_flags = set(explicit)

    validate_args(args)
    validate_model_config(args.model, args.model_config, source=args.config)
    return args


def load_config_file(path: str, actions: list[argparse.Action]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a YAML config file and check its keys and value types against the flags.

    Args:
        path (`str`): YAML file path.
        actions (`list[argparse.Action]`): The flag actions from `build_parser`.

    Returns:
        `tuple[dict, dict]`: The flag values and the `model:` mapping (empty when absent).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: file not found; pass the path of a YAML config file.")
    with open(path, encoding="utf-8") as file:
        try:
            document = yaml.safe_load(file)
        except yaml.YAMLError as error:
            message = " ".join(str(error).split())  # PyYAML's message spans several indented lines
            raise ConfigError(f"--config {path!r} is not valid YAML: {message}") from None

    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(
            f"--config {path!r}: expected a mapping of flag names to values, got {type(document).__name__}."
        )

    model_config = document.pop("model", None)
    if model_config is None:  # no `model:` key, or an empty one
        model_config = {}
    if not isinstance(model_config, dict):
        raise ConfigError(f"{path}: `model:` must be a mapping of model arguments, got {model_config!r}.")

    actions_by_key = {action.dest: action for action in actions if action.dest not in ("config", "help")}
    values = {}
    for key, value in document.items():
        if key not in actions_by_key:
            raise ConfigError(f"{path}: " + _unknown_name_message("key", str(key), [*actions_by_key, "model"]))
        values[key] = _coerce_config_value(path, key, value, actions_by_key[key])
    return values, model_config


def _coerce_config_value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """Check a config value against its flag's type and choices; numeric strings such as `1e-3` become numbers."""
    where = f"{path}: {key}={value!r}"
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"{where}: this key needs a value; remove the key to use the default {action.default!r}.")

    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false.")
        return value

    if action.type in (int, float):
        # PyYAML reads `1e-3` (no dot) as a string, so numeric strings are accepted.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__}.")
        if action.type is int:
            if not float(value).is_integer():
                raise ConfigError(f"{where}: expected a whole number.")
            value = int(value)
        else:
            value = float(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__}.")

    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: invalid choice; use one of {', '.join(map(str, action.choices))}.")
    return value


def validate_args(args: argparse.Namespace) -> None:
    """Check value ranges and combinations of the merged flags; raise `ConfigError` on the first problem."""
    for key in _POSITIVE_INTS:
        _check(args, key, lambda v: v >= 1, "must be a positive whole number")
    for key in _NON_NEGATIVE_INTS:
        _check(args, key, lambda v: v >= 0, "must be 0 or more")
    for key in _POSITIVE_FLOATS:
        _check(args, key, lambda v: math.isfinite(v) and v > 0, "must be a positive number")
    for key in _NON_NEGATIVE_FLOATS:
        _check(args, key, lambda v: math.isfinite(v) and v >= 0, "must be 0 or more")
    for key in _PROBABILITIES:
        _check(args, key, lambda v: 0.0 <= v <= 1.0, "must be a probability in [0, 1]")
    for key in _HALF_OPEN_UNIT:
        _check(args, key, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    _check(args, "eval_num_samples", lambda v: v >= 2, "must be a whole number >= 2 to fit a covariance")
    # accelerate's set_seed also seeds NumPy, which accepts seeds in [0, 2**32).
    _check(args, "seed", lambda v: 0 <= v < 2**32, "must be a whole number in [0, 4294967295]")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ConfigError(f"--output_dir {args.output_dir!r} is a file, not a folder; pass a folder path.")

    if args.ema_min_decay > args.ema_max_decay:
        raise ConfigError(
            f"ema_min_decay={args.ema_min_decay} is larger than ema_max_decay={args.ema_max_decay}; "
            "lower ema_min_decay or raise ema_max_decay."
        )
    if args.dataset_name is None and args.train_data_dir is None:
        raise ConfigError("no training data: set --dataset_name (e.g. builtin:mnist5k) or --train_data_dir.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ConfigError(
            f"both --dataset_name={args.dataset_name!r} and --train_data_dir={args.train_data_dir!r} are set; "
            "keep one of them."
        )
    if args.logger == "tensorboard" and not is_tensorboard_available():
        raise ConfigError("--logger tensorboard needs the tensorboard package: pip install tensorboard")
    if args.logger == "wandb" and not is_wandb_available():
        raise ConfigError("--logger wandb needs the wandb package: pip install wandb")
    if args.eval_at_end and args.eval_dataset_name is None and args.dataset_name is None:
        raise ConfigError(
            f"--eval_at_end needs a labelled dataset with train and test splits, but training reads the folder "
            f"--train_data_dir={args.train_data_dir!r}; set --eval_dataset_name (e.g. builtin:mnist5k)."
        )
    if args.cache_latents and args.vae is None:
        raise ConfigError("--cache_latents needs --vae: latents are cached only when training in latent space.")
    if args.hub_token is not None and args.logger == "wandb":
        # wandb records the command line, so the token would be stored with the run.
        raise ConfigError(
            "--hub_token cannot be combined with --logger wandb, which would record the token; "
            "log in with `hf auth login` or set HF_TOKEN instead."
        )


def _check(args: argparse.Namespace, key: str, is_valid, requirement: str) -> None:
    value = getattr(args, key)
    if value is not None and not is_valid(value):
        raise ConfigError(f"{key}={value!r} is invalid: it {requirement}.")


def validate_model_config(model: str, model_config: dict[str, Any], source: Optional[str] = None) -> None:
    """Check that every `model:` key is a constructor argument of the model class for `--model`.

    Args:
        model (`str`): The `--model` value.
        model_config (`dict`): The `model:` mapping of the config file.
        source (`str`, *optional*): Config file path, used in error messages.
    """
    signature = inspect.signature(model_class(model).__init__)
    valid = [name for name, parameter in signature.parameters.items()
             if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)]
    prefix = f"{source}: " if source else ""
    for key in model_config:
        if key not in valid:
            raise ConfigError(
                prefix + _unknown_name_message(f"model key for --model {model}", str(key), valid)
            )


def _unknown_name_message(kind: str, name: str, valid: Sequence[str]) -> str:
    suggestions = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"did you mean {suggestions[0]!r}?" if suggestions else f"valid names: {', '.join(sorted(valid))}."
    return f"unknown {kind} {name!r}; {hint}"


def config_for_trackers(args: argparse.Namespace) -> dict[str, Any]:
    """Flatten the namespace into scalar values that experiment trackers accept."""
    config = {}
    for key, value in vars(args).items():
        if key in NOT_RECORDED_FLAGS:
            continue
        if key == "model_config":
            config.update({f"model.{name}": _scalar(item) for name, item in value.items()})
        else:
            config[key] = _scalar(value)
    return config


def _scalar(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)
