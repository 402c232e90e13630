"""LayerRouter: gradient to the router, hard selection, noise, fixed orders, aux losses, transform."""

import math

import pytest
import torch
import torch.nn.functional as F

from mol_diffusion.models.dispatch import scale_update

from helpers import make_tiny_model

NUM_BLOCKS = 3
NUM_STEPS = 4
NUM_CLASSES = 5


def make_model(perturb=True, **overrides):
    """Tiny model; `perturb` adds noise to every weight so the zero-initialised adaLN gates open."""
    config = dict(num_pool_blocks=NUM_BLOCKS, num_routing_steps=NUM_STEPS, num_classes=NUM_CLASSES)
    return make_tiny_model(perturb, **{**config, **overrides})


def make_inputs(batch_size=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 1, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return x, timesteps, labels


def capture_logits(model, detach=True):
    """Record the router's logits at every routing step (the output of its last layer).

    With `detach=False` the logits stay in the autograd graph, so a reference loss built from them
    can be differentiated.
    """
    logits = []
    model.router.out_proj.register_forward_hook(
        lambda module, args, output: logits.append(output.detach() if detach else output)
    )
    return logits


# Gradient to the router from the diffusion loss alone.

ROUTER_SETTINGS = [
    (granularity, condition, router_input)
    for granularity in ("sample", "token")
    for condition in ("step", "timestep", "step_and_timestep")
    for router_input in ("activations", "none")
    if not (granularity == "token" and router_input == "none")
]


@pytest.mark.parametrize("granularity,condition,router_input", ROUTER_SETTINGS)
def test_router_gets_gradient(granularity, condition, router_input):
    # Regression: a straight-through estimator written as `hard + soft - soft` cancels to zero.
    # With the index then cast through int, the router would never learn.
    model = make_model(router_granularity=granularity, router_condition=condition, router_input=router_input)
    x, timesteps, labels = make_inputs()

    sample = model(x, timesteps, class_labels=labels).sample
    F.mse_loss(sample, torch.randn_like(sample)).backward()

    router_parameters = dict(model.router.named_parameters())
    assert router_parameters
    for name, parameter in router_parameters.items():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("probs_shape", [(4,), (4, 5)], ids=["sample", "token"])
def test_scale_update_passes_gradient(probs_shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 8, generator=generator)
    x_new = torch.randn(4, 5, 8, generator=generator)
    upstream = torch.randn(4, 5, 8, generator=generator)
    probs = torch.rand(probs_shape, generator=generator).requires_grad_(True)
    x.requires_grad_(True)
    x_new.requires_grad_(True)

    out = scale_update(x, x_new, probs)
    (out * upstream).sum().backward()

    assert torch.equal(out, x_new)
    # dL/dp is the inner product of the residual update with the upstream gradient.
    inner = ((x_new - x) * upstream).sum(dim=-1)  # (B, T)
    expected = inner.sum(dim=1) if len(probs_shape) == 1 else inner
    torch.testing.assert_close(probs.grad, expected)
    # The scale is 1 in value: the block output gets the upstream gradient, and the input nothing.
    torch.testing.assert_close(x_new.grad, upstream)
    assert x.grad is None or torch.count_nonzero(x.grad) == 0


# Hard selection, exploration noise in training only.


def test_gumbel_changes_routes_in_training():
    model = make_model(perturb=False, num_pool_blocks=4, router_noise="gumbel", router_noise_scale=5.0).train()
    x, timesteps, labels = make_inputs(batch_size=8)

    torch.manual_seed(10)
    first = model(x, timesteps, class_labels=labels, return_routes=True).routes
    torch.manual_seed(11)
    second = model(x, timesteps, class_labels=labels, return_routes=True).routes

    assert not torch.equal(first.indices, second.indices)


def test_jitter_changes_probs_in_training():
    model = make_model(perturb=False, router_noise="jitter", router_noise_scale=0.5).train()
    x, timesteps, labels = make_inputs()

    torch.manual_seed(10)
    first = model(x, timesteps, class_labels=labels, return_routes=True).routes
    torch.manual_seed(11)
    second = model(x, timesteps, class_labels=labels, return_routes=True).routes

    assert not torch.allclose(first.probs, second.probs)


@pytest.mark.parametrize("noise,scale", [("gumbel", 5.0), ("jitter", 0.5)])
def test_eval_routing_is_deterministic(noise, scale):
    model = make_model(router_noise=noise, router_noise_scale=scale).eval()
    x, timesteps, labels = make_inputs()

    torch.manual_seed(10)
    first = model(x, timesteps, class_labels=labels, return_routes=True)
    torch.manual_seed(11)
    second = model(x, timesteps, class_labels=labels, return_routes=True)

    assert torch.equal(first.sample, second.sample)
    assert torch.equal(first.routes.indices, second.routes.indices)


@pytest.mark.parametrize("noise,scale", [("gumbel", 5.0), ("jitter", 0.5)])
def test_eval_routing_ignores_noise(noise, scale):
    noisy = make_model(router_noise=noise, router_noise_scale=scale).eval()
    clean = make_model(router_noise="none").eval()
    clean.load_state_dict(noisy.state_dict())
    x, timesteps, labels = make_inputs()

    noisy_out = noisy(x, timesteps, class_labels=labels, return_routes=True)
    clean_out = clean(x, timesteps, class_labels=labels, return_routes=True)

    assert torch.equal(noisy_out.routes.indices, clean_out.routes.indices)
    assert torch.equal(noisy_out.sample, clean_out.sample)


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_route_index_is_softmax_argmax(granularity):
    model = make_model(router_granularity=granularity).eval()
    logits = capture_logits(model)
    x, timesteps, labels = make_inputs()

    routes = model(x, timesteps, class_labels=labels, return_routes=True).routes

    assert len(logits) == NUM_STEPS
    expected_probs = torch.stack(logits).softmax(dim=-1)  # (S, B, K) or (S, B, T, K)
    torch.testing.assert_close(routes.probs, expected_probs)
    torch.testing.assert_close(routes.probs.sum(dim=-1), torch.ones(routes.probs.shape[:-1]))
    assert torch.equal(routes.indices, routes.probs.argmax(dim=-1))


# Fixed orders.


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_cyclic_order(granularity):
    model = make_model(router_mode="cyclic", router_granularity=granularity, num_pool_blocks=3, num_routing_steps=7)
    x, timesteps, labels = make_inputs()

    routes = model(x, timesteps, class_labels=labels, return_routes=True).routes

    for step in range(7):
        assert (routes.indices[step] == step % 3).all(), f"step {step}"


def test_cyclic_token_one_call_per_step(caplog):
    # A fixed order gives every token the same block, so each step runs one block on the whole batch.
    with caplog.at_level("WARNING", logger="mol_diffusion.models.mol_transformer_2d"):
        model = make_model(router_mode="cyclic", router_granularity="token", num_pool_blocks=3, num_routing_steps=4)
    batch_sizes = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    x, timesteps, labels = make_inputs()

    model(x, timesteps, class_labels=labels)

    assert batch_sizes == [x.shape[0]] * 4
    assert "router_granularity='token' has no effect" in caplog.text


def test_sequential_order():
    model = make_model(router_mode="sequential", num_pool_blocks=5, num_routing_steps=5)
    x, timesteps, labels = make_inputs()

    routes = model(x, timesteps, class_labels=labels, return_routes=True).routes

    for step in range(5):
        assert (routes.indices[step] == step).all(), f"step {step}"


@pytest.mark.parametrize(
    "mode,num_blocks,num_steps", [("cyclic", 3, 7), ("sequential", 4, 4)], ids=["cyclic", "sequential"]
)
def test_fixed_routing_aux_loss_is_zero(mode, num_blocks, num_steps):
    model = make_model(router_mode=mode, num_pool_blocks=num_blocks, num_routing_steps=num_steps)
    x, timesteps, labels = make_inputs()

    out = model(x, timesteps, class_labels=labels)

    assert out.aux_loss.item() == 0.0
    assert out.balance_loss.item() == 0.0
    assert out.z_loss.item() == 0.0


def test_sequential_rejects_pool_size_mismatch():
    with pytest.raises(ValueError, match="num_pool_blocks"):
        make_model(perturb=False, router_mode="sequential", num_pool_blocks=3, num_routing_steps=4)


# Auxiliary losses.


def set_router_output(model, bias):
    """Make the router's logits the constant `bias` (K,) for every decision."""
    with torch.no_grad():
        model.router.out_proj[-1].weight.zero_()
        model.router.out_proj[-1].bias.copy_(torch.tensor(bias))


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_balance_loss_uniform_probs_is_one(granularity):
    model = make_model(router_granularity=granularity)
    set_router_output(model, [0.0] * NUM_BLOCKS)
    x, timesteps, labels = make_inputs()

    out = model(x, timesteps, class_labels=labels)

    torch.testing.assert_close(out.balance_loss, torch.tensor(1.0))
    torch.testing.assert_close(out.z_loss, torch.tensor(math.log(NUM_BLOCKS) ** 2))


def test_balance_loss_single_block_is_num_blocks():
    model = make_model()
    set_router_output(model, [0.0, 40.0, 0.0])
    x, timesteps, labels = make_inputs()

    out = model(x, timesteps, class_labels=labels, return_routes=True)

    assert (out.routes.indices == 1).all()
    torch.testing.assert_close(out.balance_loss, torch.tensor(float(NUM_BLOCKS)))


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_balance_loss_matches_formula(granularity):
    model = make_model(router_granularity=granularity)
    x, timesteps, labels = make_inputs()

    out = model(x, timesteps, class_labels=labels, return_routes=True)

    # Over all steps and samples (or tokens) together: K * sum_k f_k * P_k.
    probs = out.routes.probs.reshape(-1, NUM_BLOCKS)
    share = F.one_hot(out.routes.indices.reshape(-1), NUM_BLOCKS).float().mean(dim=0)
    expected = NUM_BLOCKS * (share * probs.mean(dim=0)).sum()
    torch.testing.assert_close(out.balance_loss, expected)


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_z_loss_is_mean_squared_logsumexp(granularity):
    model = make_model(router_granularity=granularity)
    logits = capture_logits(model)
    x, timesteps, labels = make_inputs()

    out = model(x, timesteps, class_labels=labels)

    expected = torch.stack(logits).logsumexp(dim=-1).square().mean()
    torch.testing.assert_close(out.z_loss, expected)


def test_aux_loss_uses_config_weights():
    model = make_model(router_balance_loss_weight=0.3, router_z_loss_weight=0.05)
    x, timesteps, labels = make_inputs()

    out = model(x, timesteps, class_labels=labels)

    torch.testing.assert_close(out.aux_loss, 0.3 * out.balance_loss + 0.05 * out.z_loss)


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_aux_loss_gradient_matches_formula(granularity):
    # The model sums the losses per decision, with the softmax over a leading block dimension. The
    # reference applies the textbook formulas to all logits joined into one tensor.
    model = make_model(router_granularity=granularity, router_balance_loss_weight=0.3, router_z_loss_weight=0.05)
    logits = capture_logits(model, detach=False)
    x, timesteps, labels = make_inputs()

    out = model(x, timesteps, class_labels=labels)
    all_logits = torch.cat([step_logits.reshape(-1, NUM_BLOCKS) for step_logits in logits])  # (N, K)
    share = F.one_hot(all_logits.argmax(dim=-1), NUM_BLOCKS).float().mean(dim=0)
    balance = NUM_BLOCKS * (share * all_logits.softmax(dim=-1).mean(dim=0)).sum()
    z_loss = all_logits.logsumexp(dim=-1).square().mean()
    expected = 0.3 * balance + 0.05 * z_loss
    weight = model.router.out_proj[-1].weight
    (grad,) = torch.autograd.grad(out.aux_loss, weight, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, weight)

    torch.testing.assert_close(out.aux_loss, expected)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected_grad)


