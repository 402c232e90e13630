"""MoL in the diffusers ecosystem: DiTPipeline, latent-space training with a VAE, loading, schedulers,
model cards, hub flags, gradient checkpointing, mixed precision, torch.compile and EMA resume."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

from mol_diffusion import MoLPipeline, MoLTransformer2DModel
from mol_diffusion.training import ConfigError, parse_training_args
from mol_diffusion.training import hub
from mol_diffusion.training.config import config_for_trackers
from mol_diffusion.training.latents import LatentEncoder, latent_geometry, load_vae
from mol_diffusion.training.model_card import write_model_card
from mol_diffusion.training.models import compile_model

from helpers import read_train_log, run_training, tiny_train_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

NUM_CLASSES = 3
IMAGE_SIZE = 8
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 2  # the test VAE has two down blocks, so it halves the image size once

# builtin:digits (8x8 grayscale, 10 classes) through a 3-channel VAE: latents are 4x4x4.
TINY_CONFIG = tiny_train_config(
    resolution=IMAGE_SIZE, log_every_steps=1, model={"out_channels": 2 * LATENT_CHANNELS}
)


def make_vae(seed=0, **config):
    """Random AutoencoderKL: RGB images, 4 latent channels, downscale factor 2."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        layers_per_block=1,
        **config,
    )
    return vae.eval()


def make_transformer(seed=0, **config):
    """Class-conditional latent model with learned variance, every weight perturbed off its zero init."""
    torch.manual_seed(seed)
    kwargs = {
        "sample_size": LATENT_SIZE,
        "patch_size": 2,
        "in_channels": LATENT_CHANNELS,
        "out_channels": 2 * LATENT_CHANNELS,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_pool_blocks": 2,
        "num_routing_steps": 2,
        "num_classes": NUM_CLASSES,
        "router_hidden_size": 8,
        **config,
    }
    model = MoLTransformer2DModel(**kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def random_images(batch_size=2, seed=0):
    return torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run_training_ok(config_path, output_dir, *flags):
    result = run_training(config_path, output_dir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    make_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def latent_run(tiny_config, vae_dir, tmp_path_factory):
    """Two updates in latent space, encoding every batch, with EMA, a checkpoint and a sample grid."""
    output_dir = tmp_path_factory.mktemp("latent") / "out"
    run_training_ok(
        tiny_config, output_dir, "--vae", str(vae_dir), "--use_ema", "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--sample_every_steps", "2", "--sample_inference_steps", "2",
        "--eval_batch_size", "1", "--hub_token", "not-a-real-token",
    )
    return output_dir


@pytest.fixture(scope="module")
def cached_run(tiny_config, vae_dir, tmp_path_factory):
    """Two updates from cached latent means, with gradient checkpointing and bf16 autocast."""
    output_dir = tmp_path_factory.mktemp("cached") / "out"
    result = run_training_ok(
        tiny_config, output_dir, "--vae", str(vae_dir), "--cache_latents", "--vae_latent_sampling", "mode",
        "--gradient_checkpointing", "--mixed_precision", "bf16", "--max_train_steps", "2",
        "--checkpointing_steps", "10",
    )
    return SimpleNamespace(output_dir=output_dir, stderr=result.stderr)


@pytest.fixture(scope="module")
def loaded_latent_pipeline(latent_run):
    pipeline = DiffusionPipeline.from_pretrained(latent_run)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# DiTPipeline drop-in


def test_dit_pipeline_runs_mol_transformer():
    pipe = DiTPipeline(transformer=make_transformer(), vae=make_vae(), scheduler=DDIMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)

    images = pipe(
        class_labels=[0, 2], guidance_scale=4.0, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images

    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.min() >= 0.0
    assert images.max() <= 1.0


def test_dit_pipeline_accepts_default_out_channels():
    # out_channels=None resolves to in_channels in the saved config, so DiTPipeline's
    # `config.out_channels // 2` works and it treats the model as one without learned variance.
    transformer = make_transformer(out_channels=None)
    assert transformer.config.out_channels == LATENT_CHANNELS
    pipe = DiTPipeline(transformer=transformer, vae=make_vae(), scheduler=DDIMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)

    images = pipe(class_labels=[1], guidance_scale=2.0, num_inference_steps=2, output_type="np").images

    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_dit_pipeline_matches_mol_pipeline():
    # Same noise, DDIM and guidance: equal images only if DiTPipeline's null label 1000 reaches the
    # model's null class (label 3 here), as MoLPipeline passes it.
    transformer, vae = make_transformer(), make_vae()
    dit = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=100))
    mol = MoLPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=100))
    dit.set_progress_bar_config(disable=True)
    mol.set_progress_bar_config(disable=True)
    kwargs = {"class_labels": [0, 2], "guidance_scale": 4.0, "num_inference_steps": 2, "output_type": "pt"}

    dit_images = dit(generator=torch.Generator().manual_seed(0), **kwargs).images
    mol_images = mol(generator=torch.Generator().manual_seed(0), **kwargs).images

    torch.testing.assert_close(dit_images, mol_images, rtol=0, atol=1e-5)


