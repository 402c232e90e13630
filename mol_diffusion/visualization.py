"""Route analysis: which pool block each routing step takes, across diffusion timesteps, as PNG plots.

The input is a list of [`RouteTrace`], for example `MoLPipeline(...)(return_routes=True).routes`
(one trace per denoising step) or [`RouteTable.to_traces`]. The statistics are plain tensors, so
they can be logged or tested without drawing. The plots are drawn on `matplotlib.figure.Figure`
objects and written with the Agg renderer, so no display and no global pyplot state are involved.
"""

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .models import RouteTrace

logger = logging.getLogger(__name__)

ImagesLike = Union[torch.Tensor, np.ndarray, Sequence[PIL.Image.Image]]
TracesLike = Union[RouteTrace, Sequence[RouteTrace]]

HEATMAP_PANELS_PER_ROW = 4
MAX_TIMESTEP_TICKS = 6
PANEL_INCHES = 3.0


# Statistics.


@dataclass
class RouteFractions:
    """Share of routing decisions that took each block, per routing step and timestep column.

    Attributes:
        timesteps (`torch.Tensor`): Timestep of each column (N,), in sampling order (descending);
            the bin centre when timesteps were binned.
        fractions (`torch.Tensor`): Shares of shape (K, S, N). `fractions[k, s, n]` is the share of
            the samples of column n that took block k at routing step s, counting tokens for token
            routing. Each column sums to 1 over k.
        num_decisions (`torch.Tensor`): Decisions per routing step and column (S, N).
    """

    timesteps: torch.Tensor
    fractions: torch.Tensor
    num_decisions: torch.Tensor


def concatenate_traces(traces: TracesLike) -> RouteTrace:
    """Join traces of the same forward step along the batch, e.g. one denoising step sampled in several calls.

    Args:
        traces (`RouteTrace` or `Sequence[RouteTrace]`): Traces with the same pool size and routing granularity.

    Returns:
        [`RouteTrace`] with the samples of all traces, in order.
    """
    traces = _check_traces(traces)
    has_labels = all(trace.class_labels is not None for trace in traces)
    return RouteTrace(
        indices=torch.cat([trace.indices.cpu() for trace in traces], dim=1),  # (S, B_total) or (S, B_total, T)
        probs=torch.cat([trace.probs.float().cpu() for trace in traces], dim=1),  # (S, B_total, ..., K)
        timesteps=torch.cat([trace.timesteps.cpu() for trace in traces]),  # (B_total,)
        class_labels=torch.cat([trace.class_labels.cpu() for trace in traces]) if has_labels else None,
        num_blocks=traces[0].num_blocks,
    )


def route_fractions(traces: TracesLike, timestep_bins: Optional[int] = None) -> RouteFractions:
    """Compute the share of decisions per block, routing step and diffusion timestep.

    Args:
        traces (`RouteTrace` or `Sequence[RouteTrace]`): Route traces; every sample carries its own timestep.
        timestep_bins (`int`, *optional*): Group timesteps into this many equal-width bins. By default
            every distinct timestep is a column, which suits sampling runs (one timestep per step).

    Returns:
        [`RouteFractions`] with fractions of shape (K, S, N).
    """
    traces = _check_traces(traces)
    num_blocks = traces[0].num_blocks
    sample_timesteps = torch.cat([trace.timesteps.detach().cpu().double().reshape(-1) for trace in traces])  # (B_all,)
    # Decisions per sample, step and block: tokens of one image add up for token routing.
    per_sample = torch.cat([_block_counts_per_sample(trace) for trace in traces], dim=1)  # (S, B_all, K)

    if timestep_bins is None:
        column_timesteps, columns = torch.unique(sample_timesteps, return_inverse=True)  # ascending
    else:
        if timestep_bins < 1:
            raise ValueError(f"`timestep_bins` must be a positive integer, got {timestep_bins!r}.")
        low, high = sample_timesteps.min(), sample_timesteps.max()
        edges = torch.linspace(float(low), float(high), timestep_bins + 1, dtype=torch.float64)
        columns = torch.bucketize(sample_timesteps, edges[1:-1], right=True)  # (B_all,) in [0, bins)
        column_timesteps = (edges[:-1] + edges[1:]) / 2
    num_columns = len(column_timesteps)

    counts = per_sample.new_zeros(per_sample.shape[0], num_columns, num_blocks)  # (S, N, K)
    counts.index_add_(1, columns, per_sample)
    num_decisions = counts.sum(dim=-1)  # (S, N)
    fractions = counts / num_decisions.clamp_min(1).unsqueeze(-1)  # (S, N, K)

    # Sampling order: the noisiest timestep first.
    order = torch.arange(num_columns - 1, -1, -1)
    return RouteFractions(
        timesteps=column_timesteps[order],
        fractions=fractions[:, order].permute(2, 0, 1).contiguous(),  # (K, S, N)
        num_decisions=num_decisions[:, order],
    )