def test_aux_loss_gives_router_gradient():
    model = make_model()
    x, timesteps, labels = make_inputs()

    model(x, timesteps, class_labels=labels).aux_loss.backward()

    assert model.router.out_proj[-1].weight.grad.abs().sum() > 0


# Routes that do not read the activations.


def test_input_free_routes_depend_on_condition_only():
    model = make_model(router_input="none", num_pool_blocks=4).eval()
    timesteps = torch.tensor([10, 900, 10, 900, 10, 900, 10, 900])
    labels = torch.tensor([1, 1, 1, 1, 3, 3, 3, 3])
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    routes = model(x, timesteps, class_labels=labels, return_routes=True).routes
    other_routes = model(-3 * x, timesteps, class_labels=labels, return_routes=True).routes

    assert torch.equal(routes.indices, other_routes.indices)
    for first, second in [(0, 2), (1, 3), (4, 6), (5, 7)]:  # same timestep and class
        assert torch.equal(routes.indices[:, first], routes.indices[:, second]), (first, second)


def test_input_free_routing_one_call_per_step():
    model = make_model(router_input="none", num_pool_blocks=4).eval()
    events = []
    model.router.register_forward_hook(lambda module, args, output: events.append("step"))
    for block_index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, output, k=block_index: events.append(args[0].shape[0]))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    model(x, 250, class_labels=torch.full((8,), 2))

    # Each routing step is one router call followed by one block call on the whole batch of 8.
    assert events == ["step", 8] * NUM_STEPS


