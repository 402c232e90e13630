"""RouteTable: routes tabulated per diffusion timestep and class, for routers that ignore the activations.

With `router_input="none"` (or a fixed routing mode) the block chosen at routing step s depends
only on s, the diffusion timestep and the class label. The routes for every timestep of a sampling
schedule can then be computed once, before sampling. During sampling the model reads its routes
from the table instead of running the router MLP. At a step where every sample of the batch takes
the same block, the whole batch goes through that block in one call, with no sort or gather.
"""

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from .layer_router import RouteDecision, RouteTrace

if TYPE_CHECKING:
    from .mol_transformer_2d import MoLTransformer2DModel

TimestepsLike = Union[torch.Tensor, Sequence[float], float]


@dataclass
class RouteTable:
    """Routes of an activation-free router for a fixed set of timesteps and class labels.

    Build it with [`MoLTransformer2DModel.tabulate_routes`] and install it with
    [`MoLTransformer2DModel.set_route_table`]. The table is a snapshot: it is not saved with the
    model and goes stale when the router's weights change.

    Attributes:
        timesteps (`torch.Tensor`): Tabulated diffusion timesteps (N,), float64 on the CPU, in
            descending order (the order of sampling).
        class_labels (`torch.LongTensor` or `None`): Tabulated labels (C,), the null label last;
            `None` for an unconditional model.
        indices (`torch.LongTensor`): Chosen block (N, C, S); C = 1 for an unconditional model.
        probs (`torch.Tensor`): Router probabilities (N, C, S, K), float32; one-hot for fixed routing.
        num_blocks (`int`): Pool size K.
    """

    timesteps: torch.Tensor
    class_labels: Optional[torch.LongTensor]
    indices: torch.LongTensor
    probs: torch.Tensor
    num_blocks: int

    @property
    def num_steps(self) -> int:
        """Routing steps S per forward pass."""
        return self.indices.shape[-1]

    def __repr__(self) -> str:
        # Counts only: the default dataclass repr would print every tensor in full.
        labels = None if self.class_labels is None else len(self.class_labels)
        return (
            f"RouteTable(timesteps={len(self.timesteps)}, class_labels={labels}, "
            f"routing_steps={self.num_steps}, num_blocks={self.num_blocks})"
        )

    def lookup(
        self, timesteps: torch.Tensor, class_labels: Optional[torch.LongTensor] = None
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Read the routes of a batch from the table.

        Args:
            timesteps (`torch.Tensor`): Timestep of each sample (B,).
            class_labels (`torch.LongTensor`, *optional*): Label of each sample (B,), after mapping
                out-of-range labels to the null label; `None` for an unconditional model.

        Returns:
            `tuple[torch.LongTensor, torch.Tensor]`: Chosen blocks (S, B) and router probabilities
            (S, B, K), on the CPU.

        Raises:
            ValueError: When a timestep or label of the batch is not in the table.
        """
        timestep_rows = self._find("timestep", timesteps.detach().cpu().double(), self.timesteps)  # (B,)
        if self.class_labels is None:
            label_columns = torch.zeros_like(timestep_rows)
        elif class_labels is None:
            raise ValueError("this route table is class-conditional, so `class_labels` are required for lookup.")
        else:
            label_columns = self._find("class label", class_labels.detach().cpu(), self.class_labels)  # (B,)

        indices = self.indices[timestep_rows, label_columns].T  # (B, S) -> (S, B)
        probs = self.probs[timestep_rows, label_columns].transpose(0, 1)  # (B, S, K) -> (S, B, K)
        return indices, probs

    def decisions(
        self, timesteps: torch.Tensor, class_labels: Optional[torch.LongTensor], device: torch.device
    ) -> list[RouteDecision]:
        """Return one [`RouteDecision`] per routing step for a batch, with `shared_block` set where possible."""
        indices, probs = self.lookup(timesteps, class_labels)  # (S, B), (S, B, K) on the CPU
        shared = (indices == indices[:, :1]).all(dim=1).tolist()  # (S,) every sample takes one block
        indices_on_device = indices.to(device)
        probs_on_device = probs.to(device)
        return [
            RouteDecision(
                indices=indices_on_device[step],
                probs=probs_on_device[step],
                shared_block=int(indices[step, 0]) if shared[step] else None,
            )
            for step in range(self.num_steps)
        ]

    def to_traces(self) -> list[RouteTrace]:
        """Return one [`RouteTrace`] per tabulated timestep, in sampling order, with one sample per label.

        The traces plot like those of a sampling run, e.g. with `mol_diffusion.visualization.plot_routes`.
        """
        num_labels = self.indices.shape[1]
        return [
            RouteTrace(
                indices=self.indices[row].T.clone(),  # (C, S) -> (S, C)
                probs=self.probs[row].transpose(0, 1).clone(),  # (C, S, K) -> (S, C, K)
                timesteps=self.timesteps[row].expand(num_labels).clone(),  # (C,)
                class_labels=None if self.class_labels is None else self.class_labels.clone(),
                num_blocks=self.num_blocks,
            )
            for row in range(len(self.timesteps))
        ]

    @staticmethod
    def _find(name: str, values: torch.Tensor, table_values: torch.Tensor) -> torch.LongTensor:
        """Return the position of each of `values` (B,) in `table_values` (N,), matched exactly."""
        matches = values[:, None] == table_values[None, :]  # (B, N)
        missing = values[~matches.any(dim=1)]
        if missing.numel() > 0:
            missing_values = sorted({_plain_number(value) for value in missing.tolist()})
            raise ValueError(
                f"{name}s {missing_values[:8]} are not in the route table, which covers {len(table_values)} "
                f"{name}s. Build a table for these values with model.tabulate_routes(...), or call "
                "model.clear_route_table() to route with the router."
            )
        return matches.int().argmax(dim=1)  # (B,)


def routes_depend_on_activations(config) -> bool:
    """Return whether a model config routes on the activations, in which case its routes cannot be tabulated."""
    return config.router_mode == "learned" and config.router_input == "activations"


@torch.no_grad()
def tabulate_routes(
    model: "MoLTransformer2DModel", timesteps: TimestepsLike, class_labels: Optional[Sequence[int]] = None
) -> RouteTable:
    """Compute the route of every (timestep, class) pair; see [`MoLTransformer2DModel.tabulate_routes`]."""
    config = model.config
    if routes_depend_on_activations(config):
        raise ValueError(
            "tabulate_routes needs routes that do not read the activations, but this model has "
            "router_mode='learned' and router_input='activations', so its routes depend on each image. "
            "Train a model with router_input='none' to tabulate its routes (router_condition='timestep' "
            "conditions the router on the timestep but still routes on the activations)."
        )
    table_timesteps = _prepare_timesteps(timesteps)  # (N,), original dtype, descending
    table_labels = _prepare_class_labels(class_labels, config.num_classes)  # (C,) or None

    # Every (timestep, label) pair as one batch row: row n * C + c is timestep n with label c.
    num_timesteps = len(table_timesteps)
    num_labels = 1 if table_labels is None else len(table_labels)
    device = model.device
    grid_timesteps = table_timesteps.to(device).repeat_interleave(num_labels)  # (N * C,)
    grid_labels = None if table_labels is None else table_labels.to(device).repeat(num_timesteps)  # (N * C,)

    was_training = model.training
    model.eval()  # routing noise acts only in training, so the table contains the eval-mode routes
    try:
        cond = model._conditioning(grid_timesteps, grid_labels, model.dtype)  # (N * C, D)
        # The router ignores the activations here; it reads only the batch size from this placeholder.
        placeholder = cond.new_zeros(cond.shape[0], 1, cond.shape[1])  # (N * C, 1, D)
        decisions = [model.router(placeholder, step, cond) for step in range(config.num_routing_steps)]
    finally:
        model.train(was_training)

    indices = torch.stack([d.indices for d in decisions], dim=-1)  # (N * C, S)
    probs = torch.stack([d.probs.float() for d in decisions], dim=-2)  # (N * C, S, K)
    return RouteTable(
        timesteps=table_timesteps.double(),
        class_labels=table_labels,
        indices=indices.view(num_timesteps, num_labels, -1).cpu(),  # (N, C, S)
        probs=probs.view(num_timesteps, num_labels, *probs.shape[-2:]).cpu(),  # (N, C, S, K)
        num_blocks=config.num_pool_blocks,
    )


def check_route_table(model: "MoLTransformer2DModel", table: RouteTable) -> None:
    """Raise `ValueError` when `table` cannot serve `model`."""
    config = model.config
    if not isinstance(table, RouteTable):
        raise TypeError(f"`table` must be a RouteTable from model.tabulate_routes, got {type(table).__name__}.")
    if routes_depend_on_activations(config):
        raise ValueError(
            "this model routes on the activations (router_mode='learned', router_input='activations'), "
            "so a route table cannot replace its router."
        )
    if table.num_blocks != config.num_pool_blocks or table.num_steps != config.num_routing_steps:
        raise ValueError(
            f"the route table has {table.num_blocks} blocks and {table.num_steps} routing steps, but the model "
            f"has num_pool_blocks={config.num_pool_blocks} and num_routing_steps={config.num_routing_steps}; "
            "build the table with this model's tabulate_routes."
        )
    if (table.class_labels is None) != (config.num_classes is None):
        kind = "unconditional" if table.class_labels is None else "class-conditional"
        raise ValueError(
            f"the route table is {kind} but the model has num_classes={config.num_classes}; "
            "build the table with this model's tabulate_routes."
        )


def _prepare_timesteps(timesteps: TimestepsLike) -> torch.Tensor:
    if torch.is_tensor(timesteps):
        values = timesteps.detach().cpu().reshape(-1)
    elif isinstance(timesteps, numbers.Number):
        values = torch.tensor([timesteps])  # one timestep
    else:
        try:
            values = torch.tensor(list(timesteps))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"`timesteps` must be a number, a sequence of numbers or a 1-D tensor such as "
                f"scheduler.timesteps, got {timesteps!r} ({error})."
            ) from None
    if values.numel() == 0:
        raise ValueError("`timesteps` is empty; pass the timesteps to tabulate, e.g. scheduler.timesteps.")
    if values.dtype == torch.bool or values.is_complex() or not torch.isfinite(values.double()).all():
        raise ValueError(f"`timesteps` must be finite real numbers, got {values.tolist()[:8]}.")
    return torch.unique(values).flip(0)  # (N,) distinct, descending


def _prepare_class_labels(class_labels: Optional[Sequence[int]], num_classes: Optional[int]):
    """Return the labels to tabulate (C,) with the null label last, or None for an unconditional model."""
    if num_classes is None:
        if class_labels is not None:
            raise ValueError(
                f"class_labels={class_labels!r} was given, but the model is unconditional (num_classes=None); "
                "call tabulate_routes without class_labels."
            )
        return None
    if class_labels is None:
        labels = torch.arange(num_classes)
    else:
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"`class_labels` must be integers, got {labels.tolist()[:8]}.")
        invalid = labels[(labels < 0) | (labels >= num_classes)]
        if invalid.numel() > 0:
            raise ValueError(
                f"class_labels {sorted(set(invalid.tolist()))} are outside the model's classes "
                f"[0, {num_classes}); the null class is always tabulated and needs no label."
            )
        labels = torch.unique(labels.long())
    return torch.cat([labels.long(), torch.tensor([num_classes])])  # (C,) with the null label last


def _plain_number(value: float) -> Union[int, float]:
    return int(value) if math.isfinite(value) and float(value).is_integer() else value
