"""Training-run bookkeeping: the JSON-lines log, route counts and plots, and the non-finite loss guard."""

import json
import logging
import os
import time
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from ..visualization import plot_routes

logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.jsonl"


class TrainLog:
    """Append-only `train_log.jsonl`: one JSON object per optimizer update.

    Each line has `step`, the fields passed to `write` (the training script passes `loss`, `lr` and
    `images_per_second`, among others) and `elapsed_seconds`: wall-clock seconds since training
    started, including sampling and checkpointing, summed over all runs of this output folder.
    On resume, lines after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped, so every step appears once and the elapsed time continues.

    Args:
        output_dir (`str`): Training output folder.
        resume_step (`int`): Global step the run starts from; 0 for a new run.
        enabled (`bool`): False on non-main processes, which then write nothing.
    """

    def __init__(self, output_dir: str, resume_step: int = 0, enabled: bool = True):
        self.path = os.path.join(output_dir, TRAIN_LOG_NAME)
        self.enabled = enabled
        self.previous_seconds = 0.0
        if enabled:
            self.previous_seconds = self._truncate_after(resume_step)
        self.start_time = time.perf_counter()

    @property
    def elapsed_seconds(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.start_time

    def write(self, step: int, **values: Any) -> None:
        """Append one line with `step`, the given values and `elapsed_seconds`."""
        if not self.enabled:
            return
        record = {"step": step, **values, "elapsed_seconds": round(self.elapsed_seconds, 3)}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def _truncate_after(self, step: int) -> float:
        """Drop lines with a step above `step`; return the elapsed seconds of the last kept line."""
        if not os.path.exists(self.path):
            return 0.0
        kept, elapsed = [], 0.0
        with open(self.path, encoding="utf-8") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("Skipping a malformed line of %s: %r", self.path, line[:80])
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    elapsed = float(record.get("elapsed_seconds", elapsed))
        temporary_path = self.path + ".tmp"
        with open(temporary_path, "w", encoding="utf-8") as file:
            file.writelines(kept)
        os.replace(temporary_path, self.path)
        return elapsed


class RouteCounter:
    """Sums the routes taken per pool block over a logging window.

    Args:
        num_blocks (`int`): K, the size of the block pool.
    """

    def __init__(self, num_blocks: int):
        self.counts = torch.zeros(num_blocks, dtype=torch.long)

    def add(self, routes) -> None:
        """Add the block counts of a `RouteTrace`; None (a model without routes) is ignored."""
        if routes is not None:
            self.counts += routes.block_counts().cpu()

    def flush(self) -> dict[str, float]:
        """Return `route_count/block_k` and `route_share/block_k` for the window, then reset the counts."""
        total = max(int(self.counts.sum()), 1)
        logs = {}
        for block, count in enumerate(self.counts.tolist()):
            logs[f"route_count/block_{block}"] = count
            logs[f"route_share/block_{block}"] = count / total
        self.counts.zero_()
        return logs


def find_collapsed_block(counts: torch.Tensor, threshold: float) -> Optional[tuple[int, float]]:
    """Find a block that took more than `threshold` of the routes counted in `counts` (K,).

    A pool of one block and a window without routes never count as collapsed.

    Returns:
        `(block, share)` of the most used block when its share exceeds `threshold`, else `None`.
    """
    total = int(counts.sum())
    if counts.numel() < 2 or total == 0:
        return None
    block = int(counts.argmax())
    share = int(counts[block]) / total
    return (block, share) if share > threshold else None


class RoutePlotWriter:
    """Writes route plots of a fixed batch of training images noised to a spread of timesteps.

    Each call of `write` noises the same clean images with the same noise at `num_timesteps`
    timesteps spread evenly over the training schedule, runs the model in eval mode with
    `return_routes=True`, and plots the traces with [`plot_routes`] to `routes/step-N.png`. Token
    maps, for token routing, show the routes at the least noisy timestep next to the clean images.

    Args:
        output_dir (`str`): Training output folder.
        noise_scheduler ([`DDPMScheduler`]): The training noise scheduler.
        clean_images (`torch.Tensor`): Fixed batch (B, C, H, W) in [-1, 1].
        class_labels (`torch.LongTensor`, *optional*): Labels (B,) for a class-conditional model.
        num_timesteps (`int`): Timesteps per plot.
        seed (`int`): Seed of the noise.
    """

    def __init__(self, output_dir, noise_scheduler, clean_images, class_labels=None, num_timesteps=10, seed=0):
        self.output_dir = output_dir
        self.noise_scheduler = noise_scheduler
        self.clean_images = clean_images
        self.class_labels = class_labels
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.linspace(num_train_timesteps - 1, 0, num_timesteps).round().long().unique().flip(0)
        self.noise = torch.randn(clean_images.shape, generator=torch.Generator().manual_seed(seed))

    @classmethod
    def from_dataset(cls, output_dir, noise_scheduler, dataset: Dataset, use_labels: bool, num_images: int = 8, **kwargs):
        """Take `num_images` items spread evenly over a dataset of `pixel_values` (and `class_labels`).

        Spreading the items, rather than taking the first ones, shows several classes of a dataset sorted by class.
        """
        positions = torch.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).round().long().tolist()
        # Random crops and flips draw from torch's generator; forking it keeps the run's data order unchanged.
        with torch.random.fork_rng(devices=[]):
            batch = default_collate([dataset[position] for position in positions])
        labels = batch.get("class_labels") if use_labels else None
        return cls(output_dir, noise_scheduler, batch["pixel_values"], labels, **kwargs)

    @torch.no_grad()
    def trace(self, model: torch.nn.Module) -> list:
        """Return one `RouteTrace` per timestep (noisiest first), computed in eval mode."""
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        clean = self.clean_images.to(device)
        noise = self.noise.to(device)
        labels = None if self.class_labels is None else self.class_labels.to(device)
        was_training = model.training
        model.eval()
        traces = []
        try:
            for timestep in self.timesteps.tolist():
                timesteps = torch.full((len(clean),), timestep, dtype=torch.long, device=device)
                noisy = self.noise_scheduler.add_noise(clean, noise, timesteps).to(dtype)
                output = model(noisy, timesteps, class_labels=labels, return_routes=True)
                traces.append(output.routes.detach_cpu())
        finally:
            model.train(was_training)
        return traces

    def write(self, model: torch.nn.Module, step: int) -> str:
        """Plot the routes of `model` to `routes/step-{step}.png` and return the path."""
        path = os.path.join(self.output_dir, "routes", f"step-{step}.png")
        images = (self.clean_images.float() + 1) / 2  # [-1, 1] -> [0, 1]
        return plot_routes(self.trace(model), path, images=images, title=f"Routes at training step {step}")


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive optimizer updates with a non-finite loss."""


class NonFiniteGuard:
    """Counts consecutive updates whose loss is NaN or infinite.

    Args:
        max_consecutive (`int`): Number of consecutive non-finite updates that ends training.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def update(self, finite: bool, step: int) -> bool:
        """Record one update's outcome; return True when training must stop."""
        if finite:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        logger.warning(
            "Non-finite loss at step %d: skipped the update (%d in a row, stopping at %d).",
            step,
            self.consecutive,
            self.max_consecutive,
        )
        return self.consecutive >= self.max_consecutive


