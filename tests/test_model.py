"""MoLTransformer2DModel: parameters, saving, class labels, call forms, checkpointing, options."""

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from mol_diffusion import MoLTransformer2DModel
from helpers import make_tiny_model, perturb_weights_

HEADS = 2
HEAD_DIM = 8
WIDTH = HEADS * HEAD_DIM
NUM_CLASSES = 4
BATCH = 3


def make_model(perturb=True, **overrides):
    """Tiny model; `perturb` adds noise to every weight so the zero-initialised gates and output open."""
    config = dict(num_pool_blocks=3, num_routing_steps=4, num_classes=NUM_CLASSES)
    return make_tiny_model(perturb, **{**config, **overrides})


def noisy_images(batch_size=BATCH, channels=1, seed=1):
    return torch.randn(batch_size, channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def block_parameter_count(width, mlp_ratio=4):
    """Parameters of one adaLN-Zero block: qkv, output projection, two-layer MLP, 6-way modulation."""
    hidden = mlp_ratio * width
    qkv = width * 3 * width + 3 * width
    out = width * width + width
    mlp = width * hidden + hidden + hidden * width + width
    modulation = width * 6 * width + 6 * width
    return qkv + out + mlp + modulation


# Pool parameters: registered, trained and saved.


def test_pool_parameters_registered():
    # Regression: layers held in a plain tuple are invisible to optimizers and checkpoints.
    model = make_model(perturb=False, num_pool_blocks=3)
    registered = {id(parameter) for parameter in model.parameters()}
    names = [name for name, _ in model.named_parameters()]

    for k, block in enumerate(model.blocks):
        assert all(id(parameter) in registered for parameter in block.parameters()), f"block {k}"
        assert f"blocks.{k}.to_qkv.weight" in names
    pool_count = sum(parameter.numel() for name, parameter in model.named_parameters() if name.startswith("blocks."))
    assert pool_count == 3 * block_parameter_count(WIDTH)


def test_pool_size_sets_parameter_count():
    small = make_model(perturb=False, num_pool_blocks=2, num_routing_steps=6)
    large = make_model(perturb=False, num_pool_blocks=5, num_routing_steps=6)

    difference = large.num_parameters() - small.num_parameters()

    # Routing steps cost no block parameters; each pool block does (plus one router logit row).
    router_logit_row = 16 + 1
    assert difference == 3 * (block_parameter_count(WIDTH) + router_logit_row)


@pytest.mark.parametrize("mode", ["learned", "cyclic"])
def test_optimizer_step_updates_chosen_blocks(mode):
    model = make_model(router_mode=mode, num_pool_blocks=4, num_routing_steps=2)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = noisy_images(batch_size=2)

    out = model(x, torch.tensor([100, 700]), class_labels=torch.tensor([0, 3]), return_routes=True)
    F.mse_loss(out.sample, torch.randn_like(out.sample)).backward()
    optimizer.step()

    chosen = set(out.routes.indices.unique().tolist())
    if mode == "cyclic":
        assert chosen == {0, 1}
    for name, parameter in model.named_parameters():
        if not name.startswith("blocks."):
            continue
        k = int(name.split(".")[1])
        changed = not torch.equal(parameter, before[name])
        assert changed == (k in chosen), name


def test_save_and_load_roundtrip(tmp_path):
    model = make_model(router_granularity="token").eval()
    model.save_pretrained(tmp_path)

    loaded = MoLTransformer2DModel.from_pretrained(tmp_path).eval()

    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    for name, value in model.config.items():
        if not name.startswith("_"):  # private entries record where and how the config was made
            assert loaded.config[name] == value, name
    expected_state = model.state_dict()
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(loaded_state[name], tensor), name
    x = noisy_images()
    labels = torch.tensor([0, 1, 2])
    expected = model(x, 300, class_labels=labels, return_routes=True)
    got = loaded(x, 300, class_labels=labels, return_routes=True)
    # Weights loaded from safetensors are not 64-byte aligned, so SIMD rounding may differ slightly.
    torch.testing.assert_close(got.sample, expected.sample)
    assert torch.equal(got.routes.indices, expected.routes.indices)


# Class labels.


def test_null_class_label_is_num_classes():
    assert make_model(perturb=False).null_class_label == NUM_CLASSES
    assert make_model(perturb=False, num_classes=None).null_class_label is None


@pytest.mark.parametrize("label", [1000, -1, NUM_CLASSES])
def test_out_of_range_label_is_null_class(label):
    model = make_model().eval()
    x = noisy_images()

    unconditional = model(x, 500).sample
    null_labelled = model(x, 500, class_labels=torch.full((BATCH,), label)).sample

    torch.testing.assert_close(null_labelled, unconditional, rtol=0, atol=0)


def test_mixed_labels_map_per_sample():
    model = make_model().eval()
    x = noisy_images()

    mixed = model(x, 500, class_labels=torch.tensor([1000, 2, -1])).sample
    unconditional = model(x, 500).sample
    labelled = model(x, 500, class_labels=torch.tensor([2, 2, 2])).sample

    torch.testing.assert_close(mixed[[0, 2]], unconditional[[0, 2]])
    torch.testing.assert_close(mixed[1], labelled[1])


def test_class_labels_change_output():
    model = make_model().eval()
    x = noisy_images()

    first = model(x, 500, class_labels=torch.tensor([0, 0, 0])).sample
    second = model(x, 500, class_labels=torch.tensor([1, 1, 1])).sample

    assert not torch.allclose(first, second)


def test_route_trace_records_mapped_labels():
    model = make_model()

    routes = model(noisy_images(), 500, class_labels=torch.tensor([1000, 2, -1]), return_routes=True).routes

    assert routes.class_labels.tolist() == [NUM_CLASSES, 2, NUM_CLASSES]
    assert routes.timesteps.tolist() == [500, 500, 500]


# Call forms and timestep forms.


def test_positional_and_keyword_calls_agree():
    model = make_model().eval()
    x = noisy_images()
    timesteps = torch.tensor([10, 20, 30])

    positional = model(x, timesteps).sample
    keyword = model(hidden_states=x, timestep=timesteps, class_labels=None).sample

    torch.testing.assert_close(keyword, positional, rtol=0, atol=0)


@pytest.mark.parametrize(
    "timestep",
    [
        7,
        7.0,
        torch.tensor(7),
        torch.tensor(7.0),
        torch.tensor([7]),
        torch.tensor([7.0]),
        torch.tensor([7.0, 7.0, 7.0]),
    ],
    ids=["int", "float", "0d-int", "0d-float", "1-int", "1-float", "batch-float"],
)
def test_timestep_forms_agree(timestep):
    model = make_model().eval()
    x = noisy_images()
    labels = torch.tensor([0, 1, 2])

    expected = model(x, torch.tensor([7, 7, 7]), class_labels=labels).sample
    got = model(x, timestep, class_labels=labels).sample

    torch.testing.assert_close(got, expected)


def test_per_sample_timesteps_differ():
    model = make_model().eval()
    x = noisy_images(batch_size=1).expand(2, -1, -1, -1)

    sample = model(x, torch.tensor([5, 900])).sample

    assert not torch.allclose(sample[0], sample[1])


@pytest.mark.parametrize("in_channels", [1, 3])
def test_learned_sigma_doubles_channels(in_channels):
    model = make_model(in_channels=in_channels, out_channels=2 * in_channels)

    sample = model(noisy_images(channels=in_channels), 10).sample

    assert sample.shape == (BATCH, 2 * in_channels, 8, 8)


def test_return_dict_false_returns_tuple():
    model = make_model().eval()
    x = noisy_images()

    output = model(x, 10, return_dict=False)

    assert isinstance(output, tuple)
    torch.testing.assert_close(output[0], model(x, 10).sample, rtol=0, atol=0)


def test_routes_absent_unless_requested():
    model = make_model()

    assert model(noisy_images(), 10).routes is None


def test_route_trace_shapes_and_counts():
    model = make_model(num_pool_blocks=3, num_routing_steps=4)

    routes = model(noisy_images(), 10, return_routes=True).routes

    assert routes.indices.shape == (4, BATCH)
    assert routes.probs.shape == (4, BATCH, 3)
    counts = routes.block_counts()
    assert counts.tolist() == [int((routes.indices == k).sum()) for k in range(3)]
    assert counts.sum() == 4 * BATCH


# Gradient checkpointing.


def loss_and_gradients(model):
    model.zero_grad()
    x = noisy_images()
    out = model(x, torch.tensor([3, 400, 800]), class_labels=torch.tensor([0, 1, 2]))
    loss = F.mse_loss(out.sample, torch.ones_like(out.sample)) + out.aux_loss
    loss.backward()
    return loss.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_gradient_checkpointing_keeps_gradients(granularity):
    model = make_model(router_granularity=granularity).train()
    loss, gradients = loss_and_gradients(model)

    model.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model)

    assert model.is_gradient_checkpointing
    torch.testing.assert_close(checkpointed_loss, loss)
    assert checkpointed_gradients.keys() == gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, msg=name)


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_gradient_checkpointing_checkpoints_each_step(granularity):
    model = make_model(router_granularity=granularity, router_mode="cyclic", num_routing_steps=4).train()
    calls = []

    def checkpoint(function, *args):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    loss_and_gradients(model)

    # Cyclic routing sends the whole batch to one block per step: one checkpointed call per step.
    assert len(calls) == 4


