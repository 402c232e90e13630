"""Sample quality against training time: MoL variants and dense baselines under equal wall-clock budgets.

Every variant trains through `train_unet.py` with the same base config (data, noise schedule,
optimiser, EMA) and is scored at `--eval_points` evenly spaced times up to `--budget_minutes`.
Training runs in segments. Segment k resumes the variant's latest checkpoint with
`--max_train_minutes` set to k / eval_points of the budget. Then `--eval_at_end` scores the saved
pipeline (EMA weights, DDIM) with the digit-classifier Frechet distance, its real-data floor and
the class accuracy. Training minutes are the `elapsed_seconds` of `train_log.jsonl`, which count
the training loop and checkpoints but not process start-up or evaluation. Segments run in
round-robin over the variants, so a change in machine load affects all variants alike.

The MoL-family variants (`mol`, `sequential-*`, `cyclic`, `token`) keep the base config's `model:`
options that do not define the variant, such as `long_skip`, `final_conv`, `conv_channels` and the
router losses, so they differ from each other only in routing, pool size and depth. `dit` and `unet`
are diffusers' models as `train_unet.py` builds them.

The learning rate defaults to a constant after warm-up, because the number of updates that fit
in the budget differs between variants and is not known in advance.

Example (10 minutes of training per variant on built-in MNIST, about an hour in total on 2 CPU cores):

    python benchmarks/quality.py --config configs/mnist_mol_cpu.yaml --budget_minutes 10 --eval_points 4 \
        --variants mol,sequential-8,dit,unet --output_dir outputs/quality

Outputs in --output_dir: `quality.json`, `quality.md` and `quality.png` (Frechet distance and class
accuracy against training minutes), plus one training folder per variant.
"""

import argparse
import datetime
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from speed import VARIANTS as SPEED_VARIANTS  # noqa: E402  (benchmarks/ is the script's folder)
from speed import machine_description, model_configs  # noqa: E402

logger = logging.getLogger("benchmarks.quality")

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "train_unet.py"
# The per-sample loop differs from `mol` in speed only, so it has no quality of its own.
VARIANTS = tuple(name for name in SPEED_VARIANTS if name != "per-sample-loop")
DEFAULT_VARIANTS = ("mol", "sequential-8", "dit", "unet")
# Model keys that define a MoL variant; the base config's other `model:` options carry over.
MOL_VARIANT_KEYS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "num_pool_blocks", "num_routing_steps",
    "router_mode", "router_granularity",
)
# Base-config keys that quality.py sets itself for every run.
OVERRIDDEN_KEYS = ("output_dir", "resume_from_checkpoint", "sample_every_steps", "eval_at_end")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train each variant for the same wall-clock budget and score it at several points in time."
    )
    parser.add_argument(
        "--config", type=str, default=str(REPO_ROOT / "configs" / "mnist_mol_cpu.yaml"),
        help="Base train_unet.py config: data, schedule, optimiser and EMA. MoL variants keep its `model:` options "
             "apart from patch size, width, pool, depth and routing; dit and unet ignore them.",
    )
    parser.add_argument("--budget_minutes", type=float, default=10.0, help="Training minutes per variant.")
    parser.add_argument("--eval_points", type=int, default=4, help="Evaluations per variant, evenly spaced in time.")
    parser.add_argument(
        "--variants", type=str, default=",".join(DEFAULT_VARIANTS),
        help=f"Comma-separated subset of: {', '.join(VARIANTS)} (as defined in benchmarks/speed.py).",
    )
    parser.add_argument("--patch_size", type=int, default=2, help="Patch side in pixels of the transformers.")
    parser.add_argument("--width", type=int, default=128, help="Transformer width D = heads x head dim.")
    parser.add_argument("--heads", type=int, default=4, help="Attention heads; must divide --width.")
    parser.add_argument("--eval_num_samples", type=int, default=500, help="Images sampled per evaluation.")
    parser.add_argument(
        "--eval_guidance_scale", type=float, default=1.0,
        help="Classifier-free guidance scale. 1.0 means no guidance: guidance 3 made the demo model worse, because "
             "short runs train its null class little.",
    )
    parser.add_argument("--eval_inference_steps", type=int, default=50, help="DDIM steps per evaluation sample.")
    parser.add_argument(
        "--lr_scheduler", type=str, default="constant_with_warmup",
        help="Learning-rate schedule for every run; `config` keeps the base config's.",
    )
    parser.add_argument(
        "--max_train_steps", type=int, default=1_000_000,
        help="Update limit passed to train_unet.py, so that the time budget ends training; it also sets the "
             "length of a decaying --lr_scheduler.",
    )
    parser.add_argument(
        "--extra_train_args", type=str, default="",
        help="More train_unet.py flags for every run, as one shell-quoted string, e.g. \"--train_batch_size 32\".",
    )
    parser.add_argument("--output_dir", type=str, default="outputs/quality", help="Folder for all outputs.")
    parser.add_argument(
        "--timeout_minutes", type=float, default=None,
        help="Stop a training segment that runs this much longer than its budget; default: no limit.",
    )
    args = parser.parse_args(argv)

    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if not args.variants or unknown:
        parser.error(f"--variants: invalid {args.variants!r}; choose from {', '.join(VARIANTS)}.")
    if args.width % args.heads != 0:
        parser.error(f"--heads {args.heads} does not divide --width {args.width}; pick a divisor.")
    if args.budget_minutes <= 0:
        parser.error(f"--budget_minutes must be positive, got {args.budget_minutes}.")
    if args.eval_points < 1:
        parser.error(f"--eval_points must be at least 1, got {args.eval_points}.")
    if not os.path.isfile(args.config):
        parser.error(f"--config {args.config!r}: file not found; pass a train_unet.py YAML config.")
    return args


