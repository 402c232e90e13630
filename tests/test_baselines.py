"""Dense baselines (diffusers DiT and UNet2DModel) through train_unet.py and MoLPipeline, and --eval_at_end."""

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
import yaml
import diffusers
from diffusers import DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from PIL import Image

import mol_diffusion
from mol_diffusion import MoLPipeline
from mol_diffusion.evaluation import get_digit_classifier
from mol_diffusion.pipelines.pipeline_mol import denoiser_null_class_label, denoiser_num_classes
from mol_diffusion.training import ConfigError, build_model, parse_training_args

from helpers import TINY_TRAIN_MODEL, read_train_log, run_training, tiny_train_config

NUM_CLASSES = 10  # builtin:digits

BASE_CONFIG = {key: value for key, value in tiny_train_config(use_ema=True).items() if key != "model"}
# Tiny models for 8x8 images; the UNet halves 8 -> 4 once and uses 8 groups in its GroupNorms.
MODEL_CONFIGS = {
    "dit": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2},
    "unet": {"block_out_channels": [16, 16], "norm_num_groups": 8},
    "mol": TINY_TRAIN_MODEL,
}
EVAL_KEYS = (
    "frechet_distance", "real_floor", "class_accuracy", "classifier_test_accuracy", "num_samples",
    "guidance_scale", "num_inference_steps", "scheduler", "global_step",
)


def write_config(folder, model):
    path = folder / f"{model}.yaml"
    path.write_text(yaml.safe_dump({**BASE_CONFIG, "model": MODEL_CONFIGS[model]}))
    return path


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """Digit classifier for builtin:digits, trained once per test session into a shared cache folder."""
    cache_dir = tmp_path_factory.getbasetemp() / "digits_classifier_cache"
    get_digit_classifier(cache_dir=cache_dir, dataset_name="builtin:digits")
    return cache_dir


