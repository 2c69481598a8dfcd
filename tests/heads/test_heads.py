"""The head's numerics: LogME against the closed-form evidence of a Bayesian linear model,
the sampling protocol, and a deterministic head that learns."""
import numpy as np
import pytest

from transforms.heads.logme import evidence_fixed_point, logme
from transforms.heads.sampling import balanced_sample, grid_labels
from transforms.heads.train import LOGISTIC, MLP, fit_head


def _closed_form_evidence(features, y, alpha, beta):
  """log N(y; 0, F F^T / alpha + I / beta), computed directly (no SVD, no fixed point)."""
  n = len(y)
  covariance = features @ features.T / alpha + np.eye(n) / beta
  _, log_det = np.linalg.slogdet(covariance)
  return -0.5 * (n * np.log(2 * np.pi) + log_det + y @ np.linalg.solve(covariance, y))


@pytest.mark.parametrize("n,dim", [(300, 20), (90, 60)])
def test_logme_is_the_maximum_of_the_closed_form_evidence(n, dim):
  rng = np.random.default_rng(0)
  true_alpha, true_beta = 4.0, 25.0
  features = rng.standard_normal((n, dim))
  w = rng.standard_normal(dim) / np.sqrt(true_alpha)
  y = features @ w + rng.standard_normal(n) / np.sqrt(true_beta)
  per_sample, alpha, beta = evidence_fixed_point(features, y)
  exact = _closed_form_evidence(features, y, alpha, beta)
  assert per_sample * n == pytest.approx(exact, rel=1e-9)
  for factor in (0.8, 1.25):       # the fixed point is a maximum in both directions
    assert _closed_form_evidence(features, y, alpha * factor, beta) < exact
    assert _closed_form_evidence(features, y, alpha, beta * factor) < exact
  if n > 10 * dim:                 # and with enough data it finds the generating values
    assert beta == pytest.approx(true_beta, rel=0.25)


def test_logme_prefers_features_that_explain_the_labels():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 600)
  informative = np.eye(3)[labels] * 3 + rng.standard_normal((600, 3)) * 0.5
  good = np.concatenate([informative, rng.standard_normal((600, 17))], 1)
  noise = rng.standard_normal((600, 20))
  assert logme(good, labels) > logme(noise, labels)


def test_grid_labels_take_the_pixel_nearest_each_cell_centre():
  truth = np.arange(64, dtype=np.uint8).reshape(8, 8)
  assert grid_labels(truth, (2, 2)).tolist() == [[18, 22], [50, 54]]
  assert grid_labels(truth[:7, :7], (2, 2)).tolist() == [[18, 22], [50, 54]]


def test_balanced_sample_evens_out_classes_and_skips_unusable_cells():
  labels = np.zeros((100, 100), np.uint8)
  labels[:5, :5] = 1                         # a rare class: 25 cells of 10,000
  usable = np.ones_like(labels, bool)
  usable[50:] = False
  chosen = balanced_sample(labels, usable, 50, np.random.default_rng(0))
  assert len(chosen) == 50 and usable.ravel()[chosen].all()
  assert 15 <= (labels.ravel()[chosen] == 1).sum() <= 25     # about half, not 0.5%
  again = balanced_sample(labels, usable, 50, np.random.default_rng(0))
  assert (chosen == again).all()


@pytest.mark.parametrize("kind", [LOGISTIC, MLP])
def test_a_head_learns_separable_classes_and_is_deterministic(kind):
  rng = np.random.default_rng(2)
  centres = rng.standard_normal((4, 30)) * 3
  labels = rng.integers(0, 4, 800)
  features = centres[labels] + rng.standard_normal((800, 30))
  train, val = slice(0, 600), slice(600, None)
  heads = [fit_head(features[train], labels[train], 4, (features[val], labels[val]), kind,
                    seed=5, max_steps=300) for _ in range(2)]
  for a, b in zip(heads[0].weights, heads[1].weights):
    np.testing.assert_array_equal(a, b)
  accuracy = (heads[0].logits(features[val]).argmax(1) == labels[val]).mean()
  assert accuracy > 0.95
