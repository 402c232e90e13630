"""Routing modes: token routing learns and costs one block per step; route tables replace the router."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from sklearn.datasets import load_digits
from torch.utils.flop_counter import FlopCounterMode

from mol_diffusion import MoLPipeline, RouteTable

from helpers import make_tiny_model

NUM_BLOCKS = 3
NUM_STEPS = 4
NUM_CLASSES = 5


def make_model(perturb=True, **overrides):
    """Tiny 8x8 model; `perturb` adds noise to every weight so the zero-initialised adaLN gates open."""
    config = dict(num_pool_blocks=NUM_BLOCKS, num_routing_steps=NUM_STEPS, num_classes=NUM_CLASSES)
    return make_tiny_model(perturb, **{**config, **overrides})


def table_model(**overrides):
    return make_model(router_input="none", **overrides).eval()


def noisy_batch(batch_size, seed=1):
    return torch.randn(batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# Token routing: the router learns from the diffusion loss.


def digits_batches(batch_size=32):
    """sklearn's 8x8 digits scaled to [-1, 1], as (images (B, 1, 8, 8), labels (B,)) batches."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # 0..16 -> [-1, 1]
    labels = torch.tensor(digits.target) % NUM_CLASSES
    return list(zip(images.split(batch_size), labels.split(batch_size)))


def train_token_model(model, batches, num_updates):
    """Train on the epsilon loss alone (router losses weighted 0); return the loss of every update."""
    scheduler = DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for update in range(num_updates):
        images, labels = batches[update % len(batches)]
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(0, 100, (len(images),), generator=generator)
        noisy = scheduler.add_noise(images, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps, class_labels=labels).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def token_training():
    model = make_model(
        perturb=False, router_granularity="token", router_balance_loss_weight=0.0, router_z_loss_weight=0.0
    )
    initial_router = {key: value.clone() for key, value in model.router.state_dict().items()}
    probe, probe_labels = digits_batches()[-1]
    timesteps = torch.full((len(probe),), 50)
    model.eval()
    initial_routes = model(probe, timesteps, class_labels=probe_labels, return_routes=True).routes.indices

    losses = train_token_model(model, digits_batches(), num_updates=40)

    model.eval()
    trained_routes = model(probe, timesteps, class_labels=probe_labels, return_routes=True).routes.indices
    trained_router = {key: value.clone() for key, value in model.router.state_dict().items()}
    model.router.load_state_dict(initial_router)
    routes_with_initial_router = model(probe, timesteps, class_labels=probe_labels, return_routes=True).routes.indices
    model.router.load_state_dict(trained_router)
    return dict(
        losses=losses,
        initial_router=initial_router,
        model=model,
        initial_routes=initial_routes,
        trained_routes=trained_routes,
        routes_with_initial_router=routes_with_initial_router,
    )


