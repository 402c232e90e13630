"""Measure the training-step time of the demo-size MoL model, eager and with `torch.compile`.

One step is a forward pass on random noisy inputs, the MSE loss plus the router loss, the
backward pass and an AdamW update, which is the work of `train_unet.py` per update without
data loading. The compiled model is built by the same `compile_model` that `--torch_compile`
uses. The first `--warmup_steps` steps, which include compilation and recompilation for new
routing group sizes, are timed separately.

    python benchmarks/compile_speed.py --config configs/mnist_mol_cpu.yaml --steps 20

Prints one line per mode and a JSON summary.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import yaml

from mol_diffusion import MoLTransformer2DModel
from mol_diffusion.training.models import compile_model

NUM_TRAIN_TIMESTEPS = 1000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/mnist_mol_cpu.yaml",
                        help="Training config whose `model:` mapping, resolution and batch size define the model.")
    parser.add_argument("--batch_size", type=int, default=None, help="Batch size; defaults to the config's.")
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps per mode.")
    parser.add_argument("--warmup_steps", type=int, default=5, help="Untimed steps per mode before timing.")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; by default torch's own choice (the number of cores).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(config: dict, seed: int) -> MoLTransformer2DModel:
    torch.manual_seed(seed)
    kwargs = dict(config.get("model", {}))
    kwargs.setdefault("sample_size", config["resolution"])
    kwargs.setdefault("in_channels", 1)
    kwargs.setdefault("num_classes", 10)
    return MoLTransformer2DModel(**kwargs).train()


def train_step(model, optimizer, batch_size: int) -> None:
    config = model.config
    x = torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,))
    labels = torch.randint(0, config.num_classes, (batch_size,))
    output = model(x, timesteps, class_labels=labels)
    loss = F.mse_loss(output.sample[:, : config.in_channels], x) + output.aux_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(mode: str, config: dict, batch_size: int, warmup_steps: int, steps: int, seed: int) -> dict:
    model = build_model(config, seed)
    if mode == "compiled":
        compile_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    start = time.perf_counter()
    for _ in range(warmup_steps):
        train_step(model, optimizer, batch_size)
    warmup_seconds = time.perf_counter() - start

    step_seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, batch_size)
        step_seconds.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "warmup_seconds": round(warmup_seconds, 2),
        "median_step_seconds": round(statistics.median(step_seconds), 4),
        "mean_step_seconds": round(statistics.mean(step_seconds), 4),
        "images_per_second": round(batch_size / statistics.median(step_seconds), 1),
    }


def main(args: argparse.Namespace) -> None:
    with open(args.config, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    batch_size = args.batch_size or config.get("train_batch_size", 128)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for mode in args.modes:
        result = measure(mode, config, batch_size, args.warmup_steps, args.steps, args.seed)
        print(
            f"{mode:>8}: warm-up {result['warmup_seconds']:.1f} s for {args.warmup_steps} steps, then median "
            f"{result['median_step_seconds'] * 1000:.0f} ms per step ({result['images_per_second']} images/s)",
            flush=True,
        )
        results.append(result)
    summary = {
        "config": args.config,
        "batch_size": batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "results": results,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(parse_args())
