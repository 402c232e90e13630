"""Validation of MoLTransformer2DModel's config and forward inputs: errors name the argument and value."""

import json

import pytest
import torch

from mol_diffusion import MoLTransformer2DModel

BASE_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=1,
    num_attention_heads=2,
    attention_head_dim=8,
    num_pool_blocks=3,
    num_routing_steps=4,
    router_hidden_size=16,
)
BATCH = 3


def make_model(**overrides):
    return MoLTransformer2DModel(**{**BASE_CONFIG, **overrides})


# Config fields. Each case: overrides, then the (field, value) pairs the message must name.
CONFIG_CASES = {
    "sample_size_zero": (dict(sample_size=0), [("sample_size", 0)]),
    "sample_size_float": (dict(sample_size=8.5), [("sample_size", 8.5)]),
    "sample_size_string": (dict(sample_size="8"), [("sample_size", "8")]),
    "patch_size_not_divisor": (dict(patch_size=3), [("patch_size", 3)]),
    "patch_size_zero": (dict(patch_size=0), [("patch_size", 0)]),
    "in_channels_negative": (dict(in_channels=-1), [("in_channels", -1)]),
    "out_channels_zero": (dict(out_channels=0), [("out_channels", 0)]),
    "heads_negative": (dict(num_attention_heads=-2), [("num_attention_heads", -2)]),
    "head_dim_zero": (dict(attention_head_dim=0), [("attention_head_dim", 0)]),
    "pool_blocks_zero": (dict(num_pool_blocks=0), [("num_pool_blocks", 0)]),
    "routing_steps_zero": (dict(num_routing_steps=0), [("num_routing_steps", 0)]),
    "num_classes_zero": (dict(num_classes=0), [("num_classes", 0)]),
    "num_classes_bool": (dict(num_classes=True), [("num_classes", True)]),
    "mlp_ratio_zero": (dict(mlp_ratio=0), [("mlp_ratio", 0)]),
    "granularity": (dict(router_granularity="x"), [("router_granularity", "x")]),
    "condition": (dict(router_condition="layer"), [("router_condition", "layer")]),
    "router_input": (dict(router_input="pixels"), [("router_input", "pixels")]),
    "mode": (dict(router_mode="foo"), [("router_mode", "foo")]),
    "transform": (dict(router_transform="conv"), [("router_transform", "conv")]),
    "noise": (dict(router_noise="dropout"), [("router_noise", "dropout")]),
    "noise_scale_negative": (dict(router_noise_scale=-0.5), [("router_noise_scale", -0.5)]),
    "jitter_scale_too_large": (
        dict(router_noise="jitter", router_noise_scale=1.5),
        [("router_noise_scale", 1.5)],
    ),
    "router_hidden_size_zero": (dict(router_hidden_size=0), [("router_hidden_size", 0)]),
    "balance_weight_negative": (dict(router_balance_loss_weight=-0.1), [("router_balance_loss_weight", -0.1)]),
    "z_weight_negative": (dict(router_z_loss_weight=-2.5), [("router_z_loss_weight", -2.5)]),
    "long_skip_string": (dict(long_skip="yes"), [("long_skip", "yes")]),
    "final_conv_int": (dict(final_conv=1), [("final_conv", 1)]),
    "conv_channels_zero": (dict(conv_channels=0), [("conv_channels", 0)]),
    "token_without_input": (
        dict(router_granularity="token", router_input="none"),
        [("router_granularity", "token"), ("router_input", "none")],
    ),
    "sequential_pool_mismatch": (
        dict(router_mode="sequential", num_pool_blocks=3, num_routing_steps=5),
        [("num_pool_blocks", 3), ("num_routing_steps", 5)],
    ),
}


@pytest.mark.parametrize("overrides,named", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_invalid_config_raises(overrides, named):
    with pytest.raises(ValueError) as excinfo:
        make_model(**overrides)

    message = str(excinfo.value)
    for field, value in named:
        assert field in message
        assert repr(value) in message or str(value) in message


@pytest.mark.parametrize(
    "field,value", [("router_mode", "foo"), ("num_pool_blocks", 0), ("router_noise_scale", -1.0)]
)
def test_invalid_saved_config_raises(tmp_path, field, value):
    make_model().save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))

    with pytest.raises(ValueError) as excinfo:
        MoLTransformer2DModel.from_pretrained(tmp_path)

    message = str(excinfo.value)
    assert field in message
    assert repr(value) in message


