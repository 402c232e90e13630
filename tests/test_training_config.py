"""Flag and config-file handling of train_unet.py, and the model factory."""

import argparse

import pytest
import yaml

from mol_diffusion import MoLTransformer2DModel
from mol_diffusion.training import ConfigError, build_model, parse_training_args

DATA_FLAGS = ["--dataset_name", "builtin:digits"]


def write_config(tmp_path, values):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_without_config():
    args = parse_training_args(DATA_FLAGS)
    assert args.learning_rate == 1e-4
    assert args.model_config == {}
    assert args.explicit_flags == {"dataset_name"}


def test_config_file_overrides_defaults(tmp_path):
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", "learning_rate": 0.003, "use_ema": True})
    args = parse_training_args(["--config", path])
    assert args.learning_rate == 0.003
    assert args.use_ema is True


def test_command_line_overrides_config_file(tmp_path):
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", "learning_rate": 0.003, "train_batch_size": 64})
    args = parse_training_args(["--config", path, "--learning_rate", "0.5"])
    assert args.learning_rate == 0.5
    assert args.train_batch_size == 64


def test_command_line_default_value_still_overrides(tmp_path):
    # A flag typed on the command line wins even when its value equals the default.
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", "learning_rate": 0.003})
    args = parse_training_args(["--config", path, "--learning_rate", "1e-4"])
    assert args.learning_rate == 1e-4


def test_no_flag_turns_off_config_boolean(tmp_path):
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", "use_ema": True})
    args = parse_training_args(["--config", path, "--no-use_ema"])
    assert args.use_ema is False


def test_model_mapping_is_kept(tmp_path):
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", "model": {"num_pool_blocks": 3}})
    args = parse_training_args(["--config", path])
    assert args.model_config == {"num_pool_blocks": 3}


def test_yaml_exponent_string_is_a_number(tmp_path):
    # PyYAML reads 1e-3 (no dot) as the string "1e-3".
    path = tmp_path / "config.yaml"
    path.write_text("dataset_name: builtin:digits\nlearning_rate: 1e-3\n")
    args = parse_training_args(["--config", str(path)])
    assert args.learning_rate == pytest.approx(0.001)


def test_null_config_value_for_optional_flag(tmp_path):
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", "max_train_steps": None})
    args = parse_training_args(["--config", path])
    assert args.max_train_steps is None


def test_unknown_config_key_suggests_closest(tmp_path):
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", "lerning_rate": 0.1})
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'; did you mean 'learning_rate'"):
        parse_training_args(["--config", path])


def test_unknown_model_key_suggests_closest(tmp_path):
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", "model": {"num_pool_block": 3}})
    with pytest.raises(ConfigError, match="'num_pool_block'; did you mean 'num_pool_blocks'"):
        parse_training_args(["--config", path])


def test_unknown_flag_suggests_closest():
    with pytest.raises(ConfigError, match="unknown flag '--lerning_rate'; did you mean '--learning_rate'"):
        parse_training_args(DATA_FLAGS + ["--lerning_rate", "0.1"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_batch_size", "0"], "train_batch_size=0 is invalid"),
        (["--max_train_steps", "-3"], "max_train_steps=-3 is invalid"),
        (["--learning_rate", "-1"], "learning_rate=-1.0 is invalid"),
        (["--learning_rate", "nan"], "learning_rate=nan is invalid"),
        (["--class_dropout_prob", "1.5"], "class_dropout_prob=1.5 is invalid"),
        (["--adam_beta1", "1.0"], "adam_beta1=1.0 is invalid"),
        (["--snr_gamma", "0"], "snr_gamma=0.0 is invalid"),
        (["--ema_min_decay", "0.5", "--ema_max_decay", "0.1"], "ema_min_decay=0.5 is larger than"),
        (["--lr_scheduler", "cosine_warm"], "invalid choice"),
        (["--train_batch_size", "eight"], "invalid int value"),
    ],
)
def test_bad_flag_value_rejected(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_training_args(DATA_FLAGS + flags)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train_batch_size", "eight", "expected a number"),
        ("train_batch_size", 2.5, "expected a whole number"),
        ("train_batch_size", True, "expected a number, got bool"),
        ("use_ema", "yes", "expected true or false"),
        ("prediction_type", "noise", "invalid choice"),
        ("resolution", None, "needs a value; remove the key to use the default 64"),
        ("class_dropout_prob", -0.1, "class_dropout_prob=-0.1 is invalid"),
    ],
)
def test_bad_config_value_rejected(tmp_path, key, value, message):
    path = write_config(tmp_path, {"dataset_name": "builtin:digits", key: value})
    with pytest.raises(ConfigError, match=message):
        parse_training_args(["--config", path])


def test_missing_dataset_rejected():
    with pytest.raises(ConfigError, match="--dataset_name"):
        parse_training_args([])


def test_both_data_sources_rejected(tmp_path):
    with pytest.raises(ConfigError, match="keep one of them"):
        parse_training_args(DATA_FLAGS + ["--train_data_dir", str(tmp_path)])


def test_missing_config_file_rejected(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        parse_training_args(["--config", str(tmp_path / "absent.yaml")])


def test_config_file_must_be_mapping(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("- learning_rate\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_training_args(["--config", str(path)])


def tiny_args(model_config=None, **flags):
    args = argparse.Namespace(
        model="mol",
        resolution=8,
        router_balance_loss_weight=None,
        router_z_loss_weight=None,
        model_config={
            "patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 8,
            "num_pool_blocks": 2, "num_routing_steps": 2, **(model_config or {}),
        },
    )
    vars(args).update(flags)
    return args


def test_build_model_takes_dataset_facts():
    model = build_model(tiny_args(), num_classes=10, num_channels=3)
    assert isinstance(model, MoLTransformer2DModel)
    assert model.config.sample_size == 8
    assert model.config.in_channels == 3
    assert model.config.num_classes == 10


def test_build_model_explicit_null_classes_is_unconditional():
    model = build_model(tiny_args({"num_classes": None}), num_classes=10, num_channels=1)
    assert model.config.num_classes is None


def test_build_model_router_flags_override_config():
    args = tiny_args({"router_z_loss_weight": 0.5}, router_z_loss_weight=0.25, router_balance_loss_weight=0.0)
    model = build_model(args, num_classes=None, num_channels=1)
    assert model.config.router_z_loss_weight == 0.25
    assert model.config.router_balance_loss_weight == 0.0
