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
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast,
    broadcast_object_list,
    set_seed,
)
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from mol_diffusion.data import build_train_dataset, dataset_num_classes, infer_num_channels, load_image_dataset
from mol_diffusion.evaluation import evaluate_pipeline
from mol_diffusion.pipelines.pipeline_mol import denoiser_null_class_label, denoiser_num_classes
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
from mol_diffusion.training.checkpointing import (
    DataPosition,
    EpochSeededDataset,
    checkpoint_step,
    load_checkpoint,
    register_state_hooks,
)
from mol_diffusion.training.config import NOT_RECORDED_FLAGS, config_for_trackers
from mol_diffusion.training.hub import create_hub_repo, upload_output_folder
from mol_diffusion.training.latents import LatentEncoder, check_model_matches_latents, latent_geometry, load_vae
from mol_diffusion.training.model_card import write_model_card
from mol_diffusion.training.models import check_model_matches_dataset, compile_model
from mol_diffusion.training.monitoring import NonFiniteGuard, NonFiniteLossError, RoutePlotWriter, RunReporter
from mol_diffusion.training.sampling import save_sample_grid

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv=None):
    """Parse the command line and the optional `--config` file; see `python train_unet.py --help`."""
    return parse_training_args(argv)


def training_time_is_up(accelerator, reporter, max_train_minutes) -> bool:
    """Whether the output folder's training time passed `max_train_minutes`, as the main process measures it.

    The decision is broadcast from the main process, so that all processes stop at the same update.
    """
    if max_train_minutes is None:
        return False
    elapsed = reporter.train_log.elapsed_seconds  # summed over resumed runs on the main process only
    time_is_up = torch.tensor([float(elapsed >= 60 * max_train_minutes)], device=accelerator.device)
    return bool(broadcast(time_is_up, from_process=0).item())


