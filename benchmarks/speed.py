"""Train-step and sampling throughput and peak memory of MoL variants against dense baselines.

Variants, all at the same resolution, patch size and width (heads x head dim):

    mol               MoL, K=4 pool blocks, S=8 routing steps, learned per-sample routing
    sequential-8      K=S=8 blocks in order: a plain DiT-style stack of the same compute as `mol`
    sequential-4      K=S=4 blocks in order: the same parameters as `mol`
    cyclic            K=4, S=8, block s mod K at step s (weight tying without a router)
    token             K=4, S=8, learned per-token routing
    dit               diffusers DiTTransformer2DModel, depth 8
    unet              diffusers UNet2DModel with the training script's defaults (about 1.2M parameters)
    per-sample-loop   `mol` with a Python loop over the samples of the batch at each routing step, as
                      the original MoL sketch ran it; the reference for the dispatch speed-up

Timing is interleaved in one process: after one warm-up call of every variant, each repeat runs
every variant once, in an order that rotates between repeats, and the tables report the median.
Memory is measured afterwards, one call per variant (see `measure_peak_memory`).

Example:

    python benchmarks/speed.py --repeats 3 --num_inference_steps 2 \
        --output_json outputs/speed.json --output_md outputs/speed.md

On 2 CPU cores shared with other jobs (load average about 5), that command had not finished after
5 minutes, 4 of them in the training-step phase.
"""

import argparse
import ctypes
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from types import SimpleNamespace
from typing import Callable, Optional

import diffusers
import psutil
import torch
from diffusers import DDIMScheduler

from mol_diffusion import MoLPipeline, MoLTransformer2DModel
from mol_diffusion.training.models import build_model

logger = logging.getLogger("benchmarks.speed")

VARIANTS = ("mol", "sequential-8", "sequential-4", "cyclic", "token", "dit", "unet", "per-sample-loop")

# Goals: (name, numerator variant, denominator variant, comparison, bound). The ratio is of the
# median seconds per call, so "<=" means the numerator must be at most `bound` times as slow.
GOALS = (
    ("routing overhead vs the same-compute dense stack", "mol", "sequential-8", "<=", 1.05),
    ("speed-up over the per-sample loop", "per-sample-loop", "mol", ">=", 10.0),
    ("time vs diffusers DiT of the same depth and width", "mol", "dit", "<=", 0.8),
)