def test_valid_config_edge_values():
    # The smallest legal values: one block, one step, one class, patch as large as the image.
    model = make_model(num_pool_blocks=1, num_routing_steps=1, num_classes=1, patch_size=8)

    sample = model(torch.randn(2, 1, 8, 8), 0, class_labels=torch.tensor([0, 1])).sample

    assert sample.shape == (2, 1, 8, 8)


# Forward inputs. Each case: model kwargs, call kwargs, error type, argument, a fragment showing the bad value.
IMAGES = torch.randn(BATCH, 1, 8, 8)
FORWARD_CASES = {
    "images_list": ({}, dict(hidden_states=IMAGES.tolist(), timestep=1), TypeError, "hidden_states", "list"),
    "images_3d": ({}, dict(hidden_states=IMAGES[:, 0], timestep=1), ValueError, "hidden_states", "(3, 8, 8)"),
    "images_channels": (
        {},
        dict(hidden_states=torch.randn(BATCH, 2, 8, 8), timestep=1),
        ValueError,
        "hidden_states",
        "2 channels",
    ),
    "images_size": ({}, dict(hidden_states=torch.randn(BATCH, 1, 7, 7), timestep=1), ValueError, "hidden_states", "7x7"),
    "images_integer": (
        {},
        dict(hidden_states=torch.zeros(BATCH, 1, 8, 8, dtype=torch.long), timestep=1),
        TypeError,
        "hidden_states",
        "torch.int64",
    ),
    "timestep_missing": ({}, dict(hidden_states=IMAGES), ValueError, "timestep", "required"),
    "timestep_batch": (
        {},
        dict(hidden_states=IMAGES, timestep=torch.tensor([1, 2])),
        ValueError,
        "timestep",
        "(2,)",
    ),
    "timestep_2d": (
        {},
        dict(hidden_states=IMAGES, timestep=torch.ones(BATCH, 1)),
        ValueError,
        "timestep",
        "(3, 1)",
    ),
    "timestep_bool_tensor": (
        {},
        dict(hidden_states=IMAGES, timestep=torch.tensor(True)),
        TypeError,
        "timestep",
        "torch.bool",
    ),
    "timestep_bool": ({}, dict(hidden_states=IMAGES, timestep=True), TypeError, "timestep", "bool"),
    "timestep_string": ({}, dict(hidden_states=IMAGES, timestep="5"), TypeError, "timestep", "str"),
    "labels_unconditional": (
        {},
        dict(hidden_states=IMAGES, timestep=1, class_labels=torch.tensor([0, 1, 2])),
        ValueError,
        "class_labels",
        "num_classes=None",
    ),
    "labels_float": (
        dict(num_classes=4),
        dict(hidden_states=IMAGES, timestep=1, class_labels=torch.tensor([0.0, 1.0, 2.0])),
        TypeError,
        "class_labels",
        "torch.float32",
    ),
    "labels_length": (
        dict(num_classes=4),
        dict(hidden_states=IMAGES, timestep=1, class_labels=torch.tensor([0, 1, 2, 3])),
        ValueError,
        "class_labels",
        "(4,)",
    ),
    "labels_2d": (
        dict(num_classes=4),
        dict(hidden_states=IMAGES, timestep=1, class_labels=torch.zeros(BATCH, 1, dtype=torch.long)),
        ValueError,
        "class_labels",
        "(3, 1)",
    ),
    "labels_list": (
        dict(num_classes=4),
        dict(hidden_states=IMAGES, timestep=1, class_labels=[0, 1, 2]),
        TypeError,
        "class_labels",
        "list",
    ),
}


@pytest.mark.parametrize(
    "model_overrides,call,error,argument,fragment", FORWARD_CASES.values(), ids=FORWARD_CASES.keys()
)
def test_invalid_forward_input_raises(model_overrides, call, error, argument, fragment):
    model = make_model(**model_overrides)

    with pytest.raises(error) as excinfo:
        model(**call)

    message = str(excinfo.value)
    assert f"`{argument}`" in message
    assert fragment in message


@pytest.mark.parametrize("labels", [torch.tensor([2]), torch.tensor(2)], ids=["shape-1", "0d"])
def test_single_label_broadcasts(labels):
    model = make_model(num_classes=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))

    broadcast = model(IMAGES, 1, class_labels=labels).sample
    expected = model(IMAGES, 1, class_labels=torch.tensor([2, 2, 2])).sample

    torch.testing.assert_close(broadcast, expected)
