"""Training a head on sampled features, pure numpy: standardisation, multinomial logistic
regression or one hidden layer, full-batch Adam with early stopping on held-out images.
Deterministic for a seed on one machine (no threads race: numpy's BLAS sums in a fixed
order for fixed shapes)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

LOGISTIC, MLP = "logistic", "mlp"
HEADS = (LOGISTIC, MLP)


@dataclasses.dataclass
class Head:
  """x -> logits: ((x - mean) / scale) @ w1 + b1 [then relu, @ w2 + b2]."""
  kind: str
  mean: np.ndarray
  scale: np.ndarray
  weights: list                 # [w1, b1] or [w1, b1, w2, b2], float32
  steps: int = 0
  best_validation_loss: Optional[float] = None

  @property
  def num_classes(self) -> int:
    return self.weights[-1].shape[0]

  def logits(self, features: np.ndarray) -> np.ndarray:
    return _forward(self.weights, (features - self.mean) / self.scale)[0]


def _forward(weights, x):
  if len(weights) == 2:
    return x @ weights[0] + weights[1], None
  hidden = np.maximum(x @ weights[0] + weights[1], 0)
  return hidden @ weights[2] + weights[3], hidden


def _loss_and_grads(weights, x, y, sample_weight, l2):
  logits, hidden = _forward(weights, x)
  logits = logits - logits.max(1, keepdims=True)
  probabilities = np.exp(logits)
  probabilities /= probabilities.sum(1, keepdims=True)
  n = sample_weight.sum()
  loss = -(sample_weight * np.log(probabilities[np.arange(len(y)), y] + 1e-12)).sum() / n
  loss += 0.5 * l2 * sum(float((w * w).sum()) for w in weights[0::2])
  delta = probabilities
  delta[np.arange(len(y)), y] -= 1
  delta *= (sample_weight / n)[:, None]
  if hidden is None:
    return loss, [x.T @ delta + l2 * weights[0], delta.sum(0)]
  grads_out = [hidden.T @ delta + l2 * weights[2], delta.sum(0)]
  back = (delta @ weights[2].T) * (hidden > 0)
  return loss, [x.T @ back + l2 * weights[0], back.sum(0)] + grads_out


def prior_shift(labels: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
  """What to add to the logits of a head trained on a class-balanced sample so that it
  predicts at the classes' real frequencies: log(real share) - log(sampled share)."""
  sampled = np.bincount(labels, minlength=len(class_counts)).astype(np.float64)
  real = np.asarray(class_counts, np.float64)
  shift = np.zeros(len(class_counts))
  known = (sampled > 0) & (real > 0)
  shift[known] = np.log(real[known] / real.sum()) - np.log(sampled[known] / sampled.sum())
  return shift.astype(np.float32)


def fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int,
             validation: Optional[tuple] = None, kind: str = LOGISTIC, seed: int = 0,
             hidden: int = 256, l2: float = 1e-4, learning_rate: float = 0.01,
             max_steps: int = 2000, patience: int = 50,
             class_counts: Optional[np.ndarray] = None) -> Head:
  """Trains on (N, F) float32 features and (N,) labels; stops when the validation
  loss has not improved for `patience` steps, keeping the best. With class_counts
  (the real frequency of each class, the sample being class-balanced) the output
  bias is shifted to those frequencies (prior_shift) once trained."""
  rng = np.random.default_rng(seed)
  features = np.asarray(features, np.float32)
  mean = features.mean(0)
  scale = features.std(0) + 1e-6
  x = ((features - mean) / scale).astype(np.float32)
  dim = x.shape[1]
  if kind == LOGISTIC:
    weights = [np.zeros((dim, num_classes), np.float32), np.zeros(num_classes, np.float32)]
  else:
    weights = [(rng.standard_normal((dim, hidden)) * np.sqrt(2 / dim)).astype(np.float32),
               np.zeros(hidden, np.float32),
               (rng.standard_normal((hidden, num_classes)) * np.sqrt(1 / hidden))
               .astype(np.float32), np.zeros(num_classes, np.float32)]
  sample_weight = np.ones(len(labels), np.float32)
  if validation is not None:
    val_x = ((np.asarray(validation[0], np.float32) - mean) / scale).astype(np.float32)
    val_y = validation[1]
    val_weight = np.ones(len(val_y), np.float32)
  moments = [np.zeros_like(w) for w in weights]
  squares = [np.zeros_like(w) for w in weights]
  best, best_weights, since, step = np.inf, [w.copy() for w in weights], 0, 0
  for step in range(1, max_steps + 1):
    _, grads = _loss_and_grads(weights, x, labels, sample_weight, l2)
    for i, grad in enumerate(grads):
      moments[i] = 0.9 * moments[i] + 0.1 * grad
      squares[i] = 0.999 * squares[i] + 0.001 * grad * grad
      corrected = moments[i] / (1 - 0.9 ** step)
      weights[i] = (weights[i] - learning_rate * corrected /
                    (np.sqrt(squares[i] / (1 - 0.999 ** step)) + 1e-8)).astype(np.float32)
    if validation is None:
      continue
    loss = _loss_and_grads(weights, val_x, val_y, val_weight, 0.0)[0]
    if loss < best - 1e-5:
      best, best_weights, since = loss, [w.copy() for w in weights], 0
    else:
      since += 1
      if since >= patience:
        break
  if validation is None:
    best_weights, best = weights, None
  if class_counts is not None:
    best_weights[-1] = best_weights[-1] + prior_shift(labels, class_counts)
  return Head(kind, mean.astype(np.float32), scale.astype(np.float32), best_weights, step,
              None if best is None else float(best))
