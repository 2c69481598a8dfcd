"""Evaluation numerics, pure numpy: one image's sums against its truth, sums added across
images, and the report's figures (confusion, IoU, calibration, review value) from them.

Every figure comes from additive sums of bounded size (a confusion matrix, two 256-level
confidence histograms, two fine histograms of the per-image QA scores), so a reviewed set
of any size is evaluated in bounded memory.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

CONFIDENCE_LEVELS = 256        # confidence PNGs store max probability x 255
ECE_BINS = 15
REVIEW_BINS = 1 << 16          # per-image scores in [0, 1], binned this finely
REVIEW_AT = (5, 10, 20)        # percent of images reviewed, for the headline figures
IGNORED = -1                   # a class that maps to nothing: its pixels never count


@dataclasses.dataclass(frozen=True)
class Taxonomy:
  """Evaluation classes, and how model and truth class ids map onto them."""
  class_names: tuple           # the evaluation classes
  model_to_eval: tuple         # model class id -> evaluation id
  truth_names: tuple           # the truth's classes, in its ids' order
  truth_to_eval: tuple         # truth class id -> evaluation id, or IGNORED

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def model_lut(self) -> np.ndarray:
    """uint8 class ids -> evaluation ids; nodata and unknown ids -> IGNORED."""
    lut = np.full(256, IGNORED, np.int64)
    lut[:len(self.model_to_eval)] = self.model_to_eval
    return lut

  def truth_lut(self) -> np.ndarray:
    lut = np.full(256, IGNORED, np.int64)
    lut[:len(self.truth_to_eval)] = self.truth_to_eval
    return lut


@dataclasses.dataclass
class ImageSums:
  """What one image adds to the report."""
  confusion: np.ndarray                 # (K, K) int64, [truth, predicted]
  right_levels: Optional[np.ndarray]    # (256,) int64: right pixels per confidence level
  wrong_levels: Optional[np.ndarray]

  @property
  def pixels(self) -> int:
    return int(self.confusion.sum())

  @property
  def wrong(self) -> int:
    return self.pixels - int(np.trace(self.confusion))


def image_sums(predicted: np.ndarray, truth: np.ndarray, taxonomy: Taxonomy,
               confidence: Optional[np.ndarray] = None) -> ImageSums:
  """predicted: (H, W) uint8 model class ids (255 nodata); truth: (H, W) truth ids, any
  id outside the truth's classes unlabelled; confidence: (H, W) uint8 levels or None.
  Counts the pixels where both sides map to an evaluation class."""
  k = taxonomy.num_classes
  predicted_eval = taxonomy.model_lut()[predicted]
  truth_eval = taxonomy.truth_lut()[truth]
  counted = (predicted_eval >= 0) & (truth_eval >= 0)
  pairs = truth_eval[counted] * k + predicted_eval[counted]
  confusion = np.bincount(pairs, minlength=k * k).reshape(k, k).astype(np.int64)
  right_levels = wrong_levels = None
  if confidence is not None:
    levels = confidence[counted].astype(np.int64)
    right = truth_eval[counted] == predicted_eval[counted]
    right_levels = np.bincount(levels[right], minlength=CONFIDENCE_LEVELS).astype(np.int64)
    wrong_levels = np.bincount(levels[~right], minlength=CONFIDENCE_LEVELS).astype(np.int64)
  return ImageSums(confusion, right_levels, wrong_levels)


def class_scores(confusion: np.ndarray) -> dict:
  """Per-class IoU, precision, recall, F1 and support; None where undefined (no pixel of
  the class in truth or prediction). mIoU averages the defined IoUs (as mmsegmentation)."""
  confusion = np.asarray(confusion, np.float64)
  true_positive = np.diag(confusion)
  support = confusion.sum(1)
  predicted = confusion.sum(0)
  union = support + predicted - true_positive

  def ratio(num, den):
    return [float(n / d) if d else None for n, d in zip(num, den)]
  iou = ratio(true_positive, union)
  precision = ratio(true_positive, predicted)
  recall = ratio(true_positive, support)
  f1 = ratio(2 * true_positive, support + predicted)
  total = support.sum()
  defined = [v for v in iou if v is not None]
  return {
      "iou": iou, "precision": precision, "recall": recall, "f1": f1,
      "support": [int(s) for s in support], "predicted": [int(p) for p in predicted],
      "miou": float(np.mean(defined)) if defined else None,
      "fwiou": (float(sum(s / total * v for s, v in zip(support, iou) if v is not None))
                if total else None),
      "pixel_accuracy": float(true_positive.sum() / total) if total else None,
      "pixels": int(total),
  }


def row_normalised(confusion: np.ndarray) -> list:
  confusion = np.asarray(confusion, np.float64)
  rows = confusion.sum(1, keepdims=True)
  return np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0).tolist()


def calibration(right_levels: np.ndarray, wrong_levels: np.ndarray,
                bins: int = ECE_BINS) -> dict:
  """Expected calibration error over `bins` equal-width bins of confidence (a pixel of
  confidence c falls in bin floor(c x bins), the last bin closed, as torchmetrics bins),
  with each bin's count, mean confidence and accuracy for the reliability diagram."""
  right_levels = np.asarray(right_levels, np.float64)
  wrong_levels = np.asarray(wrong_levels, np.float64)
  values = np.arange(CONFIDENCE_LEVELS) / (CONFIDENCE_LEVELS - 1)
  bin_of = np.minimum((values * bins).astype(np.int64), bins - 1)
  counts = np.bincount(bin_of, right_levels + wrong_levels, bins)
  rights = np.bincount(bin_of, right_levels, bins)
  confidence_sums = np.bincount(bin_of, values * (right_levels + wrong_levels), bins)
  total = counts.sum()
  accuracy = np.divide(rights, counts, out=np.zeros(bins), where=counts > 0)
  mean_confidence = np.divide(confidence_sums, counts, out=np.zeros(bins), where=counts > 0)
  ece = float((counts / total * np.abs(accuracy - mean_confidence)).sum()) if total else None
  return {"ece": ece, "bins": bins,
          "bin_lower": [i / bins for i in range(bins)],
          "bin_pixels": [int(c) for c in counts],
          "bin_confidence": [float(v) if c else None for v, c in zip(mean_confidence, counts)],
          "bin_accuracy": [float(v) if c else None for v, c in zip(accuracy, counts)]}


