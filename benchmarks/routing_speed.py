"""Time token routing and route-table sampling against a dense stack of the same compute.

Each routed model is compared with `router_mode="sequential"` of the same routing depth S (K = S
separate blocks applied in order, i.e. a plain DiT-style stack), so both do S block applications
per forward pass. The variants are timed interleaved in one process: every repeat runs each
variant once, in an order that rotates between repeats, and the table reports the median.

Example (the demo model size of configs/mnist_mol_cpu.yaml):

    OMP_NUM_THREADS=1 python benchmarks/routing_speed.py --num_threads 1 --output outputs/routing_speed.json
"""

import argparse
import datetime
import json
import logging
import os
import statistics
import sys

import torch
from diffusers import DDIMScheduler

from mol_diffusion import MoLPipeline, MoLTransformer2DModel
from speed import machine_description, time_interleaved  # benchmarks/ is the script's folder

logger = logging.getLogger(__name__)

# Goals: the routed variant's median time over the dense variant's.
GOALS = {"token routing": 1.15, "route-table sampling": 1.02}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time token routing and route-table sampling against dense stacks.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch.set_num_threads for the whole run.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed repeats per variant; the median is reported.")
    parser.add_argument("--sample_size", type=int, default=16, help="Image side in pixels.")
    parser.add_argument("--patch_size", type=int, default=2, help="Patch side in pixels.")
    parser.add_argument("--num_attention_heads", type=int, default=4, help="Attention heads per block.")
    parser.add_argument("--attention_head_dim", type=int, default=32, help="Width of one attention head.")
    parser.add_argument("--num_routing_steps", type=int, default=6, help="S, block applications per forward pass.")
    parser.add_argument("--num_pool_blocks", type=int, default=4, help="K of the routed models.")
    parser.add_argument("--num_classes", type=int, default=10, help="Classes of the class-conditional models.")
    parser.add_argument("--train_batch_size", type=int, default=64, help="Batch of the token-routing timings.")
    parser.add_argument("--sample_batch_size", type=int, default=16, help="Images per sampling call.")
    parser.add_argument("--num_inference_steps", type=int, default=10, help="DDIM steps per sampling call.")
    parser.add_argument("--output", type=str, default="routing_speed.json", help="Path of the JSON results.")
    return parser.parse_args(argv)


def build_model(args, **routing) -> MoLTransformer2DModel:
    torch.manual_seed(0)
    model = MoLTransformer2DModel(
        sample_size=args.sample_size,
        patch_size=args.patch_size,
        in_channels=1,
        num_attention_heads=args.num_attention_heads,
        attention_head_dim=args.attention_head_dim,
        num_routing_steps=args.num_routing_steps,
        num_classes=args.num_classes,
        **routing,
    )
    # Open the adaLN-Zero gates, so blocks do real work and routes are not those of an identity network.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def dense_model(args) -> MoLTransformer2DModel:
    return build_model(args, num_pool_blocks=args.num_routing_steps, router_mode="sequential")


# Timed operations. Each returns a function that runs the operation once.


def training_step(model, batch_size, sample_size):
    """Forward and backward pass of the epsilon loss plus the router loss, in training mode."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, sample_size, sample_size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, model.config.num_classes, (batch_size,), generator=generator)
    model.train()

    def run():
        output = model(x, timesteps, class_labels=labels)
        loss = (output.sample - x).square().mean() + output.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def inference_forward(model, batch_size, sample_size):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, sample_size, sample_size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, model.config.num_classes, (batch_size,), generator=generator)
    model.eval()

    def run():
        with torch.no_grad():
            model(x, timesteps, class_labels=labels)

    return run


def sampling_call(model, args, class_labels, guidance_scale, use_route_table):
    """Prepare one MoLPipeline call with DDIM; with `use_route_table`, routes come from a table of its timesteps."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipe = MoLPipeline(transformer=model.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    if use_route_table:
        scheduler.set_timesteps(args.num_inference_steps)
        model.set_route_table(model.tabulate_routes(scheduler.timesteps))
    request = dict(
        num_inference_steps=args.num_inference_steps, guidance_scale=guidance_scale, output_type="pt"
    )
    if class_labels is None:
        request["batch_size"] = args.sample_batch_size
    else:
        request["class_labels"] = class_labels

    def run():
        pipe(**request, generator=torch.Generator().manual_seed(0))

    return run