def test_dit_folder_loads_mol_transformer(tmp_path):
    pipe = DiTPipeline(transformer=make_transformer(), vae=make_vae(), scheduler=DDIMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(tmp_path)

    loaded = DiffusionPipeline.from_pretrained(tmp_path)

    assert isinstance(loaded, DiTPipeline)
    assert isinstance(loaded.transformer, MoLTransformer2DModel)


# Latent scaling


def test_latents_use_shift_and_scaling_factor():
    vae = make_vae(scaling_factor=0.5, shift_factor=0.25)
    images = random_images()

    latents = LatentEncoder(vae, sampling="mode").encode_batch({"pixel_values": images})["pixel_values"]

    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, (mean - 0.25) * 0.5)


def test_pipeline_decoding_inverts_latent_scaling():
    vae = make_vae(scaling_factor=0.5, shift_factor=0.25)
    pipe = MoLPipeline(transformer=make_transformer(), scheduler=DDIMScheduler(), vae=vae)
    images = random_images()
    latents = LatentEncoder(vae, sampling="mode").encode_batch({"pixel_values": images})["pixel_values"]

    with torch.no_grad():
        decoded = pipe._decode(latents)
        expected = vae.decode(vae.encode(images).latent_dist.mean).sample
    torch.testing.assert_close(decoded, expected)


