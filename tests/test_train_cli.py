"""train_unet.py end to end (run as a subprocess on builtin:digits) and its loss helpers."""

import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image
from torch import nn

import mol_diffusion
from mol_diffusion.training.checkpointing import list_checkpoints, resolve_resume_checkpoint
from mol_diffusion.training.losses import compute_training_loss, diffusion_target, learned_range_vlb, min_snr_weights

from helpers import read_train_log, run_training, tiny_train_config

TINY_CONFIG = tiny_train_config(use_ema=True, log_every_steps=2)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_config, tmp_path_factory):
    """Three updates with a checkpoint after each, of which the newest two are kept."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = run_training(
        tiny_config, output_dir, "--max_train_steps", "3", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2", "--sample_every_steps", "3", "--sample_inference_steps", "2",
        "--eval_batch_size", "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def resumed_run(tiny_config, trained_run, tmp_path_factory):
    """A copy of `trained_run` with an unfinished checkpoint-99.tmp, resumed up to step 5."""
    output_dir = tmp_path_factory.mktemp("resume") / "out"
    shutil.copytree(trained_run, output_dir)
    (output_dir / "checkpoint-99.tmp").mkdir()
    result = run_training(
        tiny_config, output_dir, "--max_train_steps", "5", "--checkpointing_steps", "10",
        "--resume_from_checkpoint", "latest",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(output_dir=output_dir, stderr=result.stderr)


def test_run_keeps_newest_checkpoints(trained_run):
    assert [step for step, _ in list_checkpoints(trained_run)] == [2, 3]


def test_run_writes_pipeline_folder(trained_run):
    assert (trained_run / "model_index.json").is_file()
    assert (trained_run / "transformer" / "config.json").is_file()
    assert (trained_run / "scheduler" / "scheduler_config.json").is_file()


def test_output_folder_loads_and_samples(trained_run):
    pipeline = DiffusionPipeline.from_pretrained(trained_run)
    assert isinstance(pipeline, mol_diffusion.MoLPipeline)
    images = pipeline(class_labels=[0, 9], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8)


def test_train_log_has_one_line_per_step(trained_run):
    records = read_train_log(trained_run)
    assert [record["step"] for record in records] == [1, 2, 3]
    for key in ("loss", "lr", "images_per_second", "elapsed_seconds"):
        assert key in records[0]


def test_route_counts_logged(trained_run):
    record = read_train_log(trained_run)[1]  # step 2, the end of the first window of log_every_steps=2
    counts = [record["route_count/block_0"], record["route_count/block_1"]]
    # 2 updates x 8 images x 2 routing steps
    assert sum(counts) == 2 * 8 * 2


def test_sample_grid_has_row_per_class(trained_run):
    with Image.open(trained_run / "samples" / "step-3.png") as image:
        width, height = image.size
    # torchvision's make_grid: 10 rows and 1 column of 8x8 images with 2-pixel padding.
    assert (width, height) == (1 * (8 + 2) + 2, 10 * (8 + 2) + 2)


def test_resume_continues_step_count(resumed_run):
    steps = [record["step"] for record in read_train_log(resumed_run.output_dir)]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_ignores_tmp_checkpoint(resumed_run):
    assert f"Resuming from {resumed_run.output_dir / 'checkpoint-3'}" in resumed_run.stderr
    assert "Ignoring unfinished checkpoint folders" in resumed_run.stderr


def test_resume_restores_optimizer_state(resumed_run):
    # A fresh Adam state would count only the 2 updates after resuming.
    state = torch.load(resumed_run.output_dir / "checkpoint-5" / "optimizer.bin", weights_only=True)
    steps = {float(parameter_state["step"]) for parameter_state in state["state"].values()}
    assert steps == {5.0}


def test_resume_restores_ema_state(resumed_run):
    config = json.loads((resumed_run.output_dir / "checkpoint-5" / "transformer_ema" / "config.json").read_text())
    assert config["optimization_step"] == 5


def test_resume_restores_lr_scheduler(resumed_run):
    state = torch.load(resumed_run.output_dir / "checkpoint-5" / "scheduler.bin", weights_only=True)
    assert state["last_epoch"] == 5


def test_same_seed_same_first_losses(tiny_config, trained_run, tmp_path):
    result = run_training(tiny_config, tmp_path / "out", "--max_train_steps", "2", "--checkpointing_steps", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    first_run = [record["loss"] for record in read_train_log(trained_run)[:2]]
    second_run = [record["loss"] for record in read_train_log(tmp_path / "out")]
    assert second_run == first_run


def test_nonfinite_loss_stops_with_checkpoint(tiny_config, tmp_path):
    # With a huge learning rate the first update makes the next losses overflow.
    result = run_training(
        tiny_config, tmp_path / "out", "--learning_rate", "1e30", "--max_nonfinite_steps", "2",
        "--max_train_steps", "20", "--checkpointing_steps", "100",
    )
    assert result.returncode == 3
    assert "NaN or infinite for 2 updates" in result.stderr.strip().splitlines()[-1]
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [1]


def test_unknown_key_exits_with_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "num_epoch": 3}))
    result = run_training(config, tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"train_unet.py: error: {config}: unknown key 'num_epoch'; did you mean 'num_epochs'?"
    ]


def test_bad_model_value_exits_with_one_line(tiny_config, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "model": {**TINY_CONFIG["model"], "patch_size": 3}}))
    result = run_training(config, tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "patch_size" in lines[-1]
    # sample_size is set by --resolution, so the message names the option the user can change.
    assert f"--resolution {TINY_CONFIG['resolution']}" in lines[-1]
    assert "Traceback" not in result.stderr


def test_latest_skips_tmp_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-30.tmp", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-10")


def test_latest_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_resume_checkpoint(str(tmp_path), "latest") is None


# Loss helpers: expected values come from the DDPM formulas and torch.distributions.


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", variance_type="learned_range")


def test_v_target_formula(scheduler):
    scheduler.register_to_config(prediction_type="v_prediction")
    clean, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    timesteps = torch.tensor([3, 70])
    alpha_prod = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_prod.sqrt() * noise - (1 - alpha_prod).sqrt() * clean
    torch.testing.assert_close(diffusion_target(scheduler, clean, noise, timesteps), expected)


def test_min_snr_epsilon_weights(scheduler):
    timesteps = torch.tensor([0, 10, 99])
    alpha_prod = scheduler.alphas_cumprod[timesteps]
    snr = alpha_prod / (1 - alpha_prod)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0), expected)


def test_vlb_zero_for_true_posterior(scheduler):
    clean = torch.rand(3, 1, 4, 4) * 2 - 1
    timesteps = torch.tensor([1, 40, 99])
    noisy = scheduler.add_noise(clean, torch.randn_like(clean), timesteps)
    # variance output -1 selects the true posterior variance beta_tilde_t.
    vlb = learned_range_vlb(scheduler, clean, noisy, timesteps, clean, -torch.ones_like(clean))
    torch.testing.assert_close(vlb, torch.zeros(3), atol=1e-5, rtol=0)


def test_vlb_matches_gaussian_kl(scheduler):
    clean, predicted = torch.rand(1, 1, 2, 2) * 2 - 1, torch.rand(1, 1, 2, 2) * 2 - 1
    t = 30
    timesteps = torch.tensor([t])
    noisy = scheduler.add_noise(clean, torch.randn_like(clean), timesteps)
    variance_output = torch.full_like(clean, 0.5)

    alphas_cumprod = scheduler.alphas_cumprod.double()
    alpha_prod, alpha_prod_prev = alphas_cumprod[t], alphas_cumprod[t - 1]
    beta = scheduler.betas.double()[t]
    beta_tilde = beta * (1 - alpha_prod_prev) / (1 - alpha_prod)

    def posterior_mean(x0):
        # Mean of q(x_{t-1} | x_t, x_0), formula (7) of https://huggingface.co/papers/2006.11239.
        clean_part = alpha_prod_prev.sqrt() * beta * x0.double()
        noisy_part = (1 - beta).sqrt() * (1 - alpha_prod_prev) * noisy.double()
        return (clean_part + noisy_part) / (1 - alpha_prod)

    model_variance = torch.exp(0.75 * torch.log(beta) + 0.25 * torch.log(beta_tilde))
    true = torch.distributions.Normal(posterior_mean(clean), beta_tilde.sqrt())
    model = torch.distributions.Normal(posterior_mean(predicted), model_variance.sqrt())
    expected = torch.distributions.kl_divergence(true, model).mean() / math.log(2)

    vlb = learned_range_vlb(scheduler, clean, noisy, timesteps, predicted, variance_output)
    torch.testing.assert_close(vlb.double(), expected.reshape(1), rtol=1e-4, atol=1e-6)


def test_vlb_decoder_term_at_step_zero(scheduler):
    clean = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3)
    timesteps = torch.tensor([0])
    noisy = scheduler.add_noise(clean, torch.randn_like(clean), timesteps)
    variance_output = torch.zeros_like(clean)
    vlb = learned_range_vlb(scheduler, clean, noisy, timesteps, clean, variance_output)

    # At t = 0 the posterior mean is x_0 itself, and the log variance is clipped to that of t = 1.
    alphas_cumprod = scheduler.alphas_cumprod.double()
    beta0 = 1 - alphas_cumprod[0]
    beta_tilde1 = (1 - alphas_cumprod[1] / alphas_cumprod[0]) * (1 - alphas_cumprod[0]) / (1 - alphas_cumprod[1])
    std = torch.exp(0.25 * (torch.log(beta0) + torch.log(beta_tilde1)))
    mean = clean.double()
    normal = torch.distributions.Normal(mean, std)
    x = clean.double()
    probabilities = torch.where(
        x < -0.999, normal.cdf(x + 1 / 255),
        torch.where(x > 0.999, 1 - normal.cdf(x - 1 / 255), normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)),
    )
    expected = -torch.log(probabilities).mean() / math.log(2)
    torch.testing.assert_close(vlb.double(), expected.reshape(1), rtol=1e-4, atol=1e-6)


class FixedOutput(nn.Module):
    """Returns a learnable output tensor and records the labels it was called with."""

    def __init__(self, channels):
        super().__init__()
        self.output = nn.Parameter(torch.randn(4, channels, 4, 4) * 0.1)
        self.labels = None

    def forward(self, sample, timestep, class_labels=None):
        self.labels = class_labels
        return SimpleNamespace(sample=self.output)


def test_vlb_trains_variance_channels_only(scheduler):
    model = FixedOutput(channels=2)
    batch = {"pixel_values": torch.rand(4, 1, 4, 4) * 2 - 1}
    losses = compute_training_loss(model, batch, scheduler)
    losses.vlb_loss.backward()
    assert torch.all(model.output.grad[:, :1] == 0)
    assert torch.any(model.output.grad[:, 1:] != 0)


def test_class_dropout_uses_null_label(scheduler):
    model = FixedOutput(channels=1)
    batch = {"pixel_values": torch.zeros(4, 1, 4, 4), "class_labels": torch.tensor([0, 1, 2, 3])}
    compute_training_loss(model, batch, scheduler, class_dropout_prob=1.0, null_class_label=10)
    assert model.labels.tolist() == [10, 10, 10, 10]


def test_unconditional_model_gets_no_labels(scheduler):
    model = FixedOutput(channels=1)
    batch = {"pixel_values": torch.zeros(4, 1, 4, 4), "class_labels": torch.tensor([0, 1, 2, 3])}
    compute_training_loss(model, batch, scheduler, use_class_labels=False)
    assert model.labels is None


def test_final_save_leaves_no_staging_folder(trained_run):
    assert not [name for name in os.listdir(trained_run) if name.startswith(".pipeline-")]
