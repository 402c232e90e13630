"""LayerRouter: picks the pool block for each routing step, and the route trace it records."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_GRANULARITIES = ("sample", "token")
ROUTER_CONDITIONS = ("step", "timestep", "step_and_timestep")
ROUTER_INPUTS = ("activations", "none")
ROUTER_MODES = ("learned", "cyclic", "sequential")
ROUTER_TRANSFORMS = ("none", "mlp")
ROUTER_NOISES = ("none", "gumbel", "jitter")


def _over_blocks(function, tensor: torch.Tensor) -> torch.Tensor:
    """Apply `function(tensor, dim=0)` over the last (block) dimension of `tensor`.

    The block dimension holds only K entries. On the CPU, PyTorch's softmax and log-sum-exp over
    such a short last dimension measured about nine times slower than over a leading dimension
    (6 x 4096 rows of 4, one thread). Moving the block dimension to the front is a view. The result
    keeps the input's dimension order, and reductions drop the block dimension.
    """
    result = function(tensor.movedim(-1, 0), dim=0)
    return result.movedim(0, -1) if result.dim() == tensor.dim() else result


@dataclass
class RouteDecision:
    """The router's choice at one routing step.

    Attributes:
        indices (`torch.LongTensor`): Chosen block, (B,) for sample routing or (B, T) for token routing.
        probs (`torch.Tensor`): Router probabilities over the K blocks, (B, K) or (B, T, K). One-hot
            for fixed routing modes.
        logits (`torch.Tensor` or `None`): Router logits, same shape as `probs`; `None` for fixed modes
            and for routes read from a route table.
        shared_block (`int` or `None`): The block every sample takes at this step, when that is known
            on the host without reading `indices` back from the device; `None` otherwise.
    """

    indices: torch.LongTensor
    probs: torch.Tensor
    logits: Optional[torch.Tensor] = None
    shared_block: Optional[int] = None

    @property
    def is_learned(self) -> bool:
        return self.logits is not None

    def chosen_probs(self) -> torch.Tensor:
        """Return the probability of each chosen block, (B,) or (B, T)."""
        return self.probs.gather(-1, self.indices.unsqueeze(-1)).squeeze(-1)


@dataclass
class RouteTrace:
    """Routes taken in one forward pass, for analysis and plots.

    Attributes:
        indices (`torch.LongTensor`): Chosen block per routing step, (S, B) for sample routing or
            (S, B, T) for token routing.
        probs (`torch.Tensor`): Router probabilities, (S, B, K) or (S, B, T, K); one-hot for fixed
            routing modes.
        timesteps (`torch.Tensor`): Diffusion timestep of each sample, (B,).
        class_labels (`torch.LongTensor` or `None`): Class label of each sample after null-class
            mapping, (B,); `None` for an unconditional model.
        num_blocks (`int`): Pool size K.
    """

    indices: torch.LongTensor
    probs: torch.Tensor
    timesteps: torch.Tensor
    class_labels: Optional[torch.LongTensor]
    num_blocks: int

    def block_counts(self) -> torch.LongTensor:
        """Count the routing decisions that took each block, over all steps: (K,)."""
        return torch.bincount(self.indices.flatten().cpu(), minlength=self.num_blocks)

    def entropy(self) -> torch.Tensor:
        """Mean entropy of the router distribution per routing step, in nats: (S,)."""
        p = self.probs.float().clamp_min(1e-12)
        per_decision = -(p * p.log()).sum(-1)
        return per_decision.flatten(1).mean(1)

    def detach_cpu(self) -> "RouteTrace":
        """Return a copy of the trace detached from autograd and moved to the CPU."""
        return RouteTrace(
            indices=self.indices.detach().cpu(),
            probs=self.probs.detach().float().cpu(),
            timesteps=self.timesteps.detach().cpu(),
            class_labels=None if self.class_labels is None else self.class_labels.detach().cpu(),
            num_blocks=self.num_blocks,
        )


class LayerRouter(nn.Module):
    """Chooses which pool block the activations pass through at each routing step.

    At routing step s the router scores the K pool blocks from the current activations (unless
    `router_input="none"`) and a condition: a learned embedding of s, the diffusion conditioning
    vector (timestep embedding plus class embedding), or both. Selection is the hard argmax;
    the model keeps it differentiable by scaling the chosen block's residual update by
    `1 + p - p.detach()`, where p is the chosen block's probability.

    Args:
        hidden_size (`int`): Token width D of the model.
        num_blocks (`int`): Pool size K.
        num_steps (`int`): Routing steps S per forward pass.
        granularity (`str`): `"sample"` (one block per image per step) or `"token"` (per patch token).
        condition (`str`): `"step"`, `"timestep"` or `"step_and_timestep"`.
        router_input (`str`): `"activations"` or `"none"` (routes depend on step and conditioning only).
        mode (`str`): `"learned"`, `"cyclic"` (block s mod K) or `"sequential"` (block s; needs K == S).
        transform (`str`): `"none"` or `"mlp"`: a residual MLP `h(x, s)` applied to the activations
            before the chosen block, starting as the identity.
        noise (`str`): `"none"`, `"gumbel"` (Gumbel noise on the logits) or `"jitter"` (multiplicative
            uniform noise on the router input, as in Switch Transformers); used in training only.
        noise_scale (`float`): Scale of the Gumbel noise, or the jitter epsilon.
        router_hidden_size (`int`): Width of the router MLP.
    """

    def __init__(
        self,
        hidden_size: int,
        num_blocks: int,
        num_steps: int,
        granularity: str = "sample",
        condition: str = "step_and_timestep",
        router_input: str = "activations",
        mode: str = "learned",
        transform: str = "none",
        noise: str = "none",
        noise_scale: float = 1.0,
        router_hidden_size: int = 64,
    ):
        super().__init__()
        self.num_blocks = num_blocks
        self.num_steps = num_steps
        self.granularity = granularity
        self.condition = condition
        self.router_input = router_input
        self.mode = mode
        self.noise = noise
        self.noise_scale = noise_scale

        if mode == "learned":
            if router_input == "activations":
                self.input_norm = nn.LayerNorm(hidden_size, eps=1e-6)
                self.input_proj = nn.Linear(hidden_size, router_hidden_size)
            if condition in ("step", "step_and_timestep"):
                self.step_embedding = nn.Embedding(num_steps, router_hidden_size)
            if condition in ("timestep", "step_and_timestep"):
                self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, router_hidden_size))
            self.out_proj = nn.Sequential(nn.SiLU(), nn.Linear(router_hidden_size, num_blocks))

        if transform == "mlp":
            self.transform = RouterTransform(hidden_size, num_steps)
        else:
            self.transform = None

    def initialize_weights(self) -> None:
        """Initialise the router so a fresh model already spreads its routes over the pool.

        The output layer gets small random weights rather than zeros: all-zero logits would tie,
        and argmax would send every decision to block 0 until the router had learned something.
        """
        if self.mode == "learned":
            if self.router_input == "activations":
                nn.init.xavier_uniform_(self.input_proj.weight)
                nn.init.zeros_(self.input_proj.bias)
            if hasattr(self, "step_embedding"):
                nn.init.normal_(self.step_embedding.weight, std=1.0)
            if hasattr(self, "cond_proj"):
                nn.init.xavier_uniform_(self.cond_proj[-1].weight)
                nn.init.zeros_(self.cond_proj[-1].bias)
            nn.init.normal_(self.out_proj[-1].weight, std=0.1)
            nn.init.zeros_(self.out_proj[-1].bias)
        if self.transform is not None:
            self.transform.initialize_weights()

    def forward(self, x: torch.Tensor, step: int, cond: torch.Tensor) -> RouteDecision:
        """Choose the block for routing step `step`.

        Args:
            x (`torch.Tensor`): Activations (B, T, D).
            step (`int`): Routing step s in [0, S).
            cond (`torch.Tensor`): Diffusion conditioning vector (B, D).

        Returns:
            `RouteDecision` with indices (B,) or (B, T).
        """
        batch_size, num_tokens, _ = x.shape
        if self.mode != "learned":
            return self._fixed_decision(step, batch_size, num_tokens, x.device, x.dtype)

        logits = self.logits(x, step, cond)  # (B, K) or (B, T, K)
        probs = _over_blocks(torch.softmax, logits.float())
        selection_logits = logits.detach().float()
        if self.training and self.noise == "gumbel":
            gumbel = -torch.empty_like(selection_logits).exponential_().log()
            selection_logits = selection_logits + self.noise_scale * gumbel
        indices = selection_logits.argmax(dim=-1)
        return RouteDecision(indices=indices, probs=probs, logits=logits)

    def logits(self, x: torch.Tensor, step: int, cond: torch.Tensor) -> torch.Tensor:
        """Score the K pool blocks at one routing step: (B, K) or (B, T, K)."""
        # The per-sample condition terms are summed before they meet the per-token activation term,
        # so token routing adds one (B, 1, R) term to its (B, T, R) hidden state instead of two.
        condition = None
        if hasattr(self, "cond_proj"):
            condition = self.cond_proj(cond)  # (B, R)
        if hasattr(self, "step_embedding"):
            step_term = self.step_embedding.weight[step]  # (R,)
            condition = step_term if condition is None else condition + step_term
        if self.router_input == "none":
            if condition is None:
                raise RuntimeError("the router has neither an activation input nor a condition")
            return self.out_proj(condition.expand(x.shape[0], -1))  # (B, K)

        # Sample routing scores the mean token, one small MLP per image (cheaper than scoring
        # every token and averaging, and still a per-image choice).
        router_x = x.mean(dim=1) if self.granularity == "sample" else x  # (B, D) or (B, T, D)
        if self.training and self.noise == "jitter":
            jitter = torch.empty_like(router_x).uniform_(1 - self.noise_scale, 1 + self.noise_scale)
            router_x = router_x * jitter
        hidden = self.input_proj(self.input_norm(router_x))  # (B, R) or (B, T, R)
        if condition is not None:
            if condition.dim() == 2 and self.granularity == "token":
                condition = condition.unsqueeze(1)  # (B, 1, R)
            hidden = hidden + condition
        return self.out_proj(hidden)

    def _fixed_decision(self, step, batch_size, num_tokens, device, dtype) -> RouteDecision:
        block = step % self.num_blocks if self.mode == "cyclic" else step
        shape = (batch_size,) if self.granularity == "sample" else (batch_size, num_tokens)
        indices = torch.full(shape, block, dtype=torch.long, device=device)
        probs = F.one_hot(indices, self.num_blocks).to(torch.float32)
        return RouteDecision(indices=indices, probs=probs, logits=None, shared_block=block)


class RouterTransform(nn.Module):
    """The router's optional transformation h(x, s): a step-aware residual MLP on every token.

    Its output layer starts at zero, so switching it on leaves an untrained model's output unchanged.
    """

    def __init__(self, hidden_size: int, num_steps: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.step_embedding = nn.Embedding(num_steps, hidden_size)
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def initialize_weights(self) -> None:
        nn.init.normal_(self.step_embedding.weight, std=0.02)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        hidden = self.norm(x) + self.step_embedding.weight[step]  # (B, T, D)
        return x + self.fc2(F.gelu(self.fc1(hidden), approximate="tanh"))


def router_aux_losses(decisions: list[RouteDecision], num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the load-balance and z-loss over all learned decisions of one forward pass.

    The balance loss is the Switch Transformer form `K * sum_k f_k * P_k`, with f_k the share of
    decisions that took block k and P_k the mean router probability of block k, taken over every
    step and every sample or token together: one step sending every image to one block is a
    legitimate learned order, a block unused everywhere is waste. It equals 1 at perfect balance.
    The z-loss is the mean squared log-sum-exp of the logits (ST-MoE), which keeps logits small.

    Returns:
        `(balance_loss, z_loss)`, scalar tensors; zeros when no decision was learned.
    """
    learned = [d for d in decisions if d.is_learned]
    if not learned:
        zero = torch.zeros((), device=decisions[0].indices.device) if decisions else torch.zeros(())
        return zero, zero

    # Sums per decision avoid copying every decision's probabilities and logits into one tensor.
    num_decisions = sum(d.indices.numel() for d in learned)
    counts = sum(torch.bincount(d.indices.reshape(-1), minlength=num_blocks) for d in learned)  # (K,)
    prob_sums = sum(d.probs.sum(dim=tuple(range(d.probs.dim() - 1))) for d in learned)  # (K,)
    share = counts.to(prob_sums.dtype) / num_decisions
    balance_loss = num_blocks * (share * prob_sums / num_decisions).sum()

    squared_lse = sum(_over_blocks(torch.logsumexp, d.logits.float()).square().sum() for d in learned)
    z_loss = squared_lse / num_decisions
    return balance_loss, z_loss