# Options.


def test_long_skip_adds_projections():
    plain = make_model(perturb=False, num_routing_steps=5)
    skipped = make_model(num_routing_steps=5, long_skip=True)

    sample = skipped(noisy_images(), 10).sample
    sample.square().mean().backward()

    # One Linear(2D -> D) per mirrored pair of steps: floor(S / 2) of them.
    assert skipped.num_parameters() - plain.num_parameters() == 2 * (2 * WIDTH * WIDTH + WIDTH)
    assert sample.shape == (BATCH, 1, 8, 8)
    for name, parameter in skipped.named_parameters():
        if name.startswith("skip_projections."):
            assert parameter.grad.abs().sum() > 0, name


def test_final_conv_adds_convolution():
    plain = make_model(perturb=False, in_channels=2, out_channels=4)
    convolved = make_model(in_channels=2, out_channels=4, final_conv=True)

    sample = convolved(noisy_images(channels=2), 10).sample
    sample.square().mean().backward()

    # A 3x3 convolution from C_out to C_out channels, with bias.
    assert convolved.num_parameters() - plain.num_parameters() == 4 * 4 * 3 * 3 + 4
    assert sample.shape == (BATCH, 4, 8, 8)
    assert convolved.conv_out.weight.grad.abs().sum() > 0