NUM_TRAIN_TIMESTEPS = 1000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Measure train-step and sampling throughput (images/s) and peak memory of MoL and baselines."
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Images per train step and per sampling call.")
    parser.add_argument("--resolution", type=int, default=16, help="Image side in pixels.")
    parser.add_argument("--patch_size", type=int, default=2, help="Patch side in pixels of the transformers.")
    parser.add_argument("--width", type=int, default=128, help="Transformer width D = heads x head dim.")
    parser.add_argument("--heads", type=int, default=4, help="Attention heads; must divide --width.")
    parser.add_argument("--num_classes", type=int, default=10, help="Classes of the class-conditional models.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per variant; the median is reported.")
    parser.add_argument(
        "--num_inference_steps", type=int, default=10, help="DDIM steps per sampling call (MoLPipeline)."
    )
    parser.add_argument(
        "--guidance_scale", type=float, default=1.0,
        help="Classifier-free guidance scale of the sampling calls; above 1 doubles the batch of each step.",
    )
    parser.add_argument(
        "--variants", type=str, default=",".join(VARIANTS),
        help=f"Comma-separated subset of: {', '.join(VARIANTS)}.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's choice.")
    parser.add_argument("--device", type=str, default="cpu", help="`cpu` or `cuda` (or `cuda:N`).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and the inputs.")
    parser.add_argument("--output_json", type=str, default=None, help="Write the results as JSON to this path.")
    parser.add_argument("--output_md", type=str, default=None, help="Write the markdown report to this path.")
    args = parser.parse_args(argv)

    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    if not args.variants:
        parser.error(f"--variants is empty; choose from {', '.join(VARIANTS)}.")
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}.")
    if args.width % args.heads != 0:
        parser.error(f"--heads {args.heads} does not divide --width {args.width}; pick a divisor.")
    for name in ("batch_size", "repeats", "num_inference_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    return args


# Models.


class PerSampleLoopMoL(MoLTransformer2DModel):
    """MoL whose dispatch runs each sample through its chosen block in a Python loop.

    This is how the original MoL sketch applied the router's choices: one block call per sample
    and routing step, with the block index read back to the host by `int(...)` for every sample.
    Outputs equal those of the grouped dispatch; only the speed differs.
    """

    def _dispatch(self, indices: torch.LongTensor, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.config.router_granularity != "sample":
            raise ValueError("the per-sample loop reference supports router_granularity='sample' only.")
        outputs = [
            self._run_block(int(indices[sample]), x[sample : sample + 1], cond[sample : sample + 1])  # (1, T, D)
            for sample in range(x.shape[0])
        ]
        return torch.cat(outputs)  # (B, T, D)


def model_configs(args) -> dict:
    """Return {variant: (`--model` name, model config)} for the variants of `train_unet.py`."""
    transformer = {
        "patch_size": args.patch_size,
        "num_attention_heads": args.heads,
        "attention_head_dim": args.width // args.heads,
    }

    def mol(**routing):
        return ("mol", {**transformer, "num_pool_blocks": 4, "num_routing_steps": 8, **routing})

    return {
        "mol": mol(router_mode="learned"),
        "sequential-8": mol(num_pool_blocks=8, router_mode="sequential"),
        "sequential-4": mol(num_pool_blocks=4, num_routing_steps=4, router_mode="sequential"),
        "cyclic": mol(router_mode="cyclic"),
        "token": mol(router_mode="learned", router_granularity="token"),
        "dit": ("dit", {**transformer, "num_layers": 8}),
        "unet": ("unet", {}),
        "per-sample-loop": mol(router_mode="learned"),
    }


def build_variant(name: str, args) -> torch.nn.Module:
    """Build one variant with the training script's model factory, then open its zero-initialised gates."""
    model_name, config = model_configs(args)[name]
    factory_args = SimpleNamespace(
        model=model_name, model_config=config, resolution=args.resolution,
        router_balance_loss_weight=None, router_z_loss_weight=None,
    )
    torch.manual_seed(args.seed)
    model = build_model(factory_args, num_classes=args.num_classes, num_channels=1)
    if name == "per-sample-loop":
        reference = PerSampleLoopMoL.from_config(model.config)
        reference.load_state_dict(model.state_dict())
        model = reference

    # adaLN-Zero blocks start as the identity, and then every sample would take the same route.
    # Small noise on all weights gives the routers real activations to choose from.
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.to(args.device)


def block_applications(model: torch.nn.Module) -> Optional[int]:
    """Transformer blocks run per forward pass; None for the UNet."""
    config = model.config
    if "num_routing_steps" in config:
        return config.num_routing_steps
    return config.get("num_layers")


# Timed operations. Each factory returns a function that runs the operation once.


def make_train_step(model: torch.nn.Module, args) -> Callable[[], None]:
    """Forward, epsilon MSE plus the router loss, backward and an AdamW update, in training mode."""
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, 1, args.resolution, args.resolution)
    clean = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (args.batch_size,), generator=generator)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
    noisy = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS).add_noise(clean, noise, timesteps)
    noisy, noise, timesteps, labels = (tensor.to(args.device) for tensor in (noisy, noise, timesteps, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run():
        model.train()
        output = model(noisy, timesteps, class_labels=labels)
        loss = torch.nn.functional.mse_loss(output.sample, noise)
        aux_loss = getattr(output, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def make_sampling_call(model: torch.nn.Module, args) -> Callable[[], None]:
    """Prepare one MoLPipeline call with DDIM for `batch_size` images with labels 0, 1, ..., in eval mode."""
    pipeline = MoLPipeline(transformer=model, scheduler=DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS))
    pipeline.set_progress_bar_config(disable=True)
    labels = [index % args.num_classes for index in range(args.batch_size)]

    def run():
        model.eval()
        pipeline(
            class_labels=labels, guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
            generator=torch.Generator().manual_seed(args.seed), output_type="pt",
        )

    return run


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(operations: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, list[float]]:
    """Run each operation once to warm up, then `repeats` rounds in rotating order; return seconds per call."""
    names = list(operations)
    for name in names:
        logger.info("Warm-up: %s", name)
        operations[name]()
    synchronize(device)
    timings = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            operations[name]()
            synchronize(device)
            timings[name].append(time.perf_counter() - start)
        logger.info("Repeat %d of %d done.", repeat + 1, repeats)
    # Logged now, so that a run stopped before the report still leaves the medians in its log.
    medians = ", ".join(f"{name} {statistics.median(values):.3f} s" for name, values in timings.items())
    logger.info("Median seconds per call: %s", medians)
    return timings


# Memory.


class _GlibcAllocator:
    """glibc `malloc` controls, so that freed tensor memory leaves the resident set (RSS) at once.

    By default glibc raises its mmap threshold after large frees and keeps freed heap memory for
    reuse, so the RSS of one call would include memory that an earlier call freed. Fixing the
    threshold at 128 KiB makes every large tensor its own mapping, unmapped when freed, and
    `malloc_trim` returns what the heap still holds. Without glibc, both are skipped.
    """

    M_MMAP_THRESHOLD = -3

    def __init__(self):
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 128 * 1024)
        except (OSError, AttributeError) as error:
            logger.warning("glibc malloc controls are unavailable (%s); CPU peak memory may be overstated.", error)
            self.libc = None

    def trim(self) -> None:
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)


