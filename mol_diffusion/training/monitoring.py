"""Training-run bookkeeping: the JSON-lines log, route counts and the non-finite loss guard."""

import json
import logging
import os
import time
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

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

    Args:
        accelerator ([`Accelerator`]): Provides `log` and the main-process flags.
        output_dir (`str`): Training output folder.
        resume_step (`int`): Global step the run starts from.
        max_train_steps (`int`): Total number of updates, for the progress bar.
        images_per_update (`int`): Images per optimizer update over all processes.
        num_blocks (`int`, *optional*): K for MoL models; None for models without routes.
        log_every_steps (`int`): Route-count logging window; 0 turns route logging off.
    """

    def __init__(
        self, accelerator, output_dir, resume_step, max_train_steps, images_per_update, num_blocks, log_every_steps
    ):
        self.accelerator = accelerator
        self.images_per_update = images_per_update
        self.log_every_steps = log_every_steps
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
