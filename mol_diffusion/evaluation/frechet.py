"""Frechet distance between Gaussians fitted to two sets of features (the distance behind FID)."""

import logging
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean `(F,)` and covariance `(F, F)` of `num_samples` feature vectors, in float64."""

    mean: np.ndarray
    covariance: np.ndarray
    num_samples: int


def compute_feature_statistics(features: Union[torch.Tensor, np.ndarray]) -> FeatureStatistics:
    """Fit a Gaussian to a set of feature vectors.

    Args:
        features (`torch.Tensor` or `np.ndarray`): `(N, F)` features, N >= 2.

    Returns:
        [`FeatureStatistics`]: The mean and the unbiased (N - 1) covariance, in float64.
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be an (N, F) array with N >= 2, got shape {features.shape}.")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values. Check the images passed to the feature extractor.")

    num_samples, feature_dim = features.shape
    if num_samples <= feature_dim:
        # The covariance is then singular. The distance stays defined but is biased upwards, more so
        # the fewer samples there are, so compare only numbers computed at the same sample size.
        logger.info("Fitting %d-d feature statistics to only %d samples.", feature_dim, num_samples)
    return FeatureStatistics(
        mean=features.mean(axis=0),
        covariance=np.cov(features, rowvar=False),
        num_samples=num_samples,
    )


def frechet_distance(
    mean_a: np.ndarray, covariance_a: np.ndarray, mean_b: np.ndarray, covariance_b: np.ndarray
) -> float:
    r"""Compute the Frechet distance between the Gaussians N(mean_a, covariance_a) and N(mean_b, covariance_b).

    d^2 = |mean_a - mean_b|^2 + tr(covariance_a) + tr(covariance_b) - 2 tr((covariance_a covariance_b)^{1/2}).

    The trace of the matrix square root is computed as the sum of the square roots of the eigenvalues
    of the symmetric matrix A^{1/2} B A^{1/2}, which has the same eigenvalues as A B. Both
    eigendecompositions are of symmetric matrices, so no complex parts arise, and eigenvalues that
    rounding makes slightly negative are clipped to 0.

    Args:
        mean_a (`np.ndarray`): `(F,)` mean of the first set.
        covariance_a (`np.ndarray`): `(F, F)` symmetric positive semi-definite covariance of the first set.
        mean_b (`np.ndarray`): `(F,)` mean of the second set.
        covariance_b (`np.ndarray`): `(F, F)` covariance of the second set.

    Returns:
        `float`: The squared Frechet distance (the quantity FID reports), >= 0.
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    covariance_a, covariance_b = np.asarray(covariance_a, np.float64), np.asarray(covariance_b, np.float64)
    feature_dim = mean_a.shape[0]
    for name, array, shape in (
        ("mean_a", mean_a, (feature_dim,)),
        ("mean_b", mean_b, (feature_dim,)),
        ("covariance_a", covariance_a, (feature_dim, feature_dim)),
        ("covariance_b", covariance_b, (feature_dim, feature_dim)),
    ):
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match mean_a, got {array.shape}.")

    sqrt_a = _symmetric_sqrt(covariance_a)
    middle = sqrt_a @ covariance_b @ sqrt_a
    middle = (middle + middle.T) / 2  # remove the asymmetry that rounding leaves
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()

    mean_term = np.sum((mean_a - mean_b) ** 2)
    distance = mean_term + np.trace(covariance_a) + np.trace(covariance_b) - 2.0 * trace_sqrt_product
    # Identical statistics can give about -1e-12 from rounding, but the true value is never negative.
    return float(max(distance, 0.0))


def frechet_distance_from_statistics(statistics_a: FeatureStatistics, statistics_b: FeatureStatistics) -> float:
    """Compute the Frechet distance between two fitted Gaussians, as [`frechet_distance`] does."""
    return frechet_distance(statistics_a.mean, statistics_a.covariance, statistics_b.mean, statistics_b.covariance)


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix, from its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
