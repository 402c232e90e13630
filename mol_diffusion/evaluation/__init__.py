"""Sample-quality metrics: Frechet distance in digit-classifier or Inception v3 features, class accuracy.

Example:
    >>> from diffusers import DiffusionPipeline
    >>> import mol_diffusion
    >>> from mol_diffusion.evaluation import evaluate_pipeline
    >>> pipeline = DiffusionPipeline.from_pretrained("outputs/mnist_mol_cpu")
    >>> results = evaluate_pipeline(pipeline, num_samples=1000, guidance_scale=2.0, scheduler="ddim")
    >>> results["frechet_distance"], results["real_floor"], results["class_accuracy"]

The command line does the same: `python -m mol_diffusion.evaluation --model_dir outputs/mnist_mol_cpu`.
"""

from .classifier import DigitClassifier, default_cache_dir, get_digit_classifier, train_digit_classifier
from .evaluator import SCHEDULERS, evaluate_images, evaluate_pipeline
from .frechet import FeatureStatistics, compute_feature_statistics, frechet_distance, frechet_distance_from_statistics
from .inception import (
    InceptionFeatureExtractor,
    InceptionWeightsNotFoundError,
    default_inception_weights_path,
    load_inception_feature_extractor,
)

__all__ = [
    "DigitClassifier",
    "FeatureStatistics",
    "InceptionFeatureExtractor",
    "InceptionWeightsNotFoundError",
    "SCHEDULERS",
    "compute_feature_statistics",
    "default_cache_dir",
    "default_inception_weights_path",
    "evaluate_images",
    "evaluate_pipeline",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "get_digit_classifier",
    "load_inception_feature_extractor",
    "train_digit_classifier",
]