def test_cached_latents_draw_fresh_noise():
    dataset = [{"pixel_values": image, "class_labels": torch.tensor(index)} for index, image in enumerate(random_images(3))]
    encoder = LatentEncoder(make_vae(), sampling="sample", batch_size=2)
    cached = encoder.cache(dataset, show_progress=False)
    batch = default_collate([cached[index] for index in range(len(cached))])

    first = encoder.encode_batch(batch)
    second = encoder.encode_batch(batch)

    assert first["pixel_values"].shape == (3, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    assert not torch.equal(first["pixel_values"], second["pixel_values"])
    assert first["class_labels"].tolist() == [0, 1, 2]


def test_cached_mode_latents_match_direct_encoding():
    images = random_images(3)
    encoder = LatentEncoder(make_vae(), sampling="mode", batch_size=2)
    cached = encoder.cache([{"pixel_values": image} for image in images], show_progress=False)

    from_cache = encoder.encode_batch(default_collate([cached[index] for index in range(3)]))["pixel_values"]
    direct = encoder.encode_batch({"pixel_values": images})["pixel_values"]

    torch.testing.assert_close(from_cache, direct)


def test_missing_vae_folder_raises(tmp_path):
    with pytest.raises(ConfigError, match="failed to load an AutoencoderKL"):
        load_vae(str(tmp_path / "missing"))


def test_latent_geometry_from_vae():
    assert latent_geometry(make_vae(), 8) == (LATENT_CHANNELS, 4)


def test_resolution_off_vae_grid_raises():
    with pytest.raises(ConfigError, match="not a multiple of the VAE's downscale factor 2"):
        latent_geometry(make_vae(), 7)


# Latent-space training run


def test_latent_run_saves_vae(latent_run):
    index = json.loads((latent_run / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (latent_run / "vae" / WEIGHTS_NAME).is_file()


def test_latent_model_takes_latent_shape(latent_run):
    config = json.loads((latent_run / "transformer" / "config.json").read_text())
    assert config["in_channels"] == LATENT_CHANNELS
    assert config["sample_size"] == LATENT_SIZE


def test_latent_folder_loads_as_mol_pipeline(loaded_latent_pipeline):
    assert isinstance(loaded_latent_pipeline, MoLPipeline)
    assert isinstance(loaded_latent_pipeline.vae, AutoencoderKL)


def test_latent_folder_samples_decoded_images(loaded_latent_pipeline):
    images = loaded_latent_pipeline(class_labels=[0, 9], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_scheduler_swaps_from_config(loaded_latent_pipeline, scheduler_class):
    original = loaded_latent_pipeline.scheduler
    loaded_latent_pipeline.scheduler = scheduler_class.from_config(original.config)
    try:
        images = loaded_latent_pipeline(
            class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=2, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images
    finally:
        loaded_latent_pipeline.scheduler = original

    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(images).all()


def test_latent_sample_grid_is_decoded(latent_run):
    with Image.open(latent_run / "samples" / "step-2.png") as image:
        width, height = image.size
        mode = image.mode
    # torchvision's make_grid: 10 rows (one per digit) and 1 column of 8x8 images, 2-pixel padding.
    assert (width, height) == (1 * (IMAGE_SIZE + 2) + 2, 10 * (IMAGE_SIZE + 2) + 2)
    assert mode == "RGB"


def test_hub_token_kept_out_of_training_args(latent_run):
    recorded = json.loads((latent_run / "training_args.json").read_text())
    assert "hub_token" not in recorded
    assert "not-a-real-token" not in json.dumps(recorded)


def test_cached_run_logs_cache(cached_run):
    assert "Cached the VAE posteriors of 1437 images" in cached_run.stderr


def test_gradient_checkpointing_bf16_run_trains(cached_run):
    # cached_run trains with --gradient_checkpointing and --mixed_precision bf16.
    losses = torch.tensor([record["loss"] for record in read_train_log(cached_run.output_dir)])
    assert losses.shape == (2,)
    assert torch.isfinite(losses).all()


# Model card


def test_model_card_written(latent_run):
    card = ModelCard.load(latent_run / "README.md")
    assert card.data.library_name == "diffusers"
    assert "mol-diffusion" in card.data.tags
    assert "latent-diffusion" in card.data.tags
    assert "builtin:digits" in card.text
    assert "samples/step-2.png" in card.text


def test_model_card_reports_log_and_newest_grid(tmp_path):
    with open(tmp_path / "train_log.jsonl", "w") as file:
        for step in range(1, 61):
            file.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
    (tmp_path / "samples").mkdir()
    for step in (5, 10):
        Image.new("L", (4, 4)).save(tmp_path / "samples" / f"step-{step}.png")
    args = parse_training_args(["--dataset_name", "builtin:digits", "--output_dir", str(tmp_path)])

    text = Path(write_model_card(str(tmp_path), args, make_transformer(), num_updates=60)).read_text()

    assert "35.5000 (mean of the last 50 updates up to step 60)" in text  # mean of 11..60
    assert "](samples/step-10.png)" in text
    assert '"num_pool_blocks": 2' in text
    assert "| optimizer updates | 60 |" in text


@pytest.mark.parametrize("eval_step, included", [(60, True), (50, False)])
def test_model_card_includes_current_eval(tmp_path, eval_step, included):
    (tmp_path / "eval.json").write_text(json.dumps({"global_step": eval_step, "frechet_distance": 12.5}))
    args = parse_training_args(["--dataset_name", "builtin:digits", "--output_dir", str(tmp_path)])

    text = Path(write_model_card(str(tmp_path), args, make_transformer(), num_updates=60)).read_text()

    assert ("| frechet_distance | 12.5000 |" in text) == included


# Hub flags (the hub itself is never contacted)


def test_hub_flags_parse():
    args = parse_training_args(
        ["--dataset_name", "builtin:digits", "--push_to_hub", "--hub_model_id", "user/mol-digits", "--hub_token", "t"]
    )
    assert args.push_to_hub is True
    assert args.hub_model_id == "user/mol-digits"
    assert args.hub_token == "t"


def test_hub_token_kept_out_of_tracker_config():
    args = parse_training_args(["--dataset_name", "builtin:digits", "--hub_token", "secret"])
    assert "hub_token" not in config_for_trackers(args)


def test_cache_latents_needs_vae():
    with pytest.raises(ConfigError, match="--cache_latents needs --vae"):
        parse_training_args(["--dataset_name", "builtin:digits", "--cache_latents"])


def test_hub_repo_named_after_output_dir(monkeypatch, tmp_path):
    calls = []

    def fake_create_repo(repo_id, exist_ok, token):
        calls.append((repo_id, exist_ok, token))
        return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

    monkeypatch.setattr(hub, "create_repo", fake_create_repo)

    repo_id = hub.create_hub_repo(str(tmp_path / "my-run"), token="t")

    assert repo_id == "user/my-run"
    assert calls == [("my-run", True, "t")]


def test_hub_upload_skips_checkpoints(monkeypatch, tmp_path):
    uploads = []
    monkeypatch.setattr(hub, "upload_folder", lambda **kwargs: uploads.append(kwargs))

    hub.upload_output_folder("user/run", str(tmp_path), token="t")

    files = [
        "model_index.json", "transformer/config.json", "README.md", "samples/step-2.png",
        "checkpoint-2/optimizer.bin", "checkpoint-2/transformer/config.json", ".pipeline-x.tmp/model_index.json",
        "logs/train_unet/events",
    ]
    kept = list(filter_repo_objects(files, ignore_patterns=uploads[0]["ignore_patterns"]))
    assert kept == ["model_index.json", "transformer/config.json", "README.md", "samples/step-2.png"]
    assert uploads[0]["folder_path"] == str(tmp_path)
    assert uploads[0]["repo_id"] == "user/run"


# torch.compile


def test_compiled_model_matches_eager():
    eager = make_transformer()
    compiled = compile_model(make_transformer())  # inductor, as --torch_compile uses
    x = torch.randn(4, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    timesteps = torch.tensor([1, 30, 60, 99])
    labels = torch.tensor([0, 1, 2, 1000])

    with torch.no_grad():
        expected = eager(x, timesteps, class_labels=labels).sample
        actual = compiled(x, timesteps, class_labels=labels).sample

    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_compiled_gradients_match_eager():
    # aot_eager traces forward and backward like inductor but skips code generation, which keeps
    # this test at seconds instead of minutes.
    eager = make_transformer().train()
    compiled = compile_model(make_transformer().train(), backend="aot_eager")
    x = torch.randn(4, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    timesteps = torch.tensor([1, 30, 60, 99])
    labels = torch.tensor([0, 1, 2, 0])

    for model in (eager, compiled):
        output = model(x, timesteps, class_labels=labels)
        (output.sample.square().mean() + output.aux_loss).backward()

    for (name, expected), actual in zip(eager.named_parameters(), compiled.parameters()):
        assert (expected.grad is None) == (actual.grad is None), name
        if expected.grad is not None:
            torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)


# EMA across a resume


def test_ema_weights_survive_resume(tiny_config, vae_dir, latent_run, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(latent_run, output_dir)
    shutil.rmtree(output_dir / "transformer")
    (output_dir / "model_index.json").unlink()

    # Resuming at the checkpoint's own step trains no further, so the saved pipeline contains the
    # EMA weights exactly as the checkpoint restored them.
    run_training_ok(
        tiny_config, output_dir, "--vae", str(vae_dir), "--use_ema", "--max_train_steps", "2",
        "--resume_from_checkpoint", "latest",
    )

    saved = load_file(output_dir / "transformer" / WEIGHTS_NAME)
    checkpoint_ema = load_file(output_dir / "checkpoint-2" / "transformer_ema" / WEIGHTS_NAME)
    checkpoint_model = load_file(output_dir / "checkpoint-2" / "transformer" / WEIGHTS_NAME)
    assert saved.keys() == checkpoint_ema.keys()
    for name in saved:
        torch.testing.assert_close(saved[name], checkpoint_ema[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(saved[name], checkpoint_model[name]) for name in saved)
