"""One backbone pass for models that expose only `predict` and `get_features`.

The TF Hub HRNet models have no function that returns both outputs, so asking for masks
and features runs the backbone twice. HRNetV2's segmentation head is small (1x1 conv,
batch norm, ReLU, 1x1 conv to the classes, bilinear upsampling to the input size) and
its weights are among the SavedModel's variables: found by shape and name, it turns
`get_features` into both outputs. The head is used only when, at load time, it
reproduces `predict` on a probe image; otherwise the job calls the model twice and the
log says why.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Optional

import numpy as np

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4              # max |head(features) - predict| on the probe
BN_EPSILONS = (1e-5, 1e-3, 1.001e-5)
MAX_CANDIDATES = 64           # head layouts tried against the probe at most
BN_ROLES = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """Variables of one candidate head: [conv -> (bias) -> (BN -> ReLU)] -> conv -> (bias)."""
  hidden_kernel: Any = None      # (1, 1, F, M) or None for a single-conv head
  hidden_bias: Any = None
  batch_norm: Optional[dict] = None   # role -> variable
  kernel: Any = None             # (1, 1, M, C)
  bias: Any = None

  def describe(self) -> str:
    names = [v.name for v in (self.hidden_kernel, self.hidden_bias, self.kernel, self.bias)
             if v is not None]
    if self.batch_norm:
      names += [v.name for v in self.batch_norm.values()]
    return ", ".join(names)


def _shape(variable) -> tuple:
  return tuple(int(d) for d in variable.shape)


def _name(variable) -> str:
  return variable.name.lower()


def _vectors(variables: list, length: int, word: str) -> list:
  return [v for v in variables if _shape(v) == (length,) and word in _name(v)]


def _batch_norms(variables: list, length: int) -> list:
  """Sets of BN variables of this length that share a name prefix (one layer each)."""
  by_prefix: dict = {}
  for variable in variables:
    if _shape(variable) != (length,):
      continue
    for role in BN_ROLES:
      if _name(variable).rsplit("/", 1)[-1].startswith(role):
        by_prefix.setdefault(_name(variable).rsplit("/", 1)[0], {})[role] = variable
  return [roles for roles in by_prefix.values() if len(roles) == len(BN_ROLES)]


def candidate_layouts(variables: list, feature_dim: int, num_classes: int) -> list:
  """Every plausible head among the variables, most specific first."""
  layouts = []
  finals = [v for v in variables if len(_shape(v)) == 4 and _shape(v)[:2] == (1, 1) and
            _shape(v)[3] == num_classes]
  for kernel in finals:
    hidden_dim = _shape(kernel)[2]
    biases = _vectors(variables, num_classes, "bias") or [None]
    if hidden_dim == feature_dim:   # a single 1x1 conv on the features
      layouts += [HeadLayout(kernel=kernel, bias=b) for b in biases]
    hiddens = [v for v in variables if _shape(v) == (1, 1, feature_dim, hidden_dim)
               and v is not kernel]
    for hidden in hiddens:
      hidden_biases = _vectors(variables, hidden_dim, "bias") or [None]
      for hidden_bias, norm, bias in itertools.product(
          hidden_biases, _batch_norms(variables, hidden_dim), biases):
        layouts.append(HeadLayout(hidden, hidden_bias, norm, kernel, bias))
  return layouts[:MAX_CANDIDATES]


def head_function(layout: HeadLayout, epsilon: float, softmax: bool) -> Callable:
  """features (B, h, w, F), output size (H, W) -> scores (B, H, W, C), in TensorFlow."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def conv(x, kernel, bias):
    y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
    return y if bias is None else tf.nn.bias_add(y, bias)

  def head(features, size):
    x = features
    if layout.hidden_kernel is not None:
      x = conv(x, layout.hidden_kernel, layout.hidden_bias)
      norm = layout.batch_norm
      x = tf.nn.batch_normalization(x, norm["moving_mean"], norm["moving_variance"],
                                    norm["beta"], norm["gamma"], epsilon)
      x = tf.nn.relu(x)
    scores = tf.image.resize(conv(x, layout.kernel, layout.bias), size, method="bilinear")
    return tf.nn.softmax(scores) if softmax else scores

  return head


def smooth_colour_images(seed: int, height: int, width: int, count: int = 1) -> np.ndarray:
  """(count, H, W, 3) smooth random colour fields in [0, 1]: 16 px blocks plus noise,
  closer to photographs than white noise (also the stand-ins' BN calibration input)."""
  rng = np.random.default_rng(seed)
  coarse = rng.random((count, height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
  fine = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)[:, :height, :width]
  noise = rng.normal(0, 0.05, fine.shape).astype(np.float32)
  return np.clip(fine + noise, 0.0, 1.0)


def probe_images(height: int = 96, width: int = 128, seed: int = 7) -> np.ndarray:
  """A smooth, varied colour image: class scores with real spatial structure."""
  return smooth_colour_images(seed, height, width)


@dataclasses.dataclass(frozen=True)
class HeadSearch:
  head: Optional[Callable]   # features, (H, W) -> scores; None when not found
  reason: str                # what was found, or why the model is called twice


@dataclasses.dataclass(frozen=True)
class ModelProbe:
  scores: np.ndarray             # module.predict of probe_images()
  search: Optional[HeadSearch]   # None where no head was searched for


def probe_module(module: Any, search_head: bool) -> ModelProbe:
  """One predict call on the probe image: its scores (which tell probabilities from
  logits) and, when asked, the search for the model's own head among its variables."""
  images = probe_images()
  scores = module.predict(images).numpy()
  search = _find_head(module, model_variables(module), images, scores) if search_head else None
  return ModelProbe(scores, search)


def _find_head(module: Any, variables: list, images: np.ndarray,
               expected: np.ndarray) -> HeadSearch:
  """Searches `variables` for a head that reproduces module.predict within TOLERANCE."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  features = module.get_features(images)
  size = tf.constant(images.shape[1:3])
  feature_dim, num_classes = int(features.shape[-1]), int(expected.shape[-1])
  layouts = candidate_layouts(variables, feature_dim, num_classes)
  if not layouts:
    return HeadSearch(None, f"no 1x1 convolution from {feature_dim} features to "
                            f"{num_classes} classes among the model's {len(variables)} "
                            "variables")
  best = np.inf
  for layout in layouts:
    for epsilon in (BN_EPSILONS if layout.batch_norm else (0.0,)):
      for softmax in (False, True):
        head = head_function(layout, epsilon, softmax)
        error = float(np.max(np.abs(head(features, size).numpy() - expected)))
        best = min(best, error)
        if error <= TOLERANCE:
          return HeadSearch(head, f"head found ({layout.describe()}; BN epsilon "
                                  f"{epsilon:g}, softmax {softmax}): reproduces predict "
                                  f"within {error:.1e}")
  return HeadSearch(None, f"{len(layouts)} candidate heads found by shape, but none "
                          f"reproduces predict within {TOLERANCE:g} (closest: {best:.2e})")


def model_variables(module: Any) -> list:
  """The variables `predict` uses (the tracked `weights`/`variables` lists where present)."""
  seen, variables = set(), []
  sources = [getattr(module, "variables", None), getattr(module, "weights", None)]
  concrete = getattr(module.predict, "concrete_functions", None) or []
  sources += [getattr(function, "variables", None) for function in concrete]
  for source in sources:
    for variable in source or []:
      if id(variable) not in seen:
        seen.add(id(variable))
        variables.append(variable)
  return variables