# Router transform h(x, s).


def test_router_transform_starts_as_identity():
    plain = make_model(router_transform="none").eval()
    with_transform = make_model(perturb=False, router_transform="mlp").eval()
    result = with_transform.load_state_dict(plain.state_dict(), strict=False)
    x, timesteps, labels = make_inputs()

    plain_out = plain(x, timesteps, class_labels=labels, return_routes=True)
    transform_out = with_transform(x, timesteps, class_labels=labels, return_routes=True)

    assert result.unexpected_keys == []
    assert result.missing_keys
    assert all(key.startswith("router.transform.") for key in result.missing_keys)
    assert torch.equal(transform_out.routes.indices, plain_out.routes.indices)
    torch.testing.assert_close(transform_out.sample, plain_out.sample, rtol=0, atol=0)


def test_trained_router_transform_changes_output():
    plain = make_model(router_transform="none").eval()
    with_transform = make_model(perturb=False, router_transform="mlp").eval()
    with_transform.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        with_transform.router.transform.fc2.weight.normal_(std=0.2)
    x, timesteps, labels = make_inputs()

    plain_sample = plain(x, timesteps, class_labels=labels).sample
    transform_sample = with_transform(x, timesteps, class_labels=labels).sample

    assert not torch.allclose(transform_sample, plain_sample)