def shared_route_share(model, timesteps, labels) -> float:
    """Share of (timestep, routing step) pairs at which every label of `labels` takes the same block."""
    table = model.tabulate_routes(timesteps)
    columns = [table.class_labels.tolist().index(label) for label in labels]
    indices = table.indices[:, columns]  # (N, B, S)
    return (indices == indices[:, :1]).all(dim=1).double().mean().item()


# Timing.


def median_seconds(operations: dict, repeats: int) -> dict:
    """Time the operations interleaved on the CPU (see speed.py) and return the median seconds per operation."""
    timings = time_interleaved(operations, repeats, device="cpu")
    return {name: statistics.median(values) for name, values in timings.items()}


def main(args):
    # 1. Setup
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    torch.set_num_threads(args.num_threads)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)

    # 2. Token routing against the dense stack: a training step and an inference forward pass.
    token = build_model(args, num_pool_blocks=args.num_pool_blocks, router_granularity="token")
    dense = dense_model(args)
    size = (args.train_batch_size, args.sample_size)
    rows = []
    for operation, make_run in [("training step", training_step), ("inference forward", inference_forward)]:
        logger.info("Timing token routing: %s", operation)
        medians = median_seconds({"dense": make_run(dense, *size), "token": make_run(token, *size)}, args.repeats)
        rows.append(("token routing", operation, medians["dense"], medians["token"]))

    # 3. Route-table sampling against the dense stack: one class for the batch, then classes with guidance.
    routed = build_model(args, num_pool_blocks=args.num_pool_blocks, router_input="none")
    untabulated = build_model(args, num_pool_blocks=args.num_pool_blocks, router_input="none")
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(args.num_inference_steps)
    all_classes = [label % args.num_classes for label in range(args.sample_batch_size)]
    one_class = [0] * args.sample_batch_size
    sampling_cases = [
        ("one class, no guidance", one_class, 1.0, one_class),
        ("all classes, guidance 2", all_classes, 2.0, sorted(set(all_classes)) + [args.num_classes]),
    ]
    shared_shares = {}
    for case, labels, guidance_scale, batch_labels in sampling_cases:
        logger.info("Timing route-table sampling: %s", case)
        routed.clear_route_table()
        shared_shares[case] = shared_route_share(routed, scheduler.timesteps, batch_labels)
        variants = {
            "dense": sampling_call(dense, args, labels, guidance_scale, use_route_table=False),
            "router": sampling_call(untabulated, args, labels, guidance_scale, use_route_table=False),
            "table": sampling_call(routed, args, labels, guidance_scale, use_route_table=True),
        }
        medians = median_seconds(variants, args.repeats)
        rows.append(("route-table sampling", case, medians["dense"], medians["table"]))
        rows.append(("router sampling (no table)", case, medians["dense"], medians["router"]))

    # 4. Report
    load_after = os.getloadavg()
    results = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_description("cpu"),
        "torch": torch.__version__,
        "num_threads": args.num_threads,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "args": vars(args),
        "shared_route_share": shared_shares,
        "rows": [
            {"benchmark": name, "case": case, "dense_seconds": dense_time, "routed_seconds": routed_time,
             "ratio": routed_time / dense_time, "goal": GOALS.get(name)}
            for name, case, dense_time, routed_time in rows
        ],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)

    print("| benchmark | case | dense (ms) | routed (ms) | routed / dense | goal |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in results["rows"]:
        goal = f"<= {row['goal']:.2f}" if row["goal"] else "-"
        print(
            f"| {row['benchmark']} | {row['case']} | {1000 * row['dense_seconds']:.1f} | "
            f"{1000 * row['routed_seconds']:.1f} | {row['ratio']:.3f} | {goal} |"
        )
    print(f"\nShare of (timestep, routing step) pairs served by one block call: {shared_shares}")
    print(f"Load average (1, 5, 15 min) before: {load_before}, after: {load_after}. Results: {args.output}")


if __name__ == "__main__":
    main(parse_args())