def write_variant_config(args, base: dict, base_model: dict, name: str, folder: Path) -> tuple[str, Path]:
    """Write the base config with the variant's `model:` mapping; return (`--model` value, config path).

    A MoL variant's mapping is the base config's `model:` options updated with the variant's own keys.
    """
    model_name, model_config = model_configs(args)[name]
    if model_name == "mol":
        shared = {key: value for key, value in base_model.items() if key not in MOL_VARIANT_KEYS}
        model_config = {**shared, **model_config}
    config = {key: value for key, value in base.items() if key not in OVERRIDDEN_KEYS}
    config["model"] = model_config
    config["max_train_steps"] = args.max_train_steps
    if args.lr_scheduler != "config":
        config["lr_scheduler"] = args.lr_scheduler
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return model_name, path


def train_segment(args, model_name: str, config_path: Path, output_dir: Path, minutes: float, first: bool):
    """Train one variant up to `minutes` of training time in total, then evaluate it; return the process."""
    command = [
        sys.executable, str(TRAIN_SCRIPT), "--config", str(config_path), "--model", model_name,
        "--output_dir", str(output_dir), "--max_train_minutes", f"{minutes:.6g}", "--sample_every_steps", "0",
        "--eval_at_end", "--eval_num_samples", str(args.eval_num_samples),
        "--eval_guidance_scale", str(args.eval_guidance_scale),
        "--eval_inference_steps", str(args.eval_inference_steps),
        *shlex.split(args.extra_train_args),
    ]
    if not first:
        command += ["--resume_from_checkpoint", "latest"]
    timeout = None if args.timeout_minutes is None else 60 * (minutes + args.timeout_minutes)
    logger.info("Running %s", shlex.join(command))
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def read_point(output_dir: Path, segment: int) -> dict:
    """Collect the evaluation and the training time of a finished segment, and keep a copy of its eval.json."""
    evaluation = json.loads((output_dir / "eval.json").read_text())
    shutil.copyfile(output_dir / "eval.json", output_dir / f"eval-segment-{segment}.json")
    last_update = json.loads((output_dir / "train_log.jsonl").read_text().splitlines()[-1])
    return {
        "segment": segment,
        "step": last_update["step"],
        "training_minutes": last_update["elapsed_seconds"] / 60,
        "frechet_distance": evaluation["frechet_distance"],
        "real_floor": evaluation["real_floor"],
        "class_accuracy": evaluation["class_accuracy"],
        "evaluation": evaluation,
    }