def block_usage(traces: TracesLike) -> torch.Tensor:
    """Share of all routing decisions that took each block, over every step and trace: (K,)."""
    traces = _check_traces(traces)
    counts = sum(trace.block_counts().double() for trace in traces)
    return counts / counts.sum().clamp_min(1)


def router_entropy(traces: TracesLike) -> torch.Tensor:
    """Mean entropy of the router distribution per routing step over all decisions, in nats: (S,).

    Each trace's `RouteTrace.entropy()` is weighted by its number of decisions per step. Fixed
    routing and route tables of fixed routing have zero entropy; the maximum is log K.
    """
    traces = _check_traces(traces)
    weights = torch.tensor([trace.indices[0].numel() for trace in traces], dtype=torch.float64)  # (traces,)
    entropies = torch.stack([trace.entropy().double().cpu() for trace in traces])  # (traces, S)
    return (weights[:, None] * entropies).sum(dim=0) / weights.sum()


# Plots.


def plot_routes(
    traces: TracesLike,
    path: str,
    images: Optional[ImagesLike] = None,
    timestep_bins: Optional[int] = None,
    max_token_images: int = 4,
    title: Optional[str] = None,
) -> str:
    """Write one PNG with the route analysis of a set of traces.

    The first panels are heatmaps, one per block, of the share of decisions that took the block,
    over routing step (rows) and diffusion timestep (columns, in sampling order). Below them are
    the block usage over all decisions and the router entropy per routing step. For token routing
    the PNG also maps the block each patch took at every routing step, for the first
    `max_token_images` samples of the least noisy trace (the last denoising step of a sampling
    run), next to each image when `images` are given.

    Args:
        traces (`RouteTrace` or `Sequence[RouteTrace]`): Route traces with the same pool size and granularity.
        path (`str`): Output PNG path; missing parent folders are created.
        images (`torch.Tensor`, `np.ndarray` or `list[PIL.Image.Image]`, *optional*): The samples of the
            least noisy trace, in its batch order: a (B, C, H, W) tensor or a (B, H, W, C) array in
            [0, 1], or B PIL images. Only token maps use them.
        timestep_bins (`int`, *optional*): Bin the timesteps of the heatmap columns, see [`route_fractions`].
        max_token_images (`int`): Samples shown in the token maps.
        title (`str`, *optional*): Figure title.

    Returns:
        `str`: The path written.
    """
    traces = _check_traces(traces)
    num_blocks = traces[0].num_blocks
    token_trace = _least_noisy(traces) if _is_token_routing(traces[0]) and max_token_images > 0 else None
    image_array = _images_to_array(images) if images is not None and token_trace is not None else None
    if image_array is not None and len(image_array) != token_trace.indices.shape[1]:
        raise ValueError(
            f"`images` has {len(image_array)} images but the least noisy trace has {token_trace.indices.shape[1]} "
            "samples; pass the images in the batch order of the traces."
        )

    heatmap_rows = math.ceil(num_blocks / HEATMAP_PANELS_PER_ROW)
    num_token_rows = 0 if token_trace is None else min(max_token_images, token_trace.indices.shape[1])
    heights = [heatmap_rows, 1] + ([num_token_rows * 0.6] if num_token_rows else [])
    width = PANEL_INCHES * max(min(num_blocks, HEATMAP_PANELS_PER_ROW), 2) + 1
    figure = Figure(figsize=(width, PANEL_INCHES * sum(heights) + 0.5), layout="constrained")
    sections = figure.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    if title:
        figure.suptitle(title)

    _draw_heatmaps(sections[0], route_fractions(traces, timestep_bins), heatmap_rows)
    usage_axes, entropy_axes = sections[1].subplots(1, 2)
    _draw_usage(usage_axes, block_usage(traces))
    _draw_entropy(entropy_axes, router_entropy(traces), num_blocks)
    if num_token_rows:
        _draw_token_maps(sections[2], token_trace, image_array, num_token_rows)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    logger.info("Wrote route plots of %d traces to %s", len(traces), path)
    return path