def evaluate_final_pipeline(pipeline, args, global_step) -> dict:
    """Score the saved pipeline with `evaluate_pipeline` and DDIM, write `eval.json` and log the numbers."""
    class_conditional = denoiser_num_classes(pipeline.transformer) is not None
    guidance_scale = args.eval_guidance_scale
    if not class_conditional and guidance_scale != 1.0:
        logger.warning("--eval_guidance_scale=%s is ignored: the model is unconditional.", guidance_scale)
        guidance_scale = 1.0
    dataset_name = args.eval_dataset_name or args.dataset_name

    try:
        results = evaluate_pipeline(
            pipeline,
            num_samples=args.eval_num_samples,
            class_conditional=class_conditional,
            guidance_scale=guidance_scale,
            num_inference_steps=args.eval_inference_steps,
            scheduler="ddim",
            seed=args.seed or 0,
            dataset_name=dataset_name,
        )
    except ValueError as error:
        raise ConfigError(
            f"--eval_at_end failed on {dataset_name}: {error} The pipeline is saved in {args.output_dir}; fix the "
            f"eval flags and run `python -m mol_diffusion.evaluation --model_dir {args.output_dir}`."
        ) from error
    results["global_step"] = global_step

    path = os.path.join(args.output_dir, "eval.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    accuracy = results["class_accuracy"]
    logger.info(
        "Evaluation after %d updates, %d samples: Frechet distance %.3f (real-data floor %.3f), class accuracy %s. "
        "Wrote %s.",
        global_step, results["num_samples"], results["frechet_distance"], results["real_floor"],
        "n/a" if accuracy is None else f"{accuracy:.3f}", path,
    )
    return results


def main(args):
    # 1. Setup: accelerator, logging, seed, output folder.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # Learned routing leaves the pool blocks that no sample chose without gradients, which plain
        # DDP rejects. find_unused_parameters marks them after every forward pass, which costs one
        # traversal of the autograd graph per step. A single process has no DDP wrapper to configure.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.model == "mol")],
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
            json.dump({key: value for key, value in vars(args).items() if key not in NOT_RECORDED_FLAGS}, file, indent=2)
    hub_repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        hub_repo_id = create_hub_repo(args.output_dir, args.hub_model_id, args.hub_token)

    # 2. Data, and the VAE that encodes it to latents when training in latent space.
    try:
        dataset = load_image_dataset(
            dataset_name=args.dataset_name,
            train_data_dir=args.train_data_dir,
            dataset_config_name=args.dataset_config_name,
            cache_dir=args.cache_dir,
        )
    except (ValueError, OSError) as error:  # OSError includes a missing folder and an unreachable Hub
        raise ConfigError(f"cannot load the training data: {error}") from error
    dataset_classes = dataset_num_classes(dataset)
    vae = load_vae(args.vae, accelerator.device, args.cache_dir) if args.vae is not None else None
    if vae is None:
        image_channels = args.model_config.get("in_channels") or infer_num_channels(dataset)
        num_channels, sample_size = image_channels, args.resolution  # of the model input
    else:
        image_channels = vae.config.in_channels
        num_channels, sample_size = latent_geometry(vae, args.resolution)
    train_dataset = build_train_dataset(
        dataset, args.resolution, center_crop=args.center_crop, random_flip=args.random_flip, num_channels=image_channels
    )
    latent_encoder = LatentEncoder(vae, args.vae_latent_sampling) if vae is not None else None
    if args.cache_latents:
        train_dataset = latent_encoder.cache(train_dataset, show_progress=accelerator.is_local_main_process)
    # Shuffle order and augmentations come from the data seed, not from the global RNG, so that a
    # resumed run gets the batches of the uninterrupted run. Without --seed, every process uses the
    # main process's random seed, which is also the one saved in checkpoints.
    data_seed = args.seed
    if data_seed is None:
        data_seed = broadcast_object_list([torch.initial_seed() % 2**32])[0]
    seeded_dataset = EpochSeededDataset(train_dataset, data_seed)
    train_dataloader = torch.utils.data.DataLoader(
        seeded_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        generator=seeded_dataset.generator,
        num_workers=args.dataloader_num_workers,
        drop_last=len(train_dataset) > args.train_batch_size,
    )

    # 3. Model, noise scheduler and EMA.
    try:
        model = build_model(args, num_classes=dataset_classes, num_channels=num_channels, sample_size=sample_size)
    except ValueError as error:
        message = f"invalid model config: {error}"
        if "sample_size" in str(error):
            # sample_size is not a training option: it comes from --resolution, so name that.
            source = "the latent size of --resolution" if vae is not None else "--resolution"
            message += f" The model's sample_size ({sample_size or args.resolution}) is {source} {args.resolution}."
        raise ConfigError(message) from error
    check_model_matches_dataset(model, dataset_classes)
    if vae is not None:
        check_model_matches_latents(model, num_channels, sample_size)
    num_classes = denoiser_num_classes(model)
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
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.torch_compile:
        compile_model(model)

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
    position = DataPosition(data_seed)
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        logger.info("Resuming from %s", resume_path)
        saved_position = load_checkpoint(accelerator, resume_path)
        global_step = checkpoint_step(resume_path)
        # Checkpoints without a saved position assume that no update was skipped as non-finite.
        if saved_position is None:
            batches_done = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
            saved_position = DataPosition(data_seed, global_step // updates_per_epoch, batches_done)
        position = saved_position
        seeded_dataset.seed = position.data_seed

    unwrapped = accelerator.unwrap_model(model)
    loss_options = {
        "snr_gamma": args.snr_gamma,
        "class_dropout_prob": args.class_dropout_prob,
        "null_class_label": denoiser_null_class_label(unwrapped),
        "use_class_labels": num_classes is not None,
    }
    images_per_update = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learned_routing = getattr(unwrapped.config, "router_mode", None) == "learned"
    route_plotter = None
    if args.route_plot_every_steps and vae is not None:
        logger.warning("--route_plot_every_steps is not supported with --vae yet, so no route plots are written.")
    elif args.route_plot_every_steps and hasattr(unwrapped.config, "num_pool_blocks"):
        route_plotter = RoutePlotWriter.from_dataset(
            args.output_dir, noise_scheduler, train_dataset, use_labels=num_classes is not None, seed=args.seed or 0
        )
    elif args.route_plot_every_steps:
        logger.warning(
            "--route_plot_every_steps needs a MoL model, but --model %s has no router, so no route plots are written.",
            args.model,
        )
    reporter = RunReporter(
        accelerator, args.output_dir, global_step, max_train_steps, images_per_update,
        num_blocks=getattr(unwrapped.config, "num_pool_blocks", None), log_every_steps=args.log_every_steps,
        collapse_threshold=args.router_collapse_threshold if learned_routing else None,
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
                args.sample_guidance_scale, ema_model=ema_model, seed=args.seed or 0, vae=vae,
            )
            logger.info("Wrote samples to %s", path)
        reporter.throughput.restart_clock()

    def write_route_plot(step):
        if accelerator.is_main_process:
            logger.info("Wrote route plots to %s", route_plotter.write(unwrapped, step))
        reporter.throughput.restart_clock()

    # 5. Training loop.
    # Epochs run until max_train_steps updates are done or --max_train_minutes have passed; skipped
    # non-finite updates add batches.
    all_finite = True  # over the batches of the current gradient-accumulation window
    time_is_up = training_time_is_up(accelerator, reporter, args.max_train_minutes)
    while global_step < max_train_steps and not time_is_up:
        model.train()
        if position.batches_done >= len(train_dataloader):
            position = DataPosition(position.data_seed, position.epoch + 1)
        seeded_dataset.begin_epoch(position.epoch)
        batches = train_dataloader
        if position.batches_done:
            batches = accelerator.skip_first_batches(train_dataloader, position.batches_done)
        for batch in batches:
            position.batches_done += 1
            if latent_encoder is not None:
                batch = latent_encoder.encode_batch(batch)
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
                path = save_checkpoint(
                    accelerator, args.output_dir, global_step, args.checkpoints_total_limit, position
                )
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
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, position)
                reporter.throughput.restart_clock()
            if args.sample_every_steps and global_step % args.sample_every_steps == 0:
                write_samples(global_step)
            if route_plotter is not None and global_step % args.route_plot_every_steps == 0:
                write_route_plot(global_step)
            if global_step >= max_train_steps:
                break
            time_is_up = training_time_is_up(accelerator, reporter, args.max_train_minutes)
            if time_is_up:
                break
    reporter.close()
    if time_is_up:
        logger.info("Stopped at step %d: --max_train_minutes=%s has passed.", global_step, args.max_train_minutes)

    # 6. Save: a final checkpoint to resume from, then the pipeline with the EMA weights.
    if resume_path is None or global_step > checkpoint_step(resume_path):
        if global_step % args.checkpointing_steps != 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, position)
        if args.sample_every_steps and global_step % args.sample_every_steps != 0:
            write_samples(global_step)
        if route_plotter is not None and global_step % args.route_plot_every_steps != 0:
            write_route_plot(global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema_model is not None:
            ema_model.copy_to(unwrapped.parameters())
        unwrapped.eval()
        pipeline = build_pipeline(unwrapped, noise_scheduler, vae=vae)
        save_pipeline_atomically(pipeline, args.output_dir)
        logger.info("Saved the pipeline to %s after %d updates.", args.output_dir, global_step)
        if args.eval_at_end:
            results = evaluate_final_pipeline(pipeline, args, global_step)
            numbers = {key: value for key, value in results.items() if isinstance(value, (int, float))}
            accelerator.log({f"eval/{key}": value for key, value in numbers.items()}, step=global_step)
        logger.info("Wrote the model card %s", write_model_card(args.output_dir, args, unwrapped, global_step, args.vae))
        if hub_repo_id is not None:
            upload_output_folder(hub_repo_id, args.output_dir, args.hub_token)
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
