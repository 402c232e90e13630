"""Scheduler swaps by short name, shared by sample.py and the evaluation CLI."""

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def scheduler_from_name(name: str, config) -> SchedulerMixin:
    """Build the scheduler called `name` from another scheduler's config (beta schedule, target).

    Args:
        name (`str`): One of `SCHEDULERS`.
        config: The config of the scheduler a pipeline was saved with.

    Returns:
        A new scheduler. Only DDPM keeps a learned `variance_type`: with
        `variance_type="learned_range"`, DPM-Solver keeps only the first 3 channels of the model
        output (diffusers 0.42.1), and the others ignore it, so they get a config without it.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    config = dict(config)
    if name != "ddpm":
        config.pop("variance_type", None)
    return SCHEDULERS[name].from_config(config)
