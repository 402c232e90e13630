"""Train a Mixture of Layers diffusion model on an image dataset with accelerate.

Example (CPU demo, about 10 minutes on two cores):

    python train_unet.py --config configs/mnist_mol_cpu.yaml --output_dir outputs/mnist_mol_cpu

The output folder loads as a pipeline:

    import mol_diffusion
    from diffusers import DiffusionPipeline
    pipeline = DiffusionPipeline.from_pretrained("outputs/mnist_mol_cpu")
"""

import json
import logging
import math
import os
import sys

import datasets
import diffusers
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from mol_diffusion.data import build_train_dataset, dataset_num_classes, infer_num_channels, load_image_dataset
from mol_diffusion.training import (
    ConfigError,
    build_model,
    build_pipeline,
    compute_training_loss,
    parse_training_args,
    resolve_resume_checkpoint,
    save_checkpoint,
    save_pipeline_atomically,
)
from mol_diffusion.training.checkpointing import checkpoint_step, register_state_hooks
from mol_diffusion.training.config import config_for_trackers
from mol_diffusion.training.models import check_model_matches_dataset
from mol_diffusion.training.monitoring import NonFiniteGuard, NonFiniteLossError, RunReporter
from mol_diffusion.training.sampling import save_sample_grid

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv=None):
    """Parse the command line and the optional `--config` file; see `python train_unet.py --help`."""
    return parse_training_args(argv)


def main(args):
    # 1. Setup: accelerator, logging, seed, output folder.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger("mol_diffusion").setLevel(logging.ERROR)
    datasets.utils.logging.set_verbosity_warning()
    diffusers.utils.logging.set_verbosity_warning()
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "training_args.json"), "w", encoding="utf-8") as file:
            json.dump({key: value for key, value in vars(args).items() if key != "explicit_flags"}, file, indent=2)

    # 2. Data.
    try:
        dataset = load_image_dataset(
            dataset_name=args.dataset_name,
            train_data_dir=args.train_data_dir,
            dataset_config_name=args.dataset_config_name,
            cache_dir=args.cache_dir,
        )
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"cannot load the training data: {error}") from error
    dataset_classes = dataset_num_classes(dataset)
    num_channels = args.model_config.get("in_channels") or infer_num_channels(dataset)
    train_dataset = build_train_dataset(
        dataset, args.resolution, center_crop=args.center_crop, random_flip=args.random_flip, num_channels=num_channels
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=len(train_dataset) > args.train_batch_size,
    )

    # 3. Model, noise scheduler and EMA.
    try:
        model = build_model(args, num_classes=dataset_classes, num_channels=num_channels)
    except ValueError as error:
        raise ConfigError(f"invalid model config: {error}") from error
    check_model_matches_dataset(model, dataset_classes)
    num_classes = model.config.num_classes
    learned_variance = model.config.out_channels == 2 * num_channels
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        variance_type="learned_range" if learned_variance else "fixed_small",
    )
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            min_decay=args.ema_min_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=type(model),
            model_config=model.config,
        )
        ema_model.to(accelerator.device)
    logger.info(
        "Model: %s with %.2fM parameters, %s classes, %d channels%s.",
        type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, num_classes, num_channels,
        ", learned variance" if learned_variance else "",
    )

    # 4. Optimisation: optimizer, LR schedule, prepare, checkpoint hooks and resume.
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    updates_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    # The prepared scheduler steps once per process at each update, hence the factor.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    register_state_hooks(accelerator, ema_model)
    if args.logger != "none":
        accelerator.init_trackers("train_unet", config=config_for_trackers(args))

    global_step = 0
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        logger.info("Resuming from %s", resume_path)
        accelerator.load_state(resume_path)
        global_step = checkpoint_step(resume_path)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    unwrapped = accelerator.unwrap_model(model)
    loss_options = {
        "snr_gamma": args.snr_gamma,
        "class_dropout_prob": args.class_dropout_prob,
        "null_class_label": unwrapped.null_class_label,
        "use_class_labels": num_classes is not None,
    }
    images_per_update = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    reporter = RunReporter(
        accelerator, args.output_dir, global_step, max_train_steps, images_per_update,
        num_blocks=getattr(unwrapped.config, "num_pool_blocks", None), log_every_steps=args.log_every_steps,
    )
    guard = NonFiniteGuard(args.max_nonfinite_steps)
    logger.info(
        "Training for %d updates (about %d epochs of %d updates) from step %d; %d images per update.",
        max_train_steps, num_epochs, updates_per_epoch, global_step, images_per_update,
    )

    def write_samples(step):
        if accelerator.is_main_process:
            path = os.path.join(args.output_dir, "samples", f"step-{step}.png")
            save_sample_grid(
                unwrapped, noise_scheduler, path, args.eval_batch_size, args.sample_inference_steps,
                args.sample_guidance_scale, ema_model=ema_model, seed=args.seed or 0,
            )
            logger.info("Wrote samples to %s", path)
        reporter.throughput.restart_clock()

    # 5. Training loop.
    # Epochs run until max_train_steps updates are done; skipped non-finite updates add batches.
    all_finite = True  # over the batches of the current gradient-accumulation window
    epoch = first_epoch
    while global_step < max_train_steps:
        model.train()
        batches = train_dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        epoch += 1
        for batch in batches:
            with accelerator.accumulate(model):
                losses = compute_training_loss(
                    model, batch, noise_scheduler, return_routes=reporter.wants_routes, **loss_options
                )
                finite = bool(accelerator.gather(torch.isfinite(losses.loss.detach()).float().reshape(1)).all())
                all_finite = all_finite and finite
                if finite:
                    accelerator.backward(losses.loss)
                if accelerator.sync_gradients and all_finite:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            reporter.add_routes(losses.routes)
            if not accelerator.sync_gradients:
                continue

            update_done, all_finite = all_finite, True
            if guard.update(update_done, global_step + 1):
                path = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                reporter.close()
                raise NonFiniteLossError(
                    f"the loss was NaN or infinite for {guard.consecutive} updates in a row after step "
                    f"{global_step}; saved {path}. Lower --learning_rate or --max_grad_norm, or use "
                    "--mixed_precision no, then continue with --resume_from_checkpoint latest."
                )
            if not update_done:
                continue

            global_step += 1
            if ema_model is not None:
                ema_model.step(model.parameters())
            ema_decay = ema_model.cur_decay_value if ema_model is not None else None
            reporter.report(global_step, losses, lr_scheduler.get_last_lr()[0], ema_decay)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                reporter.throughput.restart_clock()
            if args.sample_every_steps and global_step % args.sample_every_steps == 0:
                write_samples(global_step)
            if global_step >= max_train_steps:
                break
    reporter.close()

    # 6. Save: a final checkpoint to resume from, then the pipeline with the EMA weights.
    if resume_path is None or global_step > checkpoint_step(resume_path):
        if global_step % args.checkpointing_steps != 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.sample_every_steps and global_step % args.sample_every_steps != 0:
            write_samples(global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema_model is not None:
            ema_model.copy_to(unwrapped.parameters())
        save_pipeline_atomically(build_pipeline(unwrapped, noise_scheduler), args.output_dir)
        logger.info("Saved the pipeline to %s after %d updates.", args.output_dir, global_step)
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(parse_args())
    except ConfigError as error:
        print(f"train_unet.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as error:
        print(f"train_unet.py: stopped: {error}", file=sys.stderr)
        sys.exit(3)