def auroc(right_levels: np.ndarray, wrong_levels: np.ndarray) -> Optional[float]:
  """Probability that a right pixel has higher confidence than a wrong one (ties count
  one half): the area under the ROC curve of confidence telling right from wrong."""
  right = np.asarray(right_levels, np.float64)
  wrong = np.asarray(wrong_levels, np.float64)
  if not right.sum() or not wrong.sum():
    return None
  wrong_below = np.concatenate([[0.0], np.cumsum(wrong)[:-1]])
  return float((right * (wrong_below + 0.5 * wrong)).sum() / (right.sum() * wrong.sum()))


def review_bin(score: float) -> int:
  return min(int(score * REVIEW_BINS), REVIEW_BINS - 1) if score > 0 else 0


def review_curve(images: np.ndarray, wrong: np.ndarray, ascending: bool = True,
                 points: int = 100) -> dict:
  """'Review the k% of images ranked first -> share of all wrong pixels caught', from
  per-bin image counts and wrong pixels of a per-image score (ascending: lowest score
  first). Images sharing a bin (scores within 1/65536) are taken pro rata."""
  images = np.asarray(images, np.float64)
  wrong = np.asarray(wrong, np.float64)
  if not ascending:
    images, wrong = images[::-1], wrong[::-1]
  total_images, total_wrong = images.sum(), wrong.sum()
  if not total_images or not total_wrong:
    return {"percent": [], "caught": [], "at": {}}
  cumulative_images = np.concatenate([[0.0], np.cumsum(images)])
  cumulative_wrong = np.concatenate([[0.0], np.cumsum(wrong)])

  def caught(percent: float) -> float:
    reviewed = math.ceil(percent / 100 * total_images - 1e-9)
    return float(np.interp(reviewed, cumulative_images, cumulative_wrong) / total_wrong)
  percents = list(range(0, points + 1))
  return {"percent": percents, "caught": [caught(p) for p in percents],
          "at": {str(p): caught(p) for p in REVIEW_AT}}


