"""MoLPipeline behaviour, and MoLTransformer2DModel inside diffusers' own pipelines."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

import diffusers
import mol_diffusion
from mol_diffusion import MoLPipeline, MoLPipelineOutput, MoLTransformer2DModel, RouteTrace

SIZE = 8
STEPS = 3
NUM_CLASSES = 3
ROUTING_STEPS = 3


def make_model(num_classes=NUM_CLASSES, in_channels=1, out_channels=None, seed=0):
    """Tiny model with every weight perturbed, so the zero-initialised gates do not hide the input."""
    torch.manual_seed(seed)
    model = MoLTransformer2DModel(
        sample_size=SIZE,
        patch_size=2,
        in_channels=in_channels,
        out_channels=out_channels,
        num_attention_heads=2,
        attention_head_dim=16,
        num_pool_blocks=2,
        num_routing_steps=ROUTING_STEPS,
        num_classes=num_classes,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def make_pipeline(scheduler=None, **model_kwargs):
    scheduler = scheduler if scheduler is not None else DDIMScheduler(num_train_timesteps=100)
    pipe = MoLPipeline(transformer=make_model(**model_kwargs), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "pt")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


def record_forward_calls(model):
    """Record (batch size, class_labels) of every transformer forward call."""
    calls = []

    def hook(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        labels = kwargs.get("class_labels")
        calls.append((hidden_states.shape[0], None if labels is None else labels.cpu().clone()))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def record_step_outputs(scheduler):
    """Record the channel count of every model output passed to `scheduler.step`."""
    channels = []
    step = scheduler.step

    def recording_step(model_output, *args, **kwargs):
        channels.append(model_output.shape[1])
        return step(model_output, *args, **kwargs)

    scheduler.step = recording_step
    return channels


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline()


# Output types and ranges


def test_pt_output_shape_and_range(pipe):
    images = sample(pipe, batch_size=2).images

    assert isinstance(images, torch.Tensor)
    assert images.shape == (2, 1, SIZE, SIZE)
    assert images.min() >= 0.0
    assert images.max() <= 1.0


def test_np_output_shape_and_range(pipe):
    images = sample(pipe, batch_size=2, output_type="np").images

    assert isinstance(images, np.ndarray)
    assert images.shape == (2, SIZE, SIZE, 1)
    assert images.min() >= 0.0
    assert images.max() <= 1.0


def test_pil_output_is_grey(pipe):
    images = sample(pipe, batch_size=2, output_type="pil").images

    assert len(images) == 2
    assert all(isinstance(image, PIL.Image.Image) for image in images)
    assert all(image.mode == "L" for image in images)
    assert all(image.size == (SIZE, SIZE) for image in images)


def test_pil_matches_pt_output(pipe):
    tensor = sample(pipe, batch_size=1).images[0, 0]
    image = sample(pipe, batch_size=1, output_type="pil").images[0]

    expected = (tensor * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_latent_output_is_undecoded(pipe):
    latents = sample(pipe, batch_size=2, output_type="latent").images
    images = sample(pipe, batch_size=2).images

    torch.testing.assert_close(images, (latents / 2 + 0.5).clamp(0, 1))


def test_return_dict_false_gives_tuple(pipe):
    images_only = sample(pipe, batch_size=1, return_dict=False)
    with_routes = sample(pipe, batch_size=1, return_dict=False, return_routes=True)

    assert isinstance(images_only, tuple) and len(images_only) == 1
    assert isinstance(with_routes, tuple) and len(with_routes) == 2
    assert len(with_routes[1]) == STEPS


# Class labels and guidance


def test_labels_set_batch_size(pipe):
    images = sample(pipe, class_labels=[0, 2, 1, 1]).images

    assert images.shape == (4, 1, SIZE, SIZE)


@pytest.mark.parametrize("labels", [2, [2], torch.tensor([2]), torch.tensor(2), np.int64(2)])
def test_label_formats_accepted(pipe, labels):
    images = sample(pipe, class_labels=labels).images

    assert images.shape == (1, 1, SIZE, SIZE)


def test_no_labels_sample_null_class():
    pipe = make_pipeline()
    calls = record_forward_calls(pipe.transformer)

    sample(pipe, batch_size=2, guidance_scale=3.0)

    assert len(calls) == STEPS
    for batch, labels in calls:
        assert batch == 2
        assert labels.tolist() == [NUM_CLASSES, NUM_CLASSES]


def test_guidance_batches_cond_and_null():
    pipe = make_pipeline()
    calls = record_forward_calls(pipe.transformer)

    sample(pipe, class_labels=[0, 2], guidance_scale=2.0)

    assert len(calls) == STEPS
    for batch, labels in calls:
        assert batch == 4
        assert labels.tolist() == [0, 2, NUM_CLASSES, NUM_CLASSES]


def test_no_guidance_at_scale_one():
    pipe = make_pipeline()
    calls = record_forward_calls(pipe.transformer)

    sample(pipe, class_labels=[0, 2], guidance_scale=1.0)

    assert [batch for batch, _ in calls] == [2] * STEPS
    assert all(labels.tolist() == [0, 2] for _, labels in calls)


def test_guidance_matches_manual_step():
    pipe = make_pipeline()
    scale = 3.0
    images = sample(pipe, class_labels=[1], guidance_scale=scale, num_inference_steps=1).images

    # One DDIM step by hand: guided noise from separate conditional and null forward passes.
    model = pipe.transformer
    scheduler = DDIMScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    noise = torch.randn((1, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = model(noise, t, class_labels=torch.tensor([1])).sample
        uncond = model(noise, t, class_labels=torch.tensor([NUM_CLASSES])).sample
    guided = uncond + scale * (cond - uncond)
    expected = scheduler.step(guided, t, noise).prev_sample

    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1))


def test_guidance_changes_images(pipe):
    plain = sample(pipe, class_labels=[0, 1], guidance_scale=1.0).images
    guided = sample(pipe, class_labels=[0, 1], guidance_scale=4.0).images

    assert not torch.allclose(plain, guided)


def test_unconditional_model_samples():
    pipe = make_pipeline(num_classes=None)
    calls = record_forward_calls(pipe.transformer)

    images = sample(pipe, batch_size=3).images

    assert images.shape == (3, 1, SIZE, SIZE)
    assert all(labels is None for _, labels in calls)


# Learned variance


def test_learned_variance_reaches_ddpm():
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    pipe = make_pipeline(scheduler=scheduler, out_channels=2)
    channels = record_step_outputs(pipe.scheduler)

    images = sample(pipe, class_labels=[0, 1], guidance_scale=2.0).images

    assert images.shape == (2, 1, SIZE, SIZE)
    assert channels == [2] * STEPS


def test_learned_variance_dropped_for_fixed_variance():
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="fixed_small")
    pipe = make_pipeline(scheduler=scheduler, out_channels=2)
    channels = record_step_outputs(pipe.scheduler)

    images = sample(pipe, batch_size=2).images

    assert images.shape == (2, 1, SIZE, SIZE)
    assert channels == [1] * STEPS


def test_learned_variance_dropped_for_dpm_solver():
    # from_config carries variance_type="learned_range" over to DPM-Solver, whose step would keep
    # 3 channels of the output. The pipeline hands it the noise channels only.
    ddpm = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    scheduler = DPMSolverMultistepScheduler.from_config(ddpm.config)
    pipe = make_pipeline(scheduler=scheduler, out_channels=2)
    channels = record_step_outputs(pipe.scheduler)

    images = sample(pipe, batch_size=2).images

    assert scheduler.config.variance_type == "learned_range"
    assert images.shape == (2, 1, SIZE, SIZE)
    assert channels == [1] * STEPS


def test_guidance_keeps_conditional_variance():
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    pipe = make_pipeline(scheduler=scheduler, out_channels=2)
    seen = []
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    sample(pipe, class_labels=[2], guidance_scale=5.0, num_inference_steps=1)

    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    noise = torch.randn((1, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = pipe.transformer(noise, t, class_labels=torch.tensor([2])).sample
    torch.testing.assert_close(seen[0][:, 1:], cond[:, 1:])


# Route traces


def test_routes_none_by_default(pipe):
    assert sample(pipe, batch_size=2).routes is None


def test_routes_one_trace_per_step(pipe):
    output = sample(pipe, batch_size=2, return_routes=True)

    assert isinstance(output, MoLPipelineOutput)
    assert len(output.routes) == STEPS
    for trace in output.routes:
        assert isinstance(trace, RouteTrace)
        assert trace.indices.shape == (ROUTING_STEPS, 2)
        assert trace.probs.shape == (ROUTING_STEPS, 2, 2)
        assert int(trace.block_counts().sum()) == ROUTING_STEPS * 2


def test_routes_record_scheduler_timesteps(pipe):
    output = sample(pipe, batch_size=2, return_routes=True)

    scheduler = DDIMScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(STEPS)
    for trace, t in zip(output.routes, scheduler.timesteps):
        assert trace.timesteps.tolist() == [int(t), int(t)]


def test_routes_cover_conditional_half(pipe):
    output = sample(pipe, class_labels=[0, 1, 2], guidance_scale=2.0, return_routes=True)

    for trace in output.routes:
        assert trace.indices.shape == (ROUTING_STEPS, 3)
        assert trace.probs.shape == (ROUTING_STEPS, 3, 2)
        assert trace.class_labels.tolist() == [0, 1, 2]


# Determinism


def test_same_seed_same_images(pipe):
    first = sample(pipe, seed=7, batch_size=2).images
    second = sample(pipe, seed=7, batch_size=2).images

    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_different_seed_different_images(pipe):
    first = sample(pipe, seed=7, batch_size=2).images
    second = sample(pipe, seed=8, batch_size=2).images

    assert not torch.allclose(first, second)


def test_stochastic_scheduler_uses_generator():
    pipe = make_pipeline(scheduler=DDPMScheduler(num_train_timesteps=100))

    first = sample(pipe, seed=3, batch_size=2).images
    second = sample(pipe, seed=3, batch_size=2).images

    torch.testing.assert_close(first, second, rtol=0, atol=0)


# Schedulers


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDPMScheduler])
def test_scheduler_swap_from_config(pipe, scheduler_class):
    original = pipe.scheduler
    pipe.scheduler = scheduler_class.from_config(original.config)
    try:
        images = sample(pipe, class_labels=[0, 1], guidance_scale=2.0).images
    finally:
        pipe.scheduler = original

    assert images.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(images).all()
    assert images.min() >= 0.0
    assert images.max() <= 1.0


@pytest.mark.parametrize("pipeline_class", [DDPMPipeline, DDIMPipeline])
def test_diffusers_pipeline_runs_mol_model(pipeline_class):
    diffusers_pipe = pipeline_class(unet=make_model(), scheduler=DDPMScheduler(num_train_timesteps=100))
    diffusers_pipe.set_progress_bar_config(disable=True)

    images = diffusers_pipe(
        batch_size=2, num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images

    assert images.shape == (2, SIZE, SIZE, 1)
    assert images.min() >= 0.0
    assert images.max() <= 1.0


# Saving and loading


def test_registered_on_diffusers_module():
    assert diffusers.MoLPipeline is mol_diffusion.MoLPipeline


def test_saved_folder_loads_as_mol_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)

    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)

    assert isinstance(loaded, MoLPipeline)
    assert loaded.vae is None
    torch.testing.assert_close(
        sample(loaded, class_labels=[0, 1], guidance_scale=2.0).images,
        sample(pipe, class_labels=[0, 1], guidance_scale=2.0).images,
        rtol=0,
        atol=0,
    )


def test_saved_folder_loads_with_mol_class(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)

    loaded = MoLPipeline.from_pretrained(tmp_path)

    assert isinstance(loaded.transformer, MoLTransformer2DModel)
    assert isinstance(loaded.scheduler, DDIMScheduler)


# Latent space


def test_vae_decodes_to_upscaled_size():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=100)
    pipe = MoLPipeline(transformer=make_model(in_channels=4), scheduler=scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)

    images = sample(pipe, class_labels=[0, 1], guidance_scale=2.0).images
    latents = sample(pipe, class_labels=[0, 1], guidance_scale=2.0, output_type="latent").images

    assert latents.shape == (2, 4, SIZE, SIZE)
    assert images.shape == (2, 1, 2 * SIZE, 2 * SIZE)
    assert images.min() >= 0.0
    assert images.max() <= 1.0


# Errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": [0, NUM_CLASSES]}, "outside the model's classes"),
        ({"class_labels": [-1]}, "outside the model's classes"),
        ({"class_labels": [0, 1], "batch_size": 3}, "does not match"),
        ({"class_labels": []}, "empty"),
        ({"class_labels": torch.tensor([0.0])}, "integer tensor"),
        ({"class_labels": ["a"]}, "list of ints"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"output_type": "jpeg"}, "output_type must be one of"),
    ],
)
def test_invalid_arguments_raise(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(pipe, **kwargs)


def test_labels_on_unconditional_model_raise():
    pipe = make_pipeline(num_classes=None)

    with pytest.raises(ValueError, match="unconditional"):
        sample(pipe, class_labels=[0])


def test_vae_latent_mismatch_raises():
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    pipe = MoLPipeline(transformer=make_model(in_channels=1), scheduler=DDIMScheduler(), vae=vae)

    with pytest.raises(ValueError, match="latent_channels"):
        sample(pipe, batch_size=1)
