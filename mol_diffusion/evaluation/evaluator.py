"""Sample quality of a pipeline: Frechet distance to a held-out split, its real-data floor, class accuracy.

Sizes compared (all from one dataset, `builtin:mnist5k` by default):

- `frechet_distance`: the `num_samples` evaluated images against the whole held-out "test" split
  (1000 images for `builtin:mnist5k`).
- `real_floor`: `num_samples` real images drawn from the "train" split, with the same labels as the
  evaluated images when labels are given, against the same held-out reference. It is the distance of
  a perfect generator at this sample size, because the distance is biased upwards at small sizes.

When the evaluated images are smaller or larger than the dataset's images (a model trained on MNIST
resized to 16x16, say), the reference and floor images are first resized to the evaluated size, the
way the training data was resized. Otherwise the distance would mostly measure the detail lost to the
lower resolution, which no generator at that resolution can recover.
"""

import logging
import time
from typing import Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from .classifier import DEFAULT_DATASET, DigitClassifier, get_digit_classifier
from ..pipelines.pipeline_mol import denoiser_num_classes
from ..pipelines.schedulers import SCHEDULERS, scheduler_from_name
from .frechet import compute_feature_statistics, frechet_distance_from_statistics
from .images import ImageBatch, load_split_images, to_image_tensor

logger = logging.getLogger(__name__)

REFERENCE_SPLIT = "test"
FLOOR_SPLIT = "train"


class FeatureExtractor(Protocol):
    """Model that maps `(B, C, H, W)` images in [0, 1] to `(B, F)` features. Its `name` labels the results."""

    name: str
    feature_dim: int

    def features(self, images: ImageBatch) -> torch.Tensor: ...


def evaluate_images(
    images: ImageBatch,
    labels: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    feature_extractor: Optional[FeatureExtractor] = None,
    classifier: Optional[DigitClassifier] = None,
    dataset_name: str = DEFAULT_DATASET,
    seed: int = 0,
    compute_floor: bool = True,
    cache_dir: Optional[str] = None,
    match_resolution: bool = True,
) -> dict:
    r"""
    Score a batch of images against the held-out split of a labelled dataset.

    Args:
        images (`torch.Tensor`, `np.ndarray` or list of `PIL.Image.Image`):
            `(N, C, H, W)` images in [0, 1], N >= 2, of any size (the feature extractor resizes them).
        labels (`torch.Tensor` or list of `int`, *optional*):
            `(N,)` class each image should show. Enables `class_accuracy` and a real floor sample
            with the same labels.
        feature_extractor (*optional*): Object with `features(images) -> (N, F)` and `name`, such as
            [`InceptionFeatureExtractor`]. Defaults to the digit classifier's 128-d features.
        classifier ([`DigitClassifier`], *optional*): Classifier for `class_accuracy`, by default
            [`get_digit_classifier`] for `dataset_name`.
        dataset_name (`str`, defaults to `"builtin:mnist5k"`): Dataset of the reference ("test") and
            floor ("train") images.
        seed (`int`, defaults to 0): Seed of the real floor sample.
        compute_floor (`bool`, defaults to `True`): Whether to compute `real_floor`.
        cache_dir (`str`, *optional*): Cache folder of the classifier weights.
        match_resolution (`bool`, defaults to `True`): Resize the reference and floor images to the
            height and width of `images` (bilinear, antialiased, rounded to 8 bits like the training
            data) before extracting features. `False` compares against the dataset's own resolution.

    Returns:
        `dict`: `frechet_distance`, `real_floor` (or `None`), `real_class_accuracy` (the class accuracy
        of the floor images, or `None` without labels or floor), `class_accuracy` and
        `per_class_accuracy` (or `None` without labels), `predicted_class_counts`,
        `classifier_test_accuracy`, `metric`, `feature_dim`, `dataset_name`, `reference_split`,
        `reference_resolution` (`[H, W]` after matching), `num_reference_images`, `floor_split`,
        `num_samples`, `seed` and `evaluation_seconds`.
    """
    start_time = time.perf_counter()
    images = to_image_tensor(images)
    num_samples = images.shape[0]
    if num_samples < 2:
        raise ValueError(f"images must contain at least 2 images to fit a covariance, got {num_samples}.")
    if classifier is None:
        classifier = get_digit_classifier(cache_dir=cache_dir, dataset_name=dataset_name)
    if feature_extractor is None:
        feature_extractor = classifier
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        _check_labels(labels, num_samples, classifier.num_classes)
    if compute_floor:
        _check_floor_size(dataset_name, num_samples, labels)

    resolution = tuple(images.shape[-2:]) if match_resolution else None

    # 1. Distance of the images to the held-out reference.
    # NOTE: the reference statistics are recomputed on every call. That is cheap for the digit
    # classifier, but Inception features of the 1000 reference images took about 7 minutes on 2 CPU cores.
    reference_images, _ = load_split_images(dataset_name, REFERENCE_SPLIT)
    reference_images = _resize_like_training_data(reference_images, resolution)
    reference = compute_feature_statistics(feature_extractor.features(reference_images))
    statistics = compute_feature_statistics(feature_extractor.features(images))
    distance = frechet_distance_from_statistics(statistics, reference)

    # 2. The same distance for real images at the same size and resolution.
    real_floor, real_class_accuracy = None, None
    if compute_floor:
        real_images = _resize_like_training_data(_real_sample(dataset_name, num_samples, labels, seed), resolution)
        real_statistics = compute_feature_statistics(feature_extractor.features(real_images))
        real_floor = frechet_distance_from_statistics(real_statistics, reference)
        if labels is not None:
            real_class_accuracy = (classifier.predict(real_images) == labels).float().mean().item()

    # 3. Class predictions of the digit classifier.
    predictions = classifier.predict(images)
    class_accuracy, per_class_accuracy = None, None
    if labels is not None:
        correct = (predictions == labels).float()
        class_accuracy = correct.mean().item()
        per_class_accuracy = {
            int(label): correct[labels == label].mean().item() for label in torch.unique(labels).tolist()
        }

    return {
        "frechet_distance": distance,
        "real_floor": real_floor,
        "real_class_accuracy": real_class_accuracy,
        "class_accuracy": class_accuracy,
        "per_class_accuracy": per_class_accuracy,
        "predicted_class_counts": torch.bincount(predictions, minlength=classifier.num_classes).tolist(),
        "classifier_test_accuracy": classifier.test_accuracy,
        "metric": feature_extractor.name,
        "feature_dim": int(statistics.mean.shape[0]),
        "dataset_name": dataset_name,
        "reference_split": REFERENCE_SPLIT,
        "reference_resolution": list(reference_images.shape[-2:]),
        "num_reference_images": reference.num_samples,
        "floor_split": FLOOR_SPLIT,
        "num_samples": num_samples,
        "seed": seed,
        "evaluation_seconds": round(time.perf_counter() - start_time, 2),
    }