@dataclasses.dataclass
class Totals:
  """The sums of a whole evaluation (add with `add`)."""
  num_classes: int
  confusion: np.ndarray = None
  right_levels: np.ndarray = None
  wrong_levels: np.ndarray = None
  by_mean_confidence: np.ndarray = None      # (2, REVIEW_BINS): images, wrong pixels
  by_low_confidence: np.ndarray = None
  images: int = 0
  images_with_confidence_map: int = 0
  images_without_qa: int = 0

  def __post_init__(self):
    k = self.num_classes
    for name, shape in (("confusion", (k, k)), ("right_levels", (CONFIDENCE_LEVELS,)),
                        ("wrong_levels", (CONFIDENCE_LEVELS,)),
                        ("by_mean_confidence", (2, REVIEW_BINS)),
                        ("by_low_confidence", (2, REVIEW_BINS))):
      if getattr(self, name) is None:
        setattr(self, name, np.zeros(shape, np.int64))

  def add_image(self, sums: ImageSums, mean_confidence: Optional[float],
                low_confidence_fraction: Optional[float]) -> None:
    self.images += 1
    self.confusion += sums.confusion
    if sums.right_levels is not None:
      self.images_with_confidence_map += 1
      self.right_levels += sums.right_levels
      self.wrong_levels += sums.wrong_levels
    if mean_confidence is None or low_confidence_fraction is None:
      self.images_without_qa += 1
      return
    for table, score in ((self.by_mean_confidence, mean_confidence),
                         (self.by_low_confidence, low_confidence_fraction)):
      index = review_bin(score)
      table[0, index] += 1
      table[1, index] += sums.wrong

  def add(self, other: "Totals") -> "Totals":
    for name in ("confusion", "right_levels", "wrong_levels", "by_mean_confidence",
                 "by_low_confidence"):
      setattr(self, name, getattr(self, name) + getattr(other, name))
    self.images += other.images
    self.images_with_confidence_map += other.images_with_confidence_map
    self.images_without_qa += other.images_without_qa
    return self


def per_image_scores(sums: ImageSums) -> dict:
  """One image's pixel accuracy, its mIoU over the classes present (in its truth or its
  prediction) and its per-class IoU (None for a class absent from both)."""
  scores = class_scores(sums.confusion)
  return {"pixel_accuracy": scores["pixel_accuracy"], "miou": scores["miou"],
          "class_iou": scores["iou"], "pixels": scores["pixels"], "wrong_pixels": sums.wrong}


def report_figures(totals: Totals, class_names) -> dict:
  """The report's numbers from the totals (JSON-ready)."""
  scores = class_scores(totals.confusion)
  report = {
      "classes": list(class_names),
      "images_evaluated": totals.images,
      **{key: scores[key] for key in ("pixels", "pixel_accuracy", "miou", "fwiou")},
      "per_class": {name: {key: scores[key][i] for key in
                           ("iou", "precision", "recall", "f1", "support", "predicted")}
                    for i, name in enumerate(class_names)},
      "confusion": totals.confusion.tolist(),
      "confusion_row_normalised": row_normalised(totals.confusion),
  }
  if totals.images_with_confidence_map:
    report["calibration"] = {
        **calibration(totals.right_levels, totals.wrong_levels),
        "auroc_right_vs_wrong": auroc(totals.right_levels, totals.wrong_levels),
        "images": totals.images_with_confidence_map}
  else:
    report["calibration"] = None
  with_qa = totals.images - totals.images_without_qa
  report["review"] = None if not with_qa else {
      "images": with_qa,
      "wrong_pixels": int(totals.by_mean_confidence[1].sum()),
      "by_mean_confidence": review_curve(*totals.by_mean_confidence, ascending=True),
      "by_low_confidence_fraction": review_curve(*totals.by_low_confidence,
                                                 ascending=False)}
  return report
