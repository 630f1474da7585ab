"""Fréchet distance between two image sets in a feature space (FID when the features are
Inception's; here by default the project's own trained image encoder, since no Inception weights
can be downloaded: numbers are comparable within this project, not with published FIDs).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from cm3leon_jax.errors import InputError


def feature_stats(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (float64) of N feature vectors."""
  features_ND = np.asarray(features_ND, dtype=np.float64)
  if features_ND.ndim != 2 or features_ND.shape[0] < 2:
    raise InputError(f"FID needs at least 2 feature vectors of shape [N, D], got "
                     f"{features_ND.shape}")
  if not np.isfinite(features_ND).all():
    raise InputError("FID features contain NaN or inf")
  return features_ND.mean(0), np.cov(features_ND, rowvar=False)


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                     sigma_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
  if mu_a.shape != mu_b.shape:
    raise InputError(f"FID: feature dimensions differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
  covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
  if not np.isfinite(covmean).all():
    # Near-singular product (few samples): regularise both covariances slightly.
    eps = 1e-6 * np.eye(sigma_a.shape[0])
    covmean = scipy.linalg.sqrtm((sigma_a + eps) @ (sigma_b + eps))
  covmean = np.real(covmean)
  diff = mu_a - mu_b
  value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
  return float(max(value, 0.0))


def fid(features_a_ND: np.ndarray, features_b_MD: np.ndarray) -> float:
  return frechet_distance(*feature_stats(features_a_ND), *feature_stats(features_b_MD))