def test_token_training_lowers_loss(token_training):
    losses = token_training["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_token_router_weights_move(token_training):
    # The router losses are weighted 0, so only the diffusion loss can move the router.
    initial = token_training["initial_router"]["out_proj.1.weight"]
    trained = token_training["model"].router.out_proj[-1].weight.detach()
    assert (trained - initial).abs().max() > 1e-3


def test_token_routes_change_in_training(token_training):
    changed = (token_training["trained_routes"] != token_training["initial_routes"]).float().mean()
    assert changed > 0.01


def test_token_routes_follow_trained_router(token_training):
    # Same trained blocks, the router swapped back to its initial weights: the learned router's routes differ.
    changed = (token_training["trained_routes"] != token_training["routes_with_initial_router"]).float().mean()
    assert changed > 0.01


# Token routing: compute per routing step is one dense block.


def count_projection_rows(model):
    """Count the rows (tokens) each kind of block projection processes, summed over the pool."""
    rows = {"to_qkv": 0, "to_out": 0, "fc1": 0, "fc2": 0}

    def hook(name):
        def record(module, args, output):
            rows[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return record

    for block in model.blocks:
        for name in rows:
            getattr(block, name).register_forward_hook(hook(name))
    return rows


def test_token_routing_one_projection_per_token():
    model = make_model(router_granularity="token").eval()
    rows = count_projection_rows(model)
    batch_size, num_tokens = 6, (8 // 2) ** 2

    routes = model(noisy_batch(batch_size), 300, return_routes=True).routes

    assert len(routes.block_counts().nonzero()) > 1  # the tokens really were split over several blocks
    for name, count in rows.items():
        assert count == NUM_STEPS * batch_size * num_tokens, name


def count_flops(model, x):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x, 300)
    return counter.get_total_flops()


def test_token_flops_close_to_dense():
    # A model wide enough that the router MLP and the per-block modulation are small next to a block.
    width = dict(num_attention_heads=4, attention_head_dim=16, num_routing_steps=NUM_STEPS)
    token = make_model(router_granularity="token", num_pool_blocks=NUM_BLOCKS, **width).eval()
    dense = make_model(router_mode="sequential", num_pool_blocks=NUM_STEPS, **width).eval()
    x = noisy_batch(4)

    assert count_flops(token, x) <= 1.15 * count_flops(dense, x)


# Route tables: routes that do not read the activations.


def mixed_inputs():
    """Eight samples over three timesteps and several labels, with an out-of-range (null) label."""
    timesteps = torch.tensor([999, 999, 500, 500, 500, 10, 10, 10])
    labels = torch.tensor([0, 3, 1, 1, NUM_CLASSES, 4, 2, 1000])
    return noisy_batch(8), timesteps, labels


@pytest.mark.parametrize("condition", ["step", "timestep", "step_and_timestep"])
def test_route_table_output_matches_router(condition):
    model = table_model(router_condition=condition)
    x, timesteps, labels = mixed_inputs()
    expected = model(x, timesteps, class_labels=labels, return_routes=True)

    model.set_route_table(model.tabulate_routes([999, 500, 10]))
    tabulated = model(x, timesteps, class_labels=labels, return_routes=True)

    assert torch.equal(tabulated.sample, expected.sample)
    assert torch.equal(tabulated.routes.indices, expected.routes.indices)
    torch.testing.assert_close(tabulated.routes.probs, expected.routes.probs)


def test_route_table_unconditional_matches_router():
    model = table_model(num_classes=None)
    x = noisy_batch(4)
    timesteps = torch.tensor([700, 20, 700, 20])
    expected = model(x, timesteps).sample

    model.set_route_table(model.tabulate_routes(torch.tensor([700, 20])))

    assert torch.equal(model(x, timesteps).sample, expected)


def test_route_table_single_block_call_per_step(monkeypatch):
    model = table_model()
    model.set_route_table(model.tabulate_routes([250]))
    events = []
    model.router.register_forward_hook(lambda module, args, output: events.append("router"))
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, output: events.append(args[0].shape[0]))

    def no_grouping(*args, **kwargs):
        raise AssertionError("dispatch_samples (sort and gather) was called")

    monkeypatch.setattr("mol_diffusion.models.mol_transformer_2d.dispatch_samples", no_grouping)
    model(noisy_batch(8), 250, class_labels=torch.full((8,), 2))

    # No router call, and each routing step is one block call on the whole batch of 8.
    assert events == [8] * NUM_STEPS


def test_route_table_entries_match_single_forward():
    model = table_model()
    table = model.tabulate_routes([900, 100], class_labels=[1, 4])

    assert table.indices.shape == (2, 3, NUM_STEPS)  # timesteps x (labels 1, 4 and null) x steps
    assert table.class_labels.tolist() == [1, 4, NUM_CLASSES]
    for row, timestep in enumerate(table.timesteps.tolist()):
        for column, label in enumerate(table.class_labels.tolist()):
            routes = model(noisy_batch(1), int(timestep), class_labels=torch.tensor([label]), return_routes=True).routes
            assert torch.equal(table.indices[row, column], routes.indices[:, 0]), (timestep, label)


def test_route_table_scalar_timestep():
    model = table_model()

    single = model.tabulate_routes(500)

    assert torch.equal(single.indices, model.tabulate_routes([500]).indices)
    expected_repr = (
        f"RouteTable(timesteps=1, class_labels={NUM_CLASSES + 1}, routing_steps={NUM_STEPS}, "
        f"num_blocks={model.config.num_pool_blocks})"
    )
    assert repr(single) == expected_repr


def test_route_table_rejects_non_numbers():
    with pytest.raises(ValueError, match="`timesteps` must be a number"):
        table_model().tabulate_routes(["late"])


def test_route_table_pipeline_images_match():
    model = table_model()
    scheduler = DDIMScheduler(num_train_timesteps=100)
    pipe = MoLPipeline(transformer=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    request = dict(class_labels=[0, 2, 4], guidance_scale=2.0, num_inference_steps=5, output_type="pt")
    expected = pipe(**request, generator=torch.Generator().manual_seed(0)).images

    scheduler.set_timesteps(5)
    model.set_route_table(model.tabulate_routes(scheduler.timesteps))
    tabulated = pipe(**request, generator=torch.Generator().manual_seed(0)).images

    assert torch.equal(tabulated, expected)


def test_fixed_routing_tabulates_cyclic_order():
    model = make_model(router_mode="cyclic").eval()
    table = model.tabulate_routes([10, 20])

    expected = torch.tensor([step % NUM_BLOCKS for step in range(NUM_STEPS)])
    assert torch.equal(table.indices, expected.expand(2, NUM_CLASSES + 1, NUM_STEPS))


def test_route_table_rejects_activation_routes():
    model = make_model(router_input="activations", router_condition="timestep").eval()
    with pytest.raises(ValueError, match="router_input='none'"):
        model.tabulate_routes([10])


def test_timestep_only_table_warns_one_block_per_timestep(caplog):
    with caplog.at_level("WARNING", logger="mol_diffusion.models.mol_transformer_2d"):
        model = table_model(router_condition="timestep")
    assert "same block at all 4 routing steps" in caplog.text

    table = model.tabulate_routes([999, 500, 10])

    # The warning's claim: each (timestep, class) row repeats one block over the routing steps.
    assert torch.equal(table.indices, table.indices[..., :1].expand_as(table.indices))


def test_step_and_timestep_table_does_not_warn(caplog):
    with caplog.at_level("WARNING", logger="mol_diffusion.models.mol_transformer_2d"):
        table_model(router_condition="step_and_timestep")
    assert "routing steps" not in caplog.text


def test_route_table_missing_timestep_raises():
    model = table_model()
    model.set_route_table(model.tabulate_routes([999, 500]))
    with pytest.raises(ValueError, match=r"timesteps \[7\] are not in the route table"):
        model(noisy_batch(2), torch.tensor([999, 7]))


def test_route_table_in_training_mode_raises():
    model = table_model()
    model.set_route_table(model.tabulate_routes([10]))
    model.train()
    with pytest.raises(RuntimeError, match="clear_route_table"):
        model(noisy_batch(2), 10)


def test_clear_route_table_restores_router():
    model = table_model()
    model.set_route_table(model.tabulate_routes([10]))
    model.clear_route_table()
    model(noisy_batch(2), 33)  # a timestep the table lacks: the router handles it

    assert model.route_table is None


def test_set_route_table_rejects_other_model():
    table = table_model(num_pool_blocks=2).tabulate_routes([10])
    with pytest.raises(ValueError, match="num_pool_blocks=3"):
        table_model().set_route_table(table)


def test_route_table_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"class_labels \[7\] are outside"):
        table_model().tabulate_routes([10], class_labels=[1, 7])


def test_route_table_traces_cover_each_timestep():
    model = table_model()
    table = model.tabulate_routes([10, 600, 300])
    traces = table.to_traces()

    assert isinstance(table, RouteTable)
    assert [trace.timesteps[0].item() for trace in traces] == [600, 300, 10]
    assert traces[0].indices.shape == (NUM_STEPS, NUM_CLASSES + 1)
    assert torch.equal(traces[1].indices, table.indices[1].T)