class _RssSampler(threading.Thread):
    """Reads the process RSS every `interval` seconds until stopped, keeping the maximum."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def measure_peak_memory(operation: Callable[[], None], device: str, allocator: _GlibcAllocator) -> float:
    """Peak memory of one call above the memory in use before it, in MiB.

    On CUDA this is `torch.cuda.max_memory_allocated` minus the allocated memory before the call.
    On the CPU it is the peak RSS, sampled every millisecond, minus the RSS before the call: an
    estimate that can miss a peak shorter than the sampling interval. Weights, and the optimizer
    state created by the warm-up, are in use before the call, so they are not counted. Activations,
    gradients and temporary buffers are counted.
    """
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        operation()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20

    allocator.trim()
    before = psutil.Process().memory_info().rss
    sampler = _RssSampler()
    sampler.start()
    try:
        operation()
    finally:
        peak = sampler.stop()
    return (peak - before) / 2**20


# Report.


def machine_description(device: str) -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError as error:
        logger.warning("Could not read /proc/cpuinfo (%s); reporting the CPU model as %r.", error, cpu_model)
    description = {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    if device.startswith("cuda"):
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def evaluate_goals(rows: dict) -> list[dict]:
    """Check each goal on the train-step and on the sampling medians of the variants that were run."""
    results = []
    for description, numerator, denominator, comparison, bound in GOALS:
        if numerator not in rows or denominator not in rows:
            continue
        for operation in ("train_step", "sampling"):
            ratio = rows[numerator][f"{operation}_seconds"] / rows[denominator][f"{operation}_seconds"]
            met = ratio <= bound if comparison == "<=" else ratio >= bound
            results.append({
                "goal": description, "operation": operation, "ratio": f"{numerator} / {denominator}",
                "value": ratio, "comparison": comparison, "bound": bound, "met": met,
            })
    return results


def markdown_report(results: dict) -> str:
    args, machine = results["args"], results["machine"]
    lines = [
        f"Batch {args['batch_size']}, {args['resolution']}x{args['resolution']} images, patch {args['patch_size']}, "
        f"width {args['width']} ({args['heads']} heads), {args['num_classes']} classes; sampling: DDIM "
        f"{args['num_inference_steps']} steps, guidance {args['guidance_scale']}. Median of {args['repeats']} "
        f"interleaved repeats on {args['device']}.",
        "",
        "| variant | parameters (M) | blocks per forward | train step (ms) | train images/s | sampling call (ms) "
        "| sampling images/s | peak train memory (MiB) | peak sampling memory (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["variants"].items():
        blocks = "-" if row["block_applications"] is None else str(row["block_applications"])
        lines.append(
            f"| {name} | {row['parameters_millions']:.2f} | {blocks} | {1000 * row['train_step_seconds']:.0f} | "
            f"{row['train_images_per_second']:.1f} | {1000 * row['sampling_seconds']:.0f} | "
            f"{row['sampling_images_per_second']:.1f} | {row['train_peak_memory_mib']:.0f} | "
            f"{row['sampling_peak_memory_mib']:.0f} |"
        )
    lines += ["", "| goal | operation | ratio of median times | value | goal | met |", "| --- | --- | --- | ---: | ---: | --- |"]
    for goal in results["goals"]:
        lines.append(
            f"| {goal['goal']} | {goal['operation']} | {goal['ratio']} | {goal['value']:.2f} | "
            f"{goal['comparison']} {goal['bound']:g} | {'yes' if goal['met'] else 'no'} |"
        )
    lines += [
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores_usable']} usable of {machine['cpu_cores']} cores, "
        f"{machine['torch_threads']} torch threads" + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
        + f"; torch {machine['torch']}, diffusers {machine['diffusers']}.",
        f"Load average (1, 5, 15 min) before: {results['load_average_before']}, after: {results['load_average_after']}.",
        f"Command: `{results['command']}` ({results['date']}).",
    ]
    return "\n".join(lines) + "\n"


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def main(args) -> dict:
    # 1. Setup.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)

    # 2. Models and operations.
    models = {name: build_variant(name, args) for name in args.variants}
    train_steps = {name: make_train_step(model, args) for name, model in models.items()}
    sampling_calls = {name: make_sampling_call(model, args) for name, model in models.items()}

    # 3. Timing, interleaved across variants.
    logger.info("Timing train steps of %s.", ", ".join(models))
    train_times = time_interleaved(train_steps, args.repeats, args.device)
    logger.info("Timing sampling calls of %s.", ", ".join(models))
    sampling_times = time_interleaved(sampling_calls, args.repeats, args.device)

    # 4. Peak memory, one call per variant. The allocator changes only after timing, because mapping
    # every large tensor on its own slowed timed calls by 10% to 50% on the CPU, unevenly across variants.
    allocator = _GlibcAllocator()
    variants = {}
    for name, model in models.items():
        train_memory = measure_peak_memory(train_steps[name], args.device, allocator)
        sampling_memory = measure_peak_memory(sampling_calls[name], args.device, allocator)
        train_seconds = statistics.median(train_times[name])
        sampling_seconds = statistics.median(sampling_times[name])
        variants[name] = {
            "model_class": type(model).__name__,
            "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
            "block_applications": block_applications(model),
            "train_step_seconds": train_seconds,
            "train_step_seconds_all": train_times[name],
            "train_images_per_second": args.batch_size / train_seconds,
            "sampling_seconds": sampling_seconds,
            "sampling_seconds_all": sampling_times[name],
            "sampling_images_per_second": args.batch_size / sampling_seconds,
            "train_peak_memory_mib": train_memory,
            "sampling_peak_memory_mib": sampling_memory,
        }

    # 5. Report.
    results = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_description(args.device),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "args": vars(args),
        "variants": variants,
        "goals": evaluate_goals(variants),
    }
    report = markdown_report(results)
    print(report)
    if args.output_json:
        write_text(args.output_json, json.dumps(results, indent=2))
        logger.info("Wrote %s", args.output_json)
    if args.output_md:
        write_text(args.output_md, report)
        logger.info("Wrote %s", args.output_md)
    return results


if __name__ == "__main__":
    main(parse_args())
