"""LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021): the log maximum evidence of a Bayesian linear model from features
to each one-hot label column, alpha and beta found by the paper's fixed-point iteration
on the features' singular values; averaged over classes and divided by the sample size.
Pure numpy."""
from __future__ import annotations

import numpy as np


def evidence_fixed_point(features: np.ndarray, target: np.ndarray, max_iterations: int = 100,
                         tolerance: float = 1e-6) -> tuple:
  """(log evidence / n, alpha, beta) for one target column y = features @ w + noise,
  w ~ N(0, I / alpha), noise ~ N(0, 1 / beta), at the (alpha, beta) maximising it."""
  features = np.asarray(features, np.float64)
  y = np.asarray(target, np.float64)
  n, dim = features.shape
  u, s, _ = np.linalg.svd(features, full_matrices=False)
  sigma = s ** 2
  x = u.T @ y
  x2 = x ** 2
  outside = max(float(y @ y - x2.sum()), 0.0)   # the part of y no feature direction spans
  alpha, beta = 1.0, 1.0
  for _ in range(max_iterations):
    t = alpha / beta
    gamma = float((sigma / (sigma + t)).sum())
    m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
    residual = float((x2 / (1 + sigma / t) ** 2).sum()) + outside
    new_alpha, new_beta = gamma / (m2 + 1e-12), (n - gamma) / (residual + 1e-12)
    converged = abs(new_alpha / new_beta - t) / t < tolerance
    alpha, beta = new_alpha, new_beta
    if converged:
      break
  t = alpha / beta
  m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
  residual = float((x2 / (1 + sigma / t) ** 2).sum()) + outside
  log_det = float(np.log(alpha + beta * sigma).sum()) + (dim - sigma.size) * np.log(alpha)
  evidence = (dim / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * log_det
              - beta / 2 * residual - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
  return float(evidence / n), alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
  """Mean over the classes present of the per-sample log maximum evidence."""
  labels = np.asarray(labels)
  scores = [evidence_fixed_point(features, (labels == c).astype(np.float64))[0]
            for c in np.unique(labels)]
  return float(np.mean(scores))