def test_identity_init_options_keep_fresh_output():
    # Long skips start as [I | 0] and the output conv as a zero residual, so an untrained model with
    # them computes the same prediction as the same weights without them.
    torch.manual_seed(0)
    plain = perturb_weights_(make_model(perturb=False, num_routing_steps=4))
    extended = make_model(perturb=False, num_routing_steps=4, long_skip=True, final_conv=True)
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert all(name.startswith(("skip_projections.", "conv_out.")) for name in missing)

    images = noisy_images()
    expected = plain(images, 10, class_labels=torch.arange(BATCH)).sample
    actual = extended(images, 10, class_labels=torch.arange(BATCH)).sample
    torch.testing.assert_close(actual, expected)


def test_conv_stem_and_head_shapes_and_gradients():
    channels = 6
    model = make_model(in_channels=2, out_channels=4, conv_channels=channels)

    sample = model(noisy_images(channels=2), 10, class_labels=torch.arange(BATCH)).sample
    sample.square().mean().backward()

    assert sample.shape == (BATCH, 4, 8, 8)
    # The patch embedding reads the stem's channels and the final layer writes the head's.
    assert model.patch_embed.proj.in_channels == channels
    assert model.final_layer.linear.out_features == 2 * 2 * channels
    for name, parameter in model.named_parameters():
        if name.startswith(("conv_stem.", "conv_head.")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_conv_head_starts_at_zero_output():
    model = make_model(perturb=False, conv_channels=6)

    sample = model(noisy_images(), 10, class_labels=torch.arange(BATCH)).sample

    assert torch.count_nonzero(sample) == 0
