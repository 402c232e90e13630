"""Frechet distance, digit classifier, Inception features, evaluators and the evaluation CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.torch import save_file
from torchvision.models import inception_v3

from mol_diffusion import MoLPipeline, MoLTransformer2DModel
from mol_diffusion.evaluation import (
    InceptionWeightsNotFoundError,
    compute_feature_statistics,
    evaluate_images,
    evaluate_pipeline,
    frechet_distance,
    get_digit_classifier,
    load_inception_feature_extractor,
)
from mol_diffusion.evaluation import classifier as classifier_module
from mol_diffusion.evaluation.__main__ import main
from mol_diffusion.evaluation.images import load_split_images

DATASET = "builtin:mnist5k"


def random_covariance(rng, dim):
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def make_pipeline(num_classes=10, seed=0):
    """Tiny MoL pipeline with perturbed weights, so the zero-initialised gates do not hide the input."""
    torch.manual_seed(seed)
    model = MoLTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        num_attention_heads=2,
        attention_head_dim=16,
        num_pool_blocks=2,
        num_routing_steps=3,
        num_classes=num_classes,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return MoLPipeline(transformer=model.eval(), scheduler=DDPMScheduler(num_train_timesteps=100))


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """Cache folder holding a digit classifier trained once per test session."""
    cache_dir = tmp_path_factory.mktemp("classifier_cache")
    get_digit_classifier(cache_dir=cache_dir)
    return cache_dir


@pytest.fixture()
def classifier(classifier_cache):
    return get_digit_classifier(cache_dir=classifier_cache)


@pytest.fixture(scope="module")
def held_out():
    return load_split_images(DATASET, "test")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    make_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inception_state_dict():
    # Default initialisation is fast, and the tests only need the right architecture.
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    return {key: value.contiguous() for key, value in model.state_dict().items()}


# Frechet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mean_a, mean_b = rng.normal(size=16), rng.normal(size=16)
    variance_a, variance_b = rng.uniform(0.1, 2.0, size=16), rng.uniform(0.1, 2.0, size=16)

    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(variance_a) - np.sqrt(variance_b)) ** 2)
    distance = frechet_distance(mean_a, np.diag(variance_a), mean_b, np.diag(variance_b))

    assert distance == pytest.approx(expected, rel=1e-9)


def test_frechet_full_covariance_matches_sqrtm():
    rng = np.random.default_rng(1)
    mean_a, mean_b = rng.normal(size=12), rng.normal(size=12)
    covariance_a, covariance_b = random_covariance(rng, 12), random_covariance(rng, 12)

    trace_sqrt = np.trace(scipy.linalg.sqrtm(covariance_a @ covariance_b)).real
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(covariance_a) + np.trace(covariance_b) - 2 * trace_sqrt
    distance = frechet_distance(mean_a, covariance_a, mean_b, covariance_b)

    assert distance == pytest.approx(expected, rel=1e-8)


def test_frechet_identical_sets_is_zero():
    features = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    statistics = compute_feature_statistics(features)

    distance = frechet_distance(statistics.mean, statistics.covariance, statistics.mean, statistics.covariance)

    assert distance == pytest.approx(0.0, abs=1e-6)


def test_frechet_singular_covariance_is_finite():
    features = np.random.default_rng(2).normal(size=(10, 32))  # 10 samples, rank-9 covariance
    statistics = compute_feature_statistics(features)

    distance = frechet_distance(statistics.mean, statistics.covariance, np.zeros(32), np.eye(32))

    assert np.isfinite(distance)
    assert distance > 0


def test_frechet_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="covariance_b must have shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_statistics_match_numpy():
    features = np.random.default_rng(3).normal(size=(50, 5)).astype(np.float32)

    statistics = compute_feature_statistics(torch.from_numpy(features))

    assert statistics.num_samples == 50
    assert statistics.mean.dtype == np.float64
    np.testing.assert_allclose(statistics.mean, features.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(statistics.covariance, np.cov(features.astype(np.float64).T), rtol=1e-12)


def test_statistics_reject_single_sample():
    with pytest.raises(ValueError, match="N >= 2"):
        compute_feature_statistics(np.zeros((1, 4)))


# Digit classifier


def test_classifier_held_out_accuracy(classifier, held_out):
    images, labels = held_out

    accuracy = (classifier.predict(images) == labels).double().mean().item()

    assert accuracy >= 0.95
    assert classifier.test_accuracy == pytest.approx(accuracy)


def test_classifier_loads_from_cache(classifier_cache, classifier, monkeypatch):
    def fail_training(**kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(classifier_module, "train_digit_classifier", fail_training)
    loaded = get_digit_classifier(cache_dir=classifier_cache)
    metadata_files = list((classifier_cache / "digit_classifier").glob("*.json"))

    assert len(metadata_files) == 1
    assert json.loads(metadata_files[0].read_text())["test_accuracy"] == loaded.test_accuracy
    for key, value in classifier.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_classifier_accepts_other_sizes_and_rgb(classifier, held_out):
    images = held_out[0][:8]
    large = torch.nn.functional.interpolate(images, size=56, mode="bilinear")

    features = classifier.features(large)
    rgb_features = classifier.features(images.expand(-1, 3, -1, -1))

    assert features.shape == (8, 128)
    # rgb_to_grayscale weights sum to 0.9999, so grey values shift by up to 1e-4.
    torch.testing.assert_close(rgb_features, classifier.features(images), atol=1e-2, rtol=1e-2)


def test_classifier_features_need_eval_mode(classifier, held_out):
    classifier.train()
    with pytest.raises(RuntimeError, match="eval"):
        classifier.features(held_out[0][:2])


# evaluate_images


def test_real_images_class_accuracy_high(classifier, held_out):
    images, labels = held_out

    results = evaluate_images(images, labels, classifier=classifier)

    assert results["class_accuracy"] >= 0.95
    assert results["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself
    assert results["num_reference_images"] == 1000
    assert results["real_floor"] > 0


def test_reference_resized_to_sample_resolution(classifier, held_out):
    images, labels = held_out
    # The held-out split as a 16x16 model would see it, resized independently of the evaluator.
    small = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    small = torch.round(small * 255).clamp(0, 255) / 255

    matched = evaluate_images(small, labels, classifier=classifier)
    native = evaluate_images(small, labels, classifier=classifier, match_resolution=False)

    assert matched["reference_resolution"] == [16, 16]
    assert native["reference_resolution"] == [28, 28]
    assert matched["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # the resized reference set itself
    assert native["frechet_distance"] > matched["real_floor"]  # lost detail counts against native-size samples
    assert native["real_floor"] == pytest.approx(
        evaluate_images(images, labels, classifier=classifier)["real_floor"]
    )
    assert matched["real_class_accuracy"] >= 0.9


def test_shuffled_labels_class_accuracy_low(classifier, held_out):
    images, labels = held_out
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]

    results = evaluate_images(images, shuffled, classifier=classifier, compute_floor=False)

    assert results["class_accuracy"] < 0.3
    assert results["real_floor"] is None


def test_noise_distance_far_above_floor(classifier):
    noise = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    results = evaluate_images(noise, classifier=classifier)

    assert results["class_accuracy"] is None
    assert sum(results["predicted_class_counts"]) == 200
    assert results["frechet_distance"] > 10 * results["real_floor"]


def test_floor_rejects_more_samples_than_split(classifier):
    images = torch.zeros(401, 1, 28, 28)
    labels = torch.zeros(401, dtype=torch.long)  # the train split has 400 images of each class

    with pytest.raises(ValueError, match="num_samples=401"):
        evaluate_images(images, labels, classifier=classifier)


def test_evaluate_images_rejects_unknown_labels(classifier):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        evaluate_images(torch.zeros(4, 1, 28, 28), [0, 1, 2, 10], classifier=classifier)


# evaluate_pipeline


def test_evaluate_pipeline_repeats_with_seed(classifier):
    pipeline = make_pipeline()
    kwargs = dict(num_samples=20, num_inference_steps=2, scheduler="ddim", batch_size=10, classifier=classifier)

    first = evaluate_pipeline(pipeline, guidance_scale=2.0, **kwargs)
    second = evaluate_pipeline(pipeline, guidance_scale=2.0, **kwargs)

    assert first["frechet_distance"] == second["frechet_distance"]
    assert first["class_accuracy"] == second["class_accuracy"]
    assert first["scheduler"] == "DDIMScheduler"
    assert isinstance(pipeline.scheduler, DDPMScheduler)  # the caller's pipeline is unchanged
    assert sorted(first["per_class_accuracy"]) == list(range(10))


def test_evaluate_pipeline_unconditional(classifier):
    results = evaluate_pipeline(
        make_pipeline(), num_samples=10, class_conditional=False, num_inference_steps=2, classifier=classifier
    )

    assert results["class_accuracy"] is None
    assert sum(results["predicted_class_counts"]) == 10


def test_evaluate_pipeline_accepts_ddpm_pipeline(classifier):
    mol_pipeline = make_pipeline(num_classes=None)
    pipeline = DDPMPipeline(unet=mol_pipeline.transformer, scheduler=mol_pipeline.scheduler)

    results = evaluate_pipeline(
        pipeline, num_samples=6, class_conditional=False, num_inference_steps=2, classifier=classifier
    )

    assert results["num_samples"] == 6
    assert results["scheduler"] == "DDPMScheduler"


def test_evaluate_pipeline_rejects_unconditional_model(classifier):
    with pytest.raises(ValueError, match="class_conditional=False"):
        evaluate_pipeline(make_pipeline(num_classes=None), num_samples=10, classifier=classifier)


def test_evaluate_pipeline_rejects_unknown_scheduler(classifier):
    with pytest.raises(ValueError, match="scheduler must be"):
        evaluate_pipeline(make_pipeline(), num_samples=10, scheduler="heun", classifier=classifier)


# Inception v3


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_inception_features_from_local_weights(inception_state_dict, tmp_path, suffix):
    path = tmp_path / f"inception{suffix}"
    if suffix == ".safetensors":
        save_file(inception_state_dict, str(path))
    else:
        torch.save(inception_state_dict, path)

    extractor = load_inception_feature_extractor(path)
    features = extractor.features(torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)))

    assert features.shape == (2, 2048)
    assert torch.isfinite(features).all()


def test_inception_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached torchvision weights there

    with pytest.raises(InceptionWeightsNotFoundError, match="FID needs Inception v3 weights") as error:
        load_inception_feature_extractor()

    assert "--inception_weights" in str(error.value)
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in str(error.value)


def test_inception_rejects_other_state_dict(tmp_path, classifier):
    path = tmp_path / "classifier.safetensors"
    save_file(classifier.state_dict(), str(path))

    with pytest.raises(ValueError, match="not an Inception v3 state dict"):
        load_inception_feature_extractor(path)


# Command line


def test_cli_writes_results(pipeline_dir, classifier_cache, tmp_path, capsys):
    output = tmp_path / "results" / "eval.json"
    argv = [
        "--model_dir", str(pipeline_dir),
        "--num_samples", "20",
        "--num_inference_steps", "2",
        "--scheduler", "ddim",
        "--guidance_scale", "2.0",
        "--batch_size", "10",
        "--cache_dir", str(classifier_cache),
        "--output", str(output),
    ]  # fmt: skip

    exit_code = main(argv)
    results = json.loads(output.read_text())

    assert exit_code == 0
    assert results["num_samples"] == 20
    assert results["guidance_scale"] == 2.0
    assert results["scheduler"] == "DDIMScheduler"
    assert 0.0 <= results["class_accuracy"] <= 1.0
    assert results["frechet_distance"] > 0
    assert "frechet_distance" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda tmp, model: ["--model_dir", str(tmp / "missing")], "does not exist"),
        (lambda tmp, model: ["--model_dir", str(tmp)], "has no model_index.json"),
        (lambda tmp, model: ["--model_dir", str(model), "--metric", "inception"], "FID needs Inception v3"),
        (lambda tmp, model: ["--model_dir", str(model), "--inception_weights", "x.pth"], "--metric inception"),
    ],
    ids=["missing_dir", "no_model_index", "no_inception_weights", "weights_without_metric"],
)
def test_cli_errors(make_argv, message, pipeline_dir, classifier_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    exit_code = main(make_argv(tmp_path, pipeline_dir) + ["--cache_dir", str(classifier_cache)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]

    assert exit_code == 1
    assert len(errors) == 1
    assert message in errors[0]


def test_cli_rejects_too_few_samples(pipeline_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_dir", str(pipeline_dir), "--num_samples", "1"])

    assert exit_info.value.code == 2
    assert "--num_samples: must be an integer >= 2" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "mol_diffusion.evaluation", "--model_dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: --model_dir {tmp_path / 'missing'} does not exist. Pass the --output_dir of train_unet.py."
    )