class Throughput:
    """Images per second of the last update, smoothed for the progress bar."""

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.last_time = time.perf_counter()
        self.smoothed: Optional[float] = None

    def update(self, num_images: int) -> float:
        """Record that `num_images` were processed since the last call; return their images per second."""
        now = time.perf_counter()
        rate = num_images / max(now - self.last_time, 1e-9)
        self.last_time = now
        self.smoothed = rate if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * rate
        return rate

    def restart_clock(self) -> None:
        """Restart the clock, so time spent sampling or checkpointing is not counted as training."""
        self.last_time = time.perf_counter()


class RunReporter:
    """Reports each optimizer update to the progress bar, the trackers and `train_log.jsonl`.

    Route counts of MoL models are summed over `log_every_steps` updates and logged as
    `route_count/block_k` and `route_share/block_k`, both to the trackers and to the log file.
    When one block took more than `collapse_threshold` of the routes of a window, a warning is
    logged.

    Args:
        accelerator ([`Accelerator`]): Provides `log` and the main-process flags.
        output_dir (`str`): Training output folder.
        resume_step (`int`): Global step the run starts from.
        max_train_steps (`int`): Total number of updates, for the progress bar.
        images_per_update (`int`): Images per optimizer update over all processes.
        num_blocks (`int`, *optional*): K for MoL models; None for models without routes.
        log_every_steps (`int`): Route-count logging window; 0 turns route logging off.
        collapse_threshold (`float`, *optional*): Share of a window's routes above which one block
            counts as collapsed; None turns the check off (as for fixed routing).
    """

    def __init__(
        self,
        accelerator,
        output_dir,
        resume_step,
        max_train_steps,
        images_per_update,
        num_blocks,
        log_every_steps,
        collapse_threshold=None,
    ):
        self.accelerator = accelerator
        self.images_per_update = images_per_update
        self.log_every_steps = log_every_steps
        self.collapse_threshold = collapse_threshold
        self.routes = RouteCounter(num_blocks) if num_blocks and log_every_steps else None
        self.throughput = Throughput()
        self.train_log = TrainLog(output_dir, resume_step, enabled=accelerator.is_main_process)
        self.progress_bar = tqdm(
            total=max_train_steps, initial=resume_step, desc="Steps", disable=not accelerator.is_local_main_process
        )

    @property
    def wants_routes(self) -> bool:
        """Whether the model should return its route trace."""
        return self.routes is not None

    def add_routes(self, routes) -> None:
        if self.routes is not None:
            self.routes.add(routes)

    def report(self, step: int, losses, lr: float, ema_decay: Optional[float] = None) -> None:
        """Report the update that brought the run to `step`."""
        images_per_second = self.throughput.update(self.images_per_update)
        logs = {
            "loss": losses.loss.detach().item(),
            "diffusion_loss": losses.diffusion_loss.detach().item(),
            "vlb_loss": losses.vlb_loss.detach().item(),
            "aux_loss": losses.aux_loss.detach().item(),
            "lr": lr,
            "images_per_second": images_per_second,
        }
        if ema_decay is not None:
            logs["ema_decay"] = ema_decay
        if self.routes is not None and step % self.log_every_steps == 0:
            self._warn_on_collapse()
            route_logs = self.routes.flush()
            logs.update(route_logs)
            counts = [value for key, value in route_logs.items() if key.startswith("route_count/")]
            logger.info(
                "Step %d: routes per pool block over the last %d updates: %s", step, self.log_every_steps, counts
            )

        self.accelerator.log(logs, step=step)
        self.train_log.write(step=step, **logs)
        self.progress_bar.update(1)
        self.progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{self.throughput.smoothed:.0f}")

    def close(self) -> None:
        self.progress_bar.close()

    def _warn_on_collapse(self) -> None:
        if self.collapse_threshold is None:
            return
        collapsed = find_collapsed_block(self.routes.counts, self.collapse_threshold)
        if collapsed is not None:
            block, share = collapsed
            logger.warning(
                "router collapse: block %d took %.0f%% of routes over the last %d steps (threshold %.0f%%); "
                "a larger router_balance_loss_weight spreads the routes.",
                block, 100 * share, self.log_every_steps, 100 * self.collapse_threshold,
            )