def _draw_heatmaps(section, stats: RouteFractions, num_rows: int) -> None:
    num_blocks, num_steps, num_columns = stats.fractions.shape
    axes = section.subplots(num_rows, min(num_blocks, HEATMAP_PANELS_PER_ROW), squeeze=False).reshape(-1)
    tick_positions = np.arange(0, num_columns, math.ceil(num_columns / MAX_TIMESTEP_TICKS))
    tick_labels = [f"{value:g}" for value in stats.timesteps[tick_positions].round().tolist()]
    image = None
    for block, ax in enumerate(axes):
        if block >= num_blocks:
            ax.set_visible(False)
            continue
        image = ax.imshow(
            stats.fractions[block].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest"
        )
        ax.set_title(f"block {block}")
        ax.set_xticks(tick_positions, tick_labels)
        ax.set_yticks(range(num_steps))
        ax.set_xlabel("diffusion timestep (sampling order)")
        ax.set_ylabel("routing step")
    section.colorbar(image, ax=axes.tolist(), label="share of decisions", shrink=0.9)
    section.suptitle("Block choice per routing step and timestep")


def _draw_usage(ax, usage: torch.Tensor) -> None:
    blocks = np.arange(len(usage))
    ax.bar(blocks, usage.numpy(), color=_block_colors(len(usage)))
    ax.axhline(1 / len(usage), color="gray", linestyle="--", linewidth=1, label="uniform")
    ax.set_xticks(blocks)
    ax.set_xlabel("pool block")
    ax.set_ylabel("share of all decisions")
    ax.set_ylim(0, 1)
    ax.set_title("Block usage")
    ax.legend(loc="upper right")


def _draw_entropy(ax, entropy: torch.Tensor, num_blocks: int) -> None:
    steps = np.arange(len(entropy))
    ax.plot(steps, entropy.numpy(), marker="o")
    ax.axhline(math.log(num_blocks), color="gray", linestyle="--", linewidth=1, label="log K (uniform)")
    ax.set_xticks(steps)
    ax.set_xlabel("routing step")
    ax.set_ylabel("entropy (nats)")
    ax.set_ylim(0, max(math.log(num_blocks), float(entropy.max())) * 1.1 + 1e-3)
    ax.set_title("Router entropy")
    ax.legend(loc="lower right")


