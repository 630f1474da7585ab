"""Fréchet distance between two image sets in a feature space (FID when the features are
Inception's; here by default the project's own trained image encoder, since no Inception weights
can be downloaded: numbers are comparable within this project, not with published FIDs).
"""

from __future__ import annotations

import numpy as np

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


def _trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
  """Tr((S_a S_b)^(1/2)) = sum of sqrt(eig(S_a^(1/2) S_b S_a^(1/2))): symmetric PSD matrices, so
  two `eigh` calls, with no complex parts and no singular-matrix retry (scipy's sqrtm on a
  near-singular 2048 x 2048 product took 90 s)."""
  w, v = np.linalg.eigh(sigma_a)
  half_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  return float(np.sqrt(np.clip(np.linalg.eigvalsh(half_a @ sigma_b @ half_a), 0.0, None)).sum())


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                     sigma_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
  if mu_a.shape != mu_b.shape:
    raise InputError(f"FID: feature dimensions differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
  diff = mu_a - mu_b
  value = (diff @ diff + np.trace(sigma_a) + np.trace(sigma_b)
           - 2.0 * _trace_sqrt_product(sigma_a, sigma_b))
  return float(max(value, 0.0))


def fid(features_a_ND: np.ndarray, features_b_MD: np.ndarray) -> float:
  """Fréchet distance of two feature sets. With fewer vectors than dimensions (e.g. 32 images
  in Inception's 2048-d space) S_a = X^T X / (N - 1) has rank < N, and the nonzero eigenvalues
  of S_a S_b are those of the N x N matrix X S_b X^T / (N - 1): same value, far cheaper."""
  mu_a, sigma_a = feature_stats(features_a_ND)
  mu_b, sigma_b = feature_stats(features_b_MD)
  if mu_a.shape != mu_b.shape:
    raise InputError(f"FID: feature dimensions differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
  # Tr((S_a S_b)^(1/2)) is symmetric in a and b: project the smaller set through the other's S.
  a, b = np.asarray(features_a_ND, np.float64), np.asarray(features_b_MD, np.float64)
  small_ND, other_sigma = (a, sigma_b) if len(a) <= len(b) else (b, sigma_a)
  if len(small_ND) >= small_ND.shape[1]:
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
  xc_ND = small_ND - small_ND.mean(0)
  gram_NN = xc_ND @ other_sigma @ xc_ND.T / (len(small_ND) - 1)
  trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(gram_NN), 0.0, None)).sum())
  diff = mu_a - mu_b
  value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt
  return float(max(value, 0.0))