@pytest.fixture(scope="module", params=["dit", "unet"])
def baseline_run(request, tmp_path_factory, classifier_cache):
    """Two updates of a baseline with a sample grid, a route plot request and --eval_at_end on 10 images."""
    folder = tmp_path_factory.mktemp(request.param)
    env = {**os.environ, "MOL_DIFFUSION_CACHE": str(classifier_cache)}
    result = run_training(
        write_config(folder, request.param), folder / "out", "--model", request.param, "--max_train_steps", "2",
        "--sample_every_steps", "2", "--sample_inference_steps", "2", "--eval_batch_size", "1",
        "--route_plot_every_steps", "1", "--eval_at_end", "--eval_num_samples", "10", "--eval_inference_steps", "2", "--eval_guidance_scale", "2",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(model=request.param, output_dir=folder / "out", stderr=result.stderr)


def perturbed(model, seed=0):
    """Open zero-initialised gates and output layers, so that class labels change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_model(model, num_classes=NUM_CLASSES):
    args = SimpleNamespace(
        model=model, model_config=dict(MODEL_CONFIGS[model]), resolution=8,
        router_balance_loss_weight=None, router_z_loss_weight=None,
    )
    torch.manual_seed(0)
    return build_model(args, num_classes=num_classes, num_channels=1)


# Saved folders of the baselines.


def test_baseline_folder_loads_as_mol_pipeline(baseline_run):
    pipeline = DiffusionPipeline.from_pretrained(baseline_run.output_dir)
    expected_class = {"dit": DiTTransformer2DModel, "unet": UNet2DModel}[baseline_run.model]
    assert isinstance(pipeline, MoLPipeline)
    assert isinstance(pipeline.transformer, expected_class)


def test_baseline_folder_samples_with_guidance(baseline_run):
    pipeline = DiffusionPipeline.from_pretrained(baseline_run.output_dir)
    images = pipeline(class_labels=[0, 9], guidance_scale=2.0, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8)
    assert torch.isfinite(images).all()


def test_baseline_folder_keeps_classes(baseline_run):
    pipeline = DiffusionPipeline.from_pretrained(baseline_run.output_dir)
    assert denoiser_num_classes(pipeline.transformer) == NUM_CLASSES


def test_baseline_loads_without_type_warning(baseline_run, caplog):
    # diffusers warns "Expected types for transformer" when a component does not match the annotation.
    diffusers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            DiffusionPipeline.from_pretrained(baseline_run.output_dir)
    finally:
        diffusers.utils.logging.disable_propagation()
    assert "Expected types" not in caplog.text


def test_baseline_sample_grid_has_row_per_class(baseline_run):
    with Image.open(baseline_run.output_dir / "samples" / "step-2.png") as image:
        assert image.size == (1 * (8 + 2) + 2, NUM_CLASSES * (8 + 2) + 2)  # make_grid, 2-pixel padding


def test_baseline_warns_route_plots_skipped(baseline_run):
    assert "--route_plot_every_steps needs a MoL model" in baseline_run.stderr
    assert not (baseline_run.output_dir / "routes").exists()


def test_baseline_logs_no_route_counts(baseline_run):
    records = read_train_log(baseline_run.output_dir)
    assert [record["step"] for record in records] == [1, 2]
    assert not any(key.startswith("route_count/") for key in records[-1])
    assert records[-1]["aux_loss"] == 0.0


def test_eval_at_end_writes_json(baseline_run):
    results = json.loads((baseline_run.output_dir / "eval.json").read_text())
    for key in EVAL_KEYS:
        assert key in results, key
    assert results["num_samples"] == 10
    assert results["global_step"] == 2
    assert results["guidance_scale"] == 2.0
    assert results["scheduler"] == "DDIMScheduler"
    assert results["dataset_name"] == "builtin:digits"
    assert 0.0 <= results["class_accuracy"] <= 1.0


def test_eval_at_end_logs_numbers(baseline_run):
    assert "Frechet distance" in baseline_run.stderr


# Class count, null label and guidance of the baselines inside MoLPipeline.


def test_num_classes_of_each_denoiser():
    assert denoiser_num_classes(tiny_model("mol")) == NUM_CLASSES
    assert denoiser_num_classes(tiny_model("dit")) == NUM_CLASSES
    assert denoiser_num_classes(tiny_model("unet")) == NUM_CLASSES
    assert denoiser_num_classes(tiny_model("unet", num_classes=None)) is None


def test_null_label_follows_real_classes():
    for model in ("mol", "dit", "unet"):
        assert denoiser_null_class_label(tiny_model(model)) == NUM_CLASSES, model


def test_dit_label_table_has_null_row():
    tables = [module.embedding_table for module in tiny_model("dit").modules() if isinstance(module, LabelEmbedding)]
    assert tables
    assert all(table.num_embeddings == NUM_CLASSES + 1 for table in tables)


def test_unet_label_table_has_null_row():
    assert tiny_model("unet").class_embedding.num_embeddings == NUM_CLASSES + 1


def test_dit_training_mode_keeps_labels():
    # With diffusers' in-model label dropout (0.1 per block), two training-mode passes over 64
    # samples would almost surely drop different labels and differ.
    model = perturbed(tiny_model("dit")).train()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.full((64,), 50)
    labels = torch.arange(64) % NUM_CLASSES
    with torch.no_grad():
        first = model(x, timesteps, class_labels=labels).sample
        second = model(x, timesteps, class_labels=labels).sample
    torch.testing.assert_close(first, second)


def test_dit_needs_labelled_dataset():
    with pytest.raises(ConfigError, match="needs class labels"):
        tiny_model("dit", num_classes=None)


def test_unet_without_labels_is_unconditional():
    model = tiny_model("unet", num_classes=None)
    assert model.config.num_class_embeds is None
    assert model.config.out_channels == 1


@pytest.mark.parametrize("model_name", ["dit", "unet"])
def test_guidance_matches_manual_combination(model_name):
    model = perturbed(tiny_model(model_name))
    scheduler = DDIMScheduler(num_train_timesteps=100)
    pipeline = MoLPipeline(transformer=model, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    latents = pipeline(
        class_labels=[1, 2], guidance_scale=3.0, num_inference_steps=1, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images

    # The same step by hand: separate conditional and null-class passes, combined with the CFG formula.
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = DDIMScheduler(num_train_timesteps=100)
    reference.set_timesteps(1)
    t = reference.timesteps[0]
    timesteps = t.expand(2)
    with torch.no_grad():
        cond = model(noise, timesteps, class_labels=torch.tensor([1, 2])).sample
        uncond = model(noise, timesteps, class_labels=torch.tensor([NUM_CLASSES, NUM_CLASSES])).sample
    assert not torch.allclose(cond, uncond)
    expected = reference.step(uncond + 3.0 * (cond - uncond), t, noise).prev_sample
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)


def test_routes_rejected_for_baseline():
    pipeline = MoLPipeline(transformer=tiny_model("unet").eval(), scheduler=DDIMScheduler(num_train_timesteps=100))
    with pytest.raises(ValueError, match="return_routes=True needs a MoLTransformer2DModel"):
        pipeline(class_labels=[0], num_inference_steps=1, return_routes=True)


# Flags.


def test_model_keys_checked_against_baseline_class(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**BASE_CONFIG, "model": {"num_pool_blocks": 4}}))
    with pytest.raises(ConfigError, match="unknown model key for --model dit 'num_pool_blocks'"):
        parse_training_args(["--config", str(config), "--model", "dit"])


def test_eval_num_samples_below_two_rejected():
    with pytest.raises(ConfigError, match="eval_num_samples=1"):
        parse_training_args(["--dataset_name", "builtin:digits", "--eval_num_samples", "1"])


def test_eval_at_end_on_folder_needs_eval_dataset(tmp_path):
    with pytest.raises(ConfigError, match="--eval_dataset_name"):
        parse_training_args(["--train_data_dir", str(tmp_path), "--eval_at_end"])


def test_model_choices_include_baselines():
    assert mol_diffusion.training.MODEL_CHOICES == ("mol", "dit", "unet")