def plot_curves(results: dict, path: Path) -> None:
    """Plot the Frechet distance and the class accuracy of each variant against training minutes."""
    figure, (fd_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    floors = []
    for name, variant in results["variants"].items():
        points = variant["points"]
        if not points:
            continue
        minutes = [point["training_minutes"] for point in points]
        fd_axis.plot(minutes, [point["frechet_distance"] for point in points], marker="o", label=name)
        if points[0]["class_accuracy"] is not None:
            accuracy_axis.plot(minutes, [point["class_accuracy"] for point in points], marker="o", label=name)
        floors.append(points[-1]["real_floor"])
    if floors and floors[0] is not None:
        fd_axis.axhline(floors[0], color="gray", linestyle="--", label="real-data floor")
    fd_axis.set(xlabel="training minutes", ylabel="Frechet distance (digit-classifier features)", yscale="log")
    accuracy_axis.set(xlabel="training minutes", ylabel="samples classified as their label", ylim=(0, 1))
    for axis in (fd_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_report(results: dict) -> str:
    args = results["args"]
    lines = [
        f"Budget {args['budget_minutes']:g} training minutes per variant, evaluated {args['eval_points']} times; "
        f"{args['eval_num_samples']} samples per evaluation, DDIM {args['eval_inference_steps']} steps, guidance "
        f"{args['eval_guidance_scale']:g}. Base config: `{args['config']}`.",
        "",
        "| variant | training minutes | updates | Frechet distance | real-data floor | class accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, variant in results["variants"].items():
        for point in variant["points"]:
            accuracy = "-" if point["class_accuracy"] is None else f"{point['class_accuracy']:.3f}"
            lines.append(
                f"| {name} | {point['training_minutes']:.2f} | {point['step']} | {point['frechet_distance']:.2f} | "
                f"{point['real_floor']:.2f} | {accuracy} |"
            )
        if variant["error"] is not None:
            lines.append(f"| {name} | failed: {variant['error']} | | | | |")
    machine = results["machine"]
    lines += [
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores_usable']} usable of {machine['cpu_cores']} cores; "
        f"torch {machine['torch']}, diffusers {machine['diffusers']}.",
        f"Load average (1, 5, 15 min) before: {results['load_average_before']}, after: {results['load_average_after']}.",
        f"Command: `{results['command']}` ({results['date']}).",
    ]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    # 1. Setup: one config per variant.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    output_root = Path(args.output_dir)
    output_root.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.config).read_text()) or {}
    base_model = base.pop("model", None) or {}
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    runs = {name: write_variant_config(args, base, base_model, name, output_root) for name in args.variants}
    results = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_description("cpu"),
        "args": vars(args),
        "load_average_before": load_before,
        "variants": {name: {"model": runs[name][0], "points": [], "error": None} for name in args.variants},
    }

    # 2. Segments in round-robin over the variants; a failed variant is skipped from then on.
    for segment in range(1, args.eval_points + 1):
        minutes = args.budget_minutes * segment / args.eval_points
        for name, (model_name, config_path) in runs.items():
            variant = results["variants"][name]
            if variant["error"] is not None:
                continue
            output_dir = output_root / name
            try:
                process = train_segment(args, model_name, config_path, output_dir, minutes, first=segment == 1)
            except subprocess.TimeoutExpired as error:
                variant["error"] = f"segment {segment} timed out after {error.timeout:.0f} s"
                logger.error("%s: %s; skipping its remaining segments.", name, variant["error"])
                continue
            if process.returncode != 0:
                last_line = (process.stderr.strip().splitlines() or ["(no output)"])[-1]
                variant["error"] = f"segment {segment} exited with {process.returncode}: {last_line}"
                logger.error("%s: %s; skipping its remaining segments. Output:\n%s",
                             name, variant["error"], process.stderr[-3000:])
                continue
            point = read_point(output_dir, segment)
            variant["points"].append(point)
            accuracy = point["class_accuracy"]
            logger.info(
                "%s after %.2f training minutes (%d updates): Frechet distance %.2f (floor %.2f), class accuracy %s.",
                name, point["training_minutes"], point["step"], point["frechet_distance"], point["real_floor"],
                "n/a" if accuracy is None else f"{accuracy:.3f}",
            )

    # 3. Report.
    results["load_average_after"] = os.getloadavg()
    (output_root / "quality.json").write_text(json.dumps(results, indent=2))
    report = markdown_report(results)
    (output_root / "quality.md").write_text(report)
    plot_curves(results, output_root / "quality.png")
    print(report)
    logger.info("Wrote quality.json, quality.md and quality.png to %s", output_root)
    return 1 if any(variant["error"] is not None for variant in results["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