def evaluate_pipeline(
    pipeline: DiffusionPipeline,
    num_samples: int = 1000,
    class_conditional: bool = True,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 50,
    scheduler: Optional[str] = None,
    seed: int = 0,
    batch_size: int = 100,
    feature_extractor: Optional[FeatureExtractor] = None,
    classifier: Optional[DigitClassifier] = None,
    dataset_name: str = DEFAULT_DATASET,
    cache_dir: Optional[str] = None,
    match_resolution: bool = True,
) -> dict:
    r"""
    Sample images from a pipeline and score them with [`evaluate_images`].

    Class-conditional sampling requests the labels `0, 1, ..., num_classes - 1, 0, 1, ...`, so every
    batch is balanced. Noise comes from one CPU generator seeded with `seed`, so results repeat for
    the same `seed` and `batch_size`.

    Args:
        pipeline ([`DiffusionPipeline`]): A [`MoLPipeline`], or another pipeline that accepts
            `batch_size`, `num_inference_steps`, `generator` and `output_type` (and `class_labels` and
            `guidance_scale` for class-conditional sampling). It is not modified.
        num_samples (`int`, defaults to 1000): Images to sample, at least 2.
        class_conditional (`bool`, defaults to `True`): Request balanced labels and report
            `class_accuracy`. Needs a class-conditional model with as many classes as the classifier.
        guidance_scale (`float`, defaults to 1.0): Classifier-free guidance scale. 1.0 means no guidance.
        num_inference_steps (`int`, defaults to 50): Denoising steps.
        scheduler (`str`, *optional*): `"ddpm"`, `"ddim"`, `"dpm"` or `"euler"` to sample with that
            scheduler built from the pipeline's scheduler config. `None` keeps the pipeline's scheduler.
        seed (`int`, defaults to 0): Seed of the initial noise and of the real floor sample.
        batch_size (`int`, defaults to 100): Images per pipeline call.
        feature_extractor, classifier, dataset_name, cache_dir, match_resolution: As in [`evaluate_images`].

    Returns:
        `dict`: The results of [`evaluate_images`] plus `class_conditional`, `guidance_scale`,
        `num_inference_steps`, `scheduler` (class name), `batch_size`, `sampling_seconds` and
        `seconds_per_image`.
    """
    _check_positive("num_samples", num_samples, minimum=2)
    _check_positive("num_inference_steps", num_inference_steps)
    _check_positive("batch_size", batch_size)
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}.")
    if not class_conditional and guidance_scale != 1.0:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs class-conditional sampling. Pass class_conditional=True "
            "or guidance_scale=1.0."
        )

    # 1. Models: the classifier first, so a failure there costs no sampling time.
    if classifier is None:
        classifier = get_digit_classifier(cache_dir=cache_dir, dataset_name=dataset_name)
    labels = None
    if class_conditional:
        _check_class_conditional(pipeline, classifier.num_classes)
        labels = torch.arange(num_samples) % classifier.num_classes
    _check_floor_size(dataset_name, num_samples, labels)
    sampler = _pipeline_with_scheduler(pipeline, scheduler)
    sampler.set_progress_bar_config(disable=True)

    # 2. Sampling.
    start_time = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batches = []
    for start in tqdm(range(0, num_samples, batch_size), desc="Sampling", unit="batch"):
        size = min(batch_size, num_samples - start)
        kwargs = {"batch_size": size}
        if labels is not None:
            kwargs.update(class_labels=labels[start : start + size].tolist(), guidance_scale=guidance_scale)
        output = sampler(num_inference_steps=num_inference_steps, generator=generator, output_type="pt", **kwargs)
        batches.append(to_image_tensor(output.images).cpu())
    sampling_seconds = time.perf_counter() - start_time
    images = torch.cat(batches)  # (N, C, H, W)

    # 3. Scores.
    results = evaluate_images(
        images,
        labels,
        feature_extractor=feature_extractor,
        classifier=classifier,
        dataset_name=dataset_name,
        seed=seed,
        cache_dir=cache_dir,
        match_resolution=match_resolution,
    )
    results.update(
        class_conditional=class_conditional,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        scheduler=type(sampler.scheduler).__name__,
        batch_size=batch_size,
        sampling_seconds=round(sampling_seconds, 2),
        seconds_per_image=round(sampling_seconds / num_samples, 4),
    )
    return results


