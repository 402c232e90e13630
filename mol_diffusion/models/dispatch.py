"""Dispatch: run each routing group through its pool block once and scatter the results back.

No Python loop runs over samples or tokens; the only loop is over the K pool blocks, and blocks
with no samples or tokens are skipped. Inputs are gathered out of place, and each group's results
are written into a fresh output tensor at their positions (`_ScatterGroups`), whose backward
gathers the gradient back in group order. The activations passed in are never modified.
"""

from typing import Callable, Sequence

import torch

from .blocks import MoLBlock

# run_block(k, x, cond) applies pool block k; the model passes one that adds gradient checkpointing.
RunBlock = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class _StraightThrough(torch.autograd.Function):
    """Straight-through update: `x_new` in value, with the gradient `<x_new - x, dL/dx_new>` for the router probability.

    It is the gradient of `x_new + (x_new - x) * (p - p.detach())` written out. The forward pass does
    no arithmetic, and the backward is one difference and one inner product per sample or token.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_new: torch.Tensor, chosen_probs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, x_new)
        ctx.probs_dim = chosen_probs.dim()
        ctx.probs_dtype = chosen_probs.dtype
        return x_new

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, x_new = ctx.saved_tensors
        update = (x_new - x).to(grad.dtype).flatten(ctx.probs_dim)  # (B, T*D) or (B, T, D)
        grad_probs = torch.einsum("...f,...f->...", update, grad.flatten(ctx.probs_dim))  # (B,) or (B, T)
        # The scale is exactly 1 in value, so x_new's gradient passes through and x gets none from here.
        return None, grad, grad_probs.to(ctx.probs_dtype)


def scale_update(x: torch.Tensor, x_new: torch.Tensor, chosen_probs: torch.Tensor) -> torch.Tensor:
    """Scale the residual update `x_new - x` by `1 + p - p.detach()`.

    The forward value stays exactly `x_new` (the scale is 1), while the router probability p gets
    the gradient `<x_new - x, dL/dx_new>`: the straight-through signal of hard routing.

    Args:
        x (`torch.Tensor`): Block input (B, T, D).
        x_new (`torch.Tensor`): Block output (B, T, D).
        chosen_probs (`torch.Tensor`): Probability of the chosen block, (B,) or (B, T).
    """
    if not (torch.is_grad_enabled() and chosen_probs.requires_grad):
        return x_new  # nothing will backpropagate to the router
    return _StraightThrough.apply(x, x_new, chosen_probs)


def _group_sizes(indices: torch.Tensor, num_blocks: int) -> list[int]:
    # One host sync per routing step; the sizes decide the Python-side split.
    return torch.bincount(indices, minlength=num_blocks).tolist()


def dispatch_samples(
    run_block: RunBlock, num_blocks: int, indices: torch.LongTensor, x: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """Apply block `indices[b]` to sample b, one block call per non-empty group.

    Args:
        run_block: Applies pool block k to (x, cond).
        num_blocks (`int`): Pool size K.
        indices (`torch.LongTensor`): Chosen block per sample (B,).
        x (`torch.Tensor`): Activations (B, T, D).
        cond (`torch.Tensor`): Per-sample block conditioning (B, D).

    Returns:
        `torch.Tensor` (B, T, D): each sample's output of its chosen block.
    """
    sizes = _group_sizes(indices, num_blocks)
    batch_size = x.shape[0]
    for block_index, size in enumerate(sizes):
        if size == batch_size:
            # Every sample chose the same block: no gather needed.
            return run_block(block_index, x, cond)

    order = torch.argsort(indices, stable=True)  # (B,) samples grouped by block
    chosen = [block_index for block_index, size in enumerate(sizes) if size > 0]
    chosen_sizes = [sizes[block_index] for block_index in chosen]
    x_groups = x.index_select(0, order).split(chosen_sizes)  # per chosen block (B_k, T, D)
    cond_groups = cond.index_select(0, order).split(chosen_sizes)  # per chosen block (B_k, D)
    outputs = [run_block(k, x_group, cond_group) for k, x_group, cond_group in zip(chosen, x_groups, cond_groups)]
    return _ScatterGroups.apply(order, order.split(chosen_sizes), *outputs)  # (B, T, D), in batch order


class _Permute(torch.autograd.Function):
    """Row permutation whose gradient is permuted back by the inverse permutation.

    Autograd's `index_select` backward scatter-adds into a zeroed tensor, because its indices may
    repeat. For a permutation a gather of the gradient gives the same result with one pass less.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _ScatterGroups(torch.autograd.Function):
    """Scatter of each group's rows to their positions in the batch, with a gather back as its backward.

    Writing the groups straight into place skips the `torch.cat` that would otherwise join them
    before a permutation. The backward is one gather instead of a copy of the gradient per group.
    """

    @staticmethod
    def forward(ctx, order: torch.Tensor, positions: Sequence[torch.Tensor], *groups: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.sizes = [len(group) for group in groups]
        output = groups[0].new_empty((len(order), *groups[0].shape[1:]))
        for group_positions, group in zip(positions, groups):
            output.index_copy_(0, group_positions, group)
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return None, None, *grad.index_select(0, order).split(ctx.sizes)


class _TokenGroups:
    """Grouping of a batch's flattened tokens by chosen block, with the gather into groups and the scatter back.

    Only blocks that at least one token chose get a group. `blocks`, `samples`, the groups that
    `gather` returns and the groups that `scatter` takes all follow the same order.
    """

    def __init__(self, indices: torch.LongTensor, num_blocks: int):
        num_tokens = indices.shape[1]
        flat = indices.reshape(-1)  # (N,) with N = B * T
        sizes = _group_sizes(flat, num_blocks)
        self.order = torch.argsort(flat, stable=True)  # (N,) token index at each block-order position
        self.inverse = torch.argsort(self.order)  # (N,) block-order position of each token
        self.blocks = [k for k, size in enumerate(sizes) if size > 0]
        self.sizes = [sizes[k] for k in self.blocks]
        self.positions = self.order.split(self.sizes)  # per group (N_k,): its tokens' flat indices
        # The stable sort keeps each group's tokens in image order, so these are sorted too.
        self.samples = (self.order // num_tokens).split(self.sizes)  # per group (N_k,): image of each token

    def gather(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split `tokens` (N, D) in (B, T) order into one (N_k, D) group per chosen block."""
        return _Permute.apply(tokens, self.order, self.inverse).split(self.sizes)

    def scatter(self, groups: Sequence[torch.Tensor]) -> torch.Tensor:
        """Write per-group rows (N_k, F) back to their tokens: (N, F) in (B, T) order."""
        return _ScatterGroups.apply(self.order, self.positions, *groups)


def dispatch_tokens(
    blocks: Sequence[MoLBlock], indices: torch.LongTensor, x: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """Apply per-token block choices with attention over all tokens of each image.

    Token t of image b uses block `indices[b, t]` for its adaLN modulation, its query/key/value
    and output projections and its MLP; attention then mixes all tokens of the image, whichever
    block produced their keys and values. Each token passes through exactly one block's weights,
    so the compute per routing step is that of one dense block plus the gathers and scatters.

    Args:
        blocks: The K pool blocks; they must share width and head count.
        indices (`torch.LongTensor`): Chosen block per token (B, T).
        x (`torch.Tensor`): Activations (B, T, D).
        cond (`torch.Tensor`): Per-sample block conditioning (B, D).

    Returns:
        `torch.Tensor` (B, T, D).
    """
    batch_size, num_tokens, width = x.shape
    groups = _TokenGroups(indices, len(blocks))
    first = blocks[0]  # LayerNorms carry no parameters and attention none, so any block serves

    # Each group runs its block's stages in block order, and only attention runs in image order. A
    # token's adaLN rows are gathered per stage, right before use, so they are still in cache. As in
    # `modulate`, `1 + scale` is taken on the small (B, D) rows before the gather, and `addcmul`
    # does each multiply and add in one pass over the tokens.
    tokens = groups.gather(x.reshape(-1, width))  # per group (N_k, D)
    modulations, qkv = [], []
    for block_index, group, samples in zip(groups.blocks, tokens, groups.samples):
        block = blocks[block_index]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.ada_ln(cond).chunk(6, dim=-1)  # (B, D)
        shift, factor = shift_msa.index_select(0, samples), (1 + scale_msa).index_select(0, samples)  # (N_k, D)
        qkv.append(block.to_qkv(torch.addcmul(shift, first.norm1(group), factor)))
        modulations.append((gate_msa, shift_mlp, 1 + scale_mlp, gate_mlp))
    qkv = groups.scatter(qkv).view(batch_size, num_tokens, 3 * width)
    attended = groups.gather(first.attention(qkv).reshape(-1, width))  # per group (N_k, D)

    outputs = []
    for block_index, group, group_attended, samples, modulation in zip(
        groups.blocks, tokens, attended, groups.samples, modulations
    ):
        block = blocks[block_index]
        gate_msa, shift_mlp, factor_mlp, gate_mlp = (rows.index_select(0, samples) for rows in modulation)
        group = torch.addcmul(group, gate_msa, block.to_out(group_attended))
        group = torch.addcmul(group, gate_mlp, block.mlp(torch.addcmul(shift_mlp, first.norm2(group), factor_mlp)))
        outputs.append(group)
    return groups.scatter(outputs).view(batch_size, num_tokens, width)
