"""Dispatch of samples and tokens to pool blocks, checked against slow hand-written references.

The references loop over samples, or run every block on every token and select, and write the
adaLN-Zero block out from its parameters with a plain softmax attention. Everything runs in
float64, so the tolerance can be tight: grouping the same arithmetic differently changes only
the last bits.
"""

import pytest
import torch
import torch.nn.functional as F

from mol_diffusion import MoLTransformer2DModel
from mol_diffusion.models.blocks import MoLBlock
from mol_diffusion.models.dispatch import dispatch_samples, dispatch_tokens

WIDTH = 16
HEADS = 2
TOLERANCE = dict(rtol=1e-10, atol=1e-10)


def perturb_(module, std=0.2, seed=0):
    """Add noise to every weight, so the zero-initialised adaLN gates and output layer do not hide anything."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def make_pool(num_blocks=3):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(MoLBlock(WIDTH, HEADS) for _ in range(num_blocks))
    for block in blocks:
        block.initialize_weights()
    return perturb_(blocks.double())


def make_model(**overrides):
    config = dict(sample_size=8, patch_size=2, in_channels=1, num_attention_heads=HEADS, attention_head_dim=8)
    config.update(num_pool_blocks=3, num_routing_steps=4, num_classes=5, router_hidden_size=16)
    config.update(overrides)
    torch.manual_seed(0)
    return perturb_(MoLTransformer2DModel(**config)).double()


def random_inputs(batch_size, num_tokens=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, num_tokens, WIDTH, generator=generator, dtype=torch.float64)
    cond = torch.randn(batch_size, WIDTH, generator=generator, dtype=torch.float64)
    return x, cond


# Slow references.


def reference_attention(qkv, num_heads):
    """Softmax attention over all tokens, written out: qkv (B, T, 3D) laid out as (3, H, Dh) -> (B, T, D)."""
    batch_size, num_tokens, _ = qkv.shape
    q, k, v = qkv.view(batch_size, num_tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh) each
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)  # (B, H, T, T)
    return (weights @ v).transpose(1, 2).reshape(batch_size, num_tokens, -1)


def reference_token_step(blocks, indices, x, cond):
    """Run every block on every token at each stage and keep, per token, the value of its chosen block.

    Stages: adaLN modulation, qkv projection, attention over all tokens, output projection, MLP.
    indices (B, T), x (B, T, D), cond (B, D).
    """
    one_hot = F.one_hot(indices, len(blocks)).to(x.dtype)  # (B, T, K)

    def select(per_block):  # K tensors (B, T, F) -> (B, T, F)
        return torch.einsum("kbtf,btk->btf", torch.stack(per_block), one_hot)

    width = x.shape[-1]
    num_tokens = x.shape[1]
    modulation = select([block.ada_ln(cond)[:, None].expand(-1, num_tokens, -1) for block in blocks])
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)

    h = F.layer_norm(x, (width,), eps=1e-6) * (1 + scale_msa) + shift_msa
    attended = reference_attention(select([block.to_qkv(h) for block in blocks]), HEADS)
    x = x + gate_msa * select([block.to_out(attended) for block in blocks])

    h = F.layer_norm(x, (width,), eps=1e-6) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * select([block.fc2(F.gelu(block.fc1(h), approximate="tanh")) for block in blocks])


def reference_sample_step(blocks, indices, x, cond):
    """Loop over samples; sample b goes alone through block indices[b] (a token step with one index per image)."""
    outputs = []
    for b, block_index in enumerate(indices.tolist()):
        token_indices = torch.full(x[b : b + 1].shape[:2], block_index, dtype=torch.long)
        outputs.append(reference_token_step(blocks, token_indices, x[b : b + 1], cond[b : b + 1]))
    return torch.cat(outputs)


def reference_forward(model, x, timesteps, labels, route_indices):
    """Walk the model along recorded routes with the slow references.

    Returns the sample (B, C_out, H, W) and, per step, the router's argmax on the reference
    activations (so a test can check that the routes were taken from the right activations).
    """
    tokens = model.patch_embed(x)  # (B, T, D)
    cond = model.time_embedding(model.time_proj(timesteps).to(tokens.dtype))
    if labels is not None:
        cond = cond + model.class_embedding(labels)

    router_choices = []
    for step, indices in enumerate(route_indices):
        if model.config.router_mode == "learned":
            router_choices.append(model.router.logits(tokens, step, cond).argmax(dim=-1))
        block_cond = cond + model.step_embedding.weight[step]
        reference_step = reference_sample_step if indices.dim() == 1 else reference_token_step
        tokens = reference_step(model.blocks, indices, tokens, block_cond)

    patches = model.final_layer(tokens, cond)  # (B, T, p*p*C)
    batch_size, channels, height, width = x.shape
    patch = model.config.patch_size
    out_channels = model.config.out_channels or channels
    grid = patches.view(batch_size, height // patch, width // patch, patch, patch, out_channels)
    sample = grid.permute(0, 5, 1, 3, 2, 4).reshape(batch_size, out_channels, height, width)
    return sample, router_choices


def run_with_routes(model, batch_size=6, seed=2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 1, 8, 8, generator=generator, dtype=torch.float64)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, 5, (batch_size,), generator=generator)
    out = model(x, timesteps, class_labels=labels, return_routes=True)
    return out, (x, timesteps, labels)


# Sample dispatch.


def counting_runner(blocks, calls):
    def run_block(block_index, x, cond):
        calls.append((block_index, x.shape[0]))
        return blocks[block_index](x, cond)

    return run_block


def test_sample_dispatch_matches_reference():
    blocks = make_pool()
    x, cond = random_inputs(batch_size=8)
    indices = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1])

    out = dispatch_samples(counting_runner(blocks, []), len(blocks), indices, x, cond)

    torch.testing.assert_close(out, reference_sample_step(blocks, indices, x, cond), **TOLERANCE)


def test_sample_dispatch_random_indices_match_reference():
    blocks = make_pool(num_blocks=4)
    x, cond = random_inputs(batch_size=16)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        indices = torch.randint(0, 4, (16,), generator=generator)
        out = dispatch_samples(counting_runner(blocks, []), len(blocks), indices, x, cond)
        torch.testing.assert_close(out, reference_sample_step(blocks, indices, x, cond), **TOLERANCE)


def test_sample_dispatch_one_call_per_chosen_block():
    blocks = make_pool(num_blocks=4)
    x, cond = random_inputs(batch_size=8)
    indices = torch.tensor([3, 0, 3, 3, 0, 0, 3, 0])
    calls = []

    dispatch_samples(counting_runner(blocks, calls), len(blocks), indices, x, cond)

    assert sorted(calls) == [(0, 4), (3, 4)]


def test_sample_dispatch_shared_block_is_one_call():
    blocks = make_pool()
    x, cond = random_inputs(batch_size=8)
    calls = []

    out = dispatch_samples(counting_runner(blocks, calls), len(blocks), torch.full((8,), 1), x, cond)

    assert calls == [(1, 8)]
    torch.testing.assert_close(out, blocks[1](x, cond), rtol=0, atol=0)


def input_and_weight_gradients(blocks, step, batch_size):
    """Backpropagate a fixed random upstream gradient through `step(x, cond)`.

    Returns the gradients of x, cond and every block parameter, in that order.
    """
    blocks.zero_grad()
    x, cond = random_inputs(batch_size=batch_size)
    x.requires_grad_(True)
    cond.requires_grad_(True)
    out = step(x, cond)
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(4))
    (out * upstream).sum().backward()
    return [x.grad, cond.grad] + [parameter.grad for parameter in blocks.parameters()]


def test_sample_dispatch_gradients_match_reference():
    # Regression: writing each sample's result in place into a shared output breaks autograd.
    blocks = make_pool()
    indices = torch.tensor([1, 0, 1, 2, 2, 1])

    dispatched = input_and_weight_gradients(
        blocks, lambda x, cond: dispatch_samples(counting_runner(blocks, []), 3, indices, x, cond), batch_size=6
    )
    reference = input_and_weight_gradients(
        blocks, lambda x, cond: reference_sample_step(blocks, indices, x, cond), batch_size=6
    )

    assert len(dispatched) == len(reference)
    for got, expected in zip(dispatched, reference):
        torch.testing.assert_close(got, expected, **TOLERANCE)


# Token dispatch.


def test_token_dispatch_matches_reference():
    blocks = make_pool(num_blocks=4)
    x, cond = random_inputs(batch_size=5, num_tokens=7)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        indices = torch.randint(0, 4, (5, 7), generator=generator)
        out = dispatch_tokens(blocks, indices, x, cond)
        torch.testing.assert_close(out, reference_token_step(blocks, indices, x, cond), **TOLERANCE)


def test_token_dispatch_attention_spans_blocks():
    # A token's output depends on the tokens routed to other blocks, through attention.
    blocks = make_pool(num_blocks=2)
    x, cond = random_inputs(batch_size=1, num_tokens=4)
    indices = torch.tensor([[0, 0, 1, 1]])
    changed = x.clone()
    changed[0, 3] = torch.randn(WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    out = dispatch_tokens(blocks, indices, x, cond)
    out_changed = dispatch_tokens(blocks, indices, changed, cond)

    assert not torch.allclose(out[0, 0], out_changed[0, 0])


def test_token_dispatch_gradients_match_reference():
    blocks = make_pool()
    indices = torch.randint(0, 3, (4, 6), generator=torch.Generator().manual_seed(6))

    dispatched = input_and_weight_gradients(
        blocks, lambda x, cond: dispatch_tokens(blocks, indices, x, cond), batch_size=4
    )
    reference = input_and_weight_gradients(
        blocks, lambda x, cond: reference_token_step(blocks, indices, x, cond), batch_size=4
    )

    assert len(dispatched) == len(reference)
    for got, expected in zip(dispatched, reference):
        torch.testing.assert_close(got, expected, **TOLERANCE)


def test_token_dispatch_under_bf16_autocast():
    # Mixed precision: the gathers and scatters must keep the dtypes that autocast picks, forward and backward.
    blocks = make_pool(num_blocks=3).float()
    x, cond = (tensor.float() for tensor in random_inputs(batch_size=3, num_tokens=5))
    indices = torch.randint(0, 3, (3, 5), generator=torch.Generator().manual_seed(9))
    expected = reference_token_step(blocks, indices, x, cond)

    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dispatch_tokens(blocks, indices, x, cond)
    out.float().square().sum().backward()

    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    assert x.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()
    for block_index in indices.unique().tolist():
        for name, parameter in blocks[block_index].named_parameters():
            assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
            assert parameter.grad.abs().sum() > 0, name


# Whole model.


@pytest.mark.parametrize(
    "overrides",
    [
        dict(router_granularity="sample"),
        dict(router_granularity="token"),
        dict(router_mode="cyclic"),
        dict(router_mode="sequential", num_pool_blocks=4),
    ],
    ids=["sample", "token", "cyclic", "sequential"],
)
def test_model_matches_hard_routing_reference(overrides):
    # Learned modes scale each update by 1 + p - p.detach(), so the value must still be plain hard routing.
    model = make_model(**overrides)
    out, (x, timesteps, labels) = run_with_routes(model)

    expected, router_choices = reference_forward(model, x, timesteps, labels, out.routes.indices)

    torch.testing.assert_close(out.sample, expected, **TOLERANCE)
    for step, choice in enumerate(router_choices):
        assert torch.equal(choice, out.routes.indices[step]), f"step {step}"


def test_token_routes_differ_within_image():
    model = make_model(router_granularity="token")
    out, _ = run_with_routes(model)

    indices = out.routes.indices  # (S, B, T)
    assert indices.shape == (4, 6, 16)
    distinct_per_image = [len(indices[s, b].unique()) for s in range(4) for b in range(6)]
    assert max(distinct_per_image) > 1


def test_model_block_calls_per_step():
    model = make_model(num_pool_blocks=4)
    events = []
    model.router.register_forward_hook(lambda module, args, output: events.append("step"))
    for block_index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, output, k=block_index: events.append(k))

    out, _ = run_with_routes(model, batch_size=8)

    calls_per_step = []
    for event in events:
        if event == "step":
            calls_per_step.append([])
        else:
            calls_per_step[-1].append(event)
    assert len(calls_per_step) == 4
    for step, calls in enumerate(calls_per_step):
        chosen = sorted(out.routes.indices[step].unique().tolist())
        assert sorted(calls) == chosen, f"step {step}"