def _resize_like_training_data(images: torch.Tensor, resolution: Optional[tuple[int, int]]) -> torch.Tensor:
    """Resize `(N, C, H, W)` images in [0, 1] to `resolution` as `mol_diffusion.data` resizes training images.

    The training pipeline resizes 8-bit images with antialiased bilinear interpolation and keeps 8 bits,
    so the result is rounded to multiples of 1/255. `None` or the current size returns `images` unchanged.
    """
    if resolution is None or tuple(images.shape[-2:]) == resolution:
        return images
    resized = F.interpolate(images, size=resolution, mode="bilinear", antialias=True, align_corners=False)
    return (resized * 255).round().clamp(0, 255) / 255


def _real_sample(
    dataset_name: str, num_samples: int, labels: Optional[torch.Tensor], seed: int
) -> torch.Tensor:
    """Draw `num_samples` distinct real images from the floor split, matching `labels` when given."""
    images, real_labels = load_split_images(dataset_name, FLOOR_SPLIT)
    generator = np.random.default_rng(seed)
    if labels is None:
        return images[generator.choice(len(images), size=num_samples, replace=False)]

    chosen = torch.empty(num_samples, dtype=torch.long)
    for label in torch.unique(labels).tolist():
        positions = torch.nonzero(labels == label).flatten()
        candidates = torch.nonzero(real_labels == label).flatten().numpy()
        chosen[positions] = torch.from_numpy(generator.choice(candidates, size=len(positions), replace=False))
    return images[chosen]


def _check_floor_size(dataset_name: str, num_samples: int, labels: Optional[torch.Tensor]) -> None:
    _, real_labels = load_split_images(dataset_name, FLOOR_SPLIT)
    if labels is None:
        needed, available, population = num_samples, len(real_labels), "images"
    else:
        label_counts = torch.bincount(labels, minlength=int(real_labels.max()) + 1)
        real_counts = torch.bincount(real_labels, minlength=len(label_counts))
        shortest = int(torch.argmax(label_counts - real_counts))  # the class that lacks the most images
        needed, available = int(label_counts[shortest]), int(real_counts[shortest])
        population = f"images of class {shortest}"
    if needed > available:
        raise ValueError(
            f"num_samples={num_samples} needs {needed} real {population} for the real floor, but the "
            f"{FLOOR_SPLIT!r} split of {dataset_name} has only {available}. Pass a smaller num_samples."
        )


def _check_labels(labels: torch.Tensor, num_samples: int, num_classes: int) -> None:
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},) to match images, got {tuple(labels.shape)}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), the classifier's classes, got values "
            f"from {labels.min().item()} to {labels.max().item()}."
        )


def pipeline_num_classes(pipeline: DiffusionPipeline) -> Optional[int]:
    """Return the class count of the pipeline's `transformer` (or `unet`), or `None` if it is unconditional."""
    denoiser = getattr(pipeline, "transformer", None)
    if denoiser is None:
        denoiser = getattr(pipeline, "unet", None)
    return denoiser_num_classes(denoiser) if denoiser is not None else None


def _check_class_conditional(pipeline: DiffusionPipeline, num_classes: int) -> None:
    model_classes = pipeline_num_classes(pipeline)
    if model_classes is None:
        raise ValueError(
            "class_conditional=True, but the pipeline's model has no num_classes (an unconditional model). "
            "Pass class_conditional=False."
        )
    if model_classes != num_classes:
        raise ValueError(
            f"The model has num_classes={model_classes}, but the classifier has {num_classes} classes, so "
            "class accuracy is undefined. Evaluate on the dataset the model was trained on "
            "(dataset_name), or pass class_conditional=False."
        )


def _pipeline_with_scheduler(pipeline: DiffusionPipeline, scheduler: Optional[str]) -> DiffusionPipeline:
    """Return a new pipeline sharing the models of `pipeline`, with the named scheduler if given."""
    components = dict(pipeline.components)
    if scheduler is not None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be None or one of {', '.join(SCHEDULERS)}, got {scheduler!r}.")
        components["scheduler"] = scheduler_from_name(scheduler, pipeline.scheduler.config)
    return type(pipeline)(**components)


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
