"""Labeled images for heads: source images paired with their truth by stem (the truth as
`evaluate` reads it), split into training and held-out images, and sampled into
features one image at a time (memory bounded by the sample, not the image count)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms.evaluation.truth import (UNLABELLED, decode_mask_image, decode_tool_file,
                                         match_key, read_bytes)
from transforms.heads.sampling import FEATURE_STRIDE, balanced_sample, grid_labels
from transforms.reading.decode import decode_image

MAX_PIXELS = 400_000_000


class LabeledDataError(ValueError):
  """Images or truth a head cannot be trained on; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class LabeledImage:
  key: str
  image: str                   # the image's path
  truth: str                   # the truth's path, or '<tool file>#<name>'
  truth_mask: Optional[bytes]  # decoded truth of a tool's file (PNG), else None


@dataclasses.dataclass
class Sample:
  features: np.ndarray         # (N, F) float32
  labels: np.ndarray           # (N,) truth class ids
  image_index: np.ndarray      # (N,) which LabeledImage each came from
  notes: list                  # images skipped, with why
  class_cells: np.ndarray = None   # (C,) labelled feature-grid cells per class, all images


def _match(patterns) -> list:
  paths = []
  for pattern in patterns:
    try:
      found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception:  # pylint: disable=broad-except  # no such directory
      found = []
    if not found:
      raise LabeledDataError(f"{pattern} matches no file")
    paths += found
  return sorted(set(paths))


def labeled_images(image_patterns, truth_patterns, truth_format: Optional[str],
                   class_names: tuple, suffix: str = "") -> tuple:
  """([LabeledImage] sorted by stem, [notes]): images without truth and truth without
  an image are named in the notes, not used."""
  from transforms.pngs import encode_png  # pylint: disable=import-outside-toplevel
  images = {}
  for path in _match(image_patterns):
    images.setdefault(match_key(path), []).append(path)
  truths, notes = {}, []
  if truth_format is None:
    for path in _match(truth_patterns):
      truths.setdefault(match_key(path, suffix), []).append((path, None))
  else:
    for item in decode_tool_file(truth_format, truth_patterns[0], class_names):
      origin = f"{truth_patterns[0]}#{item.name}"
      if item.mask is None:
        notes.append(f"{origin}: {item.error}")
        continue
      truths.setdefault(match_key(item.image_id or item.name, suffix), []).append(
          (origin, encode_png(item.mask)))
  pairs = []
  for key in sorted(set(images) | set(truths)):
    found_images, found_truth = images.get(key, []), truths.get(key, [])
    if len(found_images) == 1 and len(found_truth) == 1:
      pairs.append(LabeledImage(key, found_images[0], *found_truth[0]))
    elif not found_truth:
      notes += [f"{p}: no truth has its stem (not used)" for p in found_images]
    elif not found_images:
      notes += [f"{t[0]}: no image has its stem (not used)" for t in found_truth]
    else:
      notes.append(f"stem {key!r}: {len(found_images)} images and {len(found_truth)} truth "
                   "files share it (not used)")
  return pairs, notes


def split(pairs: list, holdout: float, seed: int) -> tuple:
  """(training, held-out) images: a seeded shuffle, at least one of each."""
  if len(pairs) < 2:
    raise LabeledDataError(f"{len(pairs)} labeled image(s) found: a head needs at least "
                           "two (one to train on, one to hold out)")
  order = np.random.default_rng(seed).permutation(len(pairs))
  held = min(len(pairs) - 1, max(1, int(round(holdout * len(pairs)))))
  return ([pairs[i] for i in sorted(order[held:])], [pairs[i] for i in sorted(order[:held])])


def load_pair(pair: LabeledImage, num_truth_classes: int, ignore_value: int) -> tuple:
  """(pixels, truth with UNLABELLED for ignored pixels); raises LabeledDataError."""
  pixels = decode_image(read_bytes(pair.image), MAX_PIXELS)
  truth = (decode_mask_image(read_bytes(pair.truth)) if pair.truth_mask is None else
           decode_mask_image(pair.truth_mask))
  if truth.shape != pixels.shape[:2]:
    raise LabeledDataError(f"{pair.truth} is {truth.shape[1]}x{truth.shape[0]}, its image "
                           f"{pair.image} {pixels.shape[1]}x{pixels.shape[0]}")
  ignore = ignore_value if pair.truth_mask is None else UNLABELLED
  outside = np.unique(truth[(truth >= num_truth_classes) & (truth != ignore)])
  if outside.size:
    raise LabeledDataError(f"{pair.truth} has class ids {outside.tolist()[:10]} outside "
                           f"its {num_truth_classes} classes")
  return pixels, np.where(truth == ignore, UNLABELLED, truth).astype(np.uint8)


def sample_features(model, pairs: list, num_truth_classes: int, ignore_value: int,
                    pixels_per_image: int, seed: int) -> Sample:
  """Class-balanced cells of each image's feature grid, their features and labels."""
  features, labels, index, notes = [], [], [], []
  class_cells = np.zeros(num_truth_classes, np.int64)
  for i, pair in enumerate(pairs):
    try:
      pixels, truth = load_pair(pair, num_truth_classes, ignore_value)
    except LabeledDataError as e:
      notes.append(str(e))
      continue
    grid = (-(-truth.shape[0] // FEATURE_STRIDE), -(-truth.shape[1] // FEATURE_STRIDE))
    cell_labels = grid_labels(truth, grid)
    class_cells += np.bincount(cell_labels[cell_labels != UNLABELLED].ravel(),
                               minlength=num_truth_classes)[:num_truth_classes]
    cells = balanced_sample(cell_labels, cell_labels != UNLABELLED, pixels_per_image,
                            np.random.default_rng([seed, i]))
    if not cells.size:
      notes.append(f"{pair.truth}: no labelled pixel")
      continue
    features.append(model.gather(pixels, cells, grid[1]))
    labels.append(cell_labels.ravel()[cells].astype(np.int64))
    index.append(np.full(cells.size, i))
  if not features:
    raise LabeledDataError("no labelled pixel in any image: " + "; ".join(notes[:5]))
  return Sample(np.concatenate(features), np.concatenate(labels), np.concatenate(index), notes,
                class_cells)


def check_classes(sample: Sample, class_names: tuple, minimum: int) -> None:
  """Every truth class needs `minimum` sampled pixels to be learned; says how many."""
  counts = np.bincount(sample.labels, minlength=len(class_names))
  short = [f"{name!r} ({int(c)} pixels)" for name, c in zip(class_names, counts) if c < minimum]
  if short:
    raise LabeledDataError(
        f"too few labelled pixels of {', '.join(short)} in the training sample (at least "
        f"{minimum} each are needed): label more of them, or sample more per image "
        "(--pixels_per_image)")