def _draw_token_maps(section, trace: RouteTrace, images: Optional[np.ndarray], num_samples: int) -> None:
    num_steps, _, num_tokens = trace.indices.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        logger.warning("Skipped the token maps: %d tokens do not form a square patch grid.", num_tokens)
        return
    offset = 1 if images is not None else 0
    axes = section.subplots(num_samples, num_steps + offset, squeeze=False)
    colormap = ListedColormap(_block_colors(trace.num_blocks))
    timestep = trace.timesteps[0].item()
    for sample in range(num_samples):
        if images is not None:
            image = images[sample]
            axes[sample, 0].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axes[sample, 0].set_title("sample" if sample == 0 else "")
        for step in range(num_steps):
            grid = trace.indices[step, sample].reshape(side, side).numpy()  # (T,) -> (h, w) patch grid
            ax = axes[sample, step + offset]
            ax.imshow(grid, cmap=colormap, vmin=-0.5, vmax=trace.num_blocks - 0.5, interpolation="nearest")
            if sample == 0:
                ax.set_title(f"step {step}")
        for ax in axes[sample]:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=color, label=f"block {k}") for k, color in enumerate(_block_colors(trace.num_blocks))]
    section.legend(handles=handles, loc="outside right center")
    section.suptitle(f"Block per patch at each routing step (timestep {timestep:g})")


# Helpers.


def _check_traces(traces: TracesLike) -> list[RouteTrace]:
    """Return `traces` as a list (a single trace becomes a list of one) after checking they fit together."""
    if isinstance(traces, RouteTrace):
        traces = [traces]
    try:
        traces = list(traces)
    except TypeError:
        raise TypeError(f"`traces` must be a RouteTrace or a list of them, got {type(traces).__name__}.") from None
    if not all(isinstance(trace, RouteTrace) for trace in traces):
        kinds = sorted({type(trace).__name__ for trace in traces})
        raise TypeError(f"`traces` must be RouteTrace objects, e.g. [output.routes], got {', '.join(kinds)}.")
    if len(traces) == 0:
        raise ValueError("`traces` is empty; pass the route traces of at least one forward pass.")
    num_blocks = traces[0].num_blocks
    shape = traces[0].indices.shape
    for trace in traces:
        if trace.num_blocks != num_blocks:
            raise ValueError(f"the traces mix pool sizes {num_blocks} and {trace.num_blocks}; plot one model at a time.")
        if trace.indices.dim() != len(shape) or trace.indices.shape[0] != shape[0]:
            raise ValueError(
                f"the traces mix routing layouts {tuple(shape)} and {tuple(trace.indices.shape)}; "
                "plot one model at a time."
            )
    return traces


def _is_token_routing(trace: RouteTrace) -> bool:
    return trace.indices.dim() == 3  # (S, B, T)


def _least_noisy(traces: Sequence[RouteTrace]) -> RouteTrace:
    return min(traces, key=lambda trace: float(trace.timesteps.double().mean()))


def _block_counts_per_sample(trace: RouteTrace) -> torch.Tensor:
    """Decisions of each sample per step and block: (S, B, K), float64."""
    one_hot = torch.nn.functional.one_hot(trace.indices.cpu(), trace.num_blocks).double()  # (S, B, [T,] K)
    return one_hot.sum(dim=2) if one_hot.dim() == 4 else one_hot


def _block_colors(num_blocks: int) -> list:
    """Pick one color per block from the qualitative tab10 map; colors repeat beyond 10 blocks."""
    colormap = colormaps["tab10"]
    return [colormap(k % colormap.N) for k in range(num_blocks)]


def _images_to_array(images: ImagesLike) -> np.ndarray:
    """Convert images to a float array (B, H, W, C) in [0, 1]."""
    if torch.is_tensor(images):
        if images.dim() != 4:
            raise ValueError(f"image tensors must have shape (B, C, H, W), got {tuple(images.shape)}.")
        return images.detach().float().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"image arrays must have shape (B, H, W, C), got {images.shape}.")
        return np.clip(images.astype(np.float32), 0, 1)
    if isinstance(images, (str, bytes)) or not all(isinstance(image, (PIL.Image.Image, np.ndarray)) for image in images):
        raise TypeError(
            "`images` must be a (B, C, H, W) tensor, a (B, H, W, C) array or a list of PIL images, "
            f"got {type(images).__name__}."
        )
    arrays = []
    for image in images:
        array = np.asarray(image, dtype=np.float32) / 255.0
        arrays.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(arrays)
