"""Evaluation numerics against others' code (scikit-learn) and independent computations
on the raw pixels."""
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, jaccard_score, precision_recall_fscore_support
from sklearn.metrics import roc_auc_score

from transforms.evaluation import metrics
from transforms.evaluation.truth import TruthError, taxonomy

NAMES = ("road", "building", "tree", "car")


def _pixels(seed=0, size=(64, 80)):
  rng = np.random.default_rng(seed)
  truth = rng.integers(0, 4, size).astype(np.uint8)
  predicted = np.where(rng.random(size) < 0.7, truth, rng.integers(0, 4, size)).astype(np.uint8)
  truth[:3] = 255                          # unlabelled
  predicted[:, :2] = 255                   # nodata
  confidence = np.clip(np.where(predicted == truth, rng.normal(200, 30, size),
                                rng.normal(150, 40, size)), 0, 255).astype(np.uint8)
  return predicted, truth, confidence


def test_confusion_and_class_scores_equal_scikit_learn():
  predicted, truth, confidence = _pixels()
  tax = taxonomy(NAMES, NAMES)
  sums = metrics.image_sums(predicted, truth, tax, confidence)
  counted = (predicted != 255) & (truth != 255)
  y_true, y_pred = truth[counted], predicted[counted]
  np.testing.assert_array_equal(sums.confusion, confusion_matrix(y_true, y_pred,
                                                                 labels=range(4)))
  scores = metrics.class_scores(sums.confusion)
  np.testing.assert_allclose(scores["iou"], jaccard_score(y_true, y_pred, labels=range(4),
                                                          average=None), rtol=1e-12)
  precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred,
                                                                   labels=range(4))
  np.testing.assert_allclose(scores["precision"], precision, rtol=1e-12)
  np.testing.assert_allclose(scores["recall"], recall, rtol=1e-12)
  np.testing.assert_allclose(scores["f1"], f1, rtol=1e-12)
  assert scores["support"] == support.tolist()
  assert scores["pixel_accuracy"] == pytest.approx((y_true == y_pred).mean())
  frequency = support / support.sum()
  assert scores["fwiou"] == pytest.approx((frequency * np.asarray(scores["iou"])).sum())


def test_an_absent_class_has_no_iou_and_a_class_only_predicted_scores_zero():
  confusion = np.array([[5, 1, 0], [0, 0, 0], [0, 0, 0]])
  scores = metrics.class_scores(confusion)
  assert scores["iou"] == [5 / 6, 0.0, None]
  assert scores["miou"] == pytest.approx((5 / 6 + 0) / 2)


def test_calibration_and_auroc_from_level_histograms_equal_the_pixels():
  predicted, truth, confidence = _pixels(1)
  tax = taxonomy(NAMES, NAMES)
  sums = metrics.image_sums(predicted, truth, tax, confidence)
  counted = (predicted != 255) & (truth != 255)
  right = (predicted == truth)[counted]
  conf = confidence[counted] / 255.0
  auroc = metrics.auroc(sums.right_levels, sums.wrong_levels)
  assert auroc == pytest.approx(roc_auc_score(right, conf), abs=1e-12)
  # ECE computed directly over the pixels, 15 equal bins, the last one closed.
  bins = np.minimum((conf * 15).astype(int), 14)
  ece = sum(abs(right[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
            for b in range(15) if (bins == b).any())
  calibration = metrics.calibration(sums.right_levels, sums.wrong_levels)
  assert calibration["ece"] == pytest.approx(ece, abs=1e-12)
  assert sum(calibration["bin_pixels"]) == counted.sum()
  perfectly = metrics.calibration(np.r_[np.zeros(255), [10]], np.zeros(256))
  assert perfectly["ece"] == 0.0


def test_review_curve_equals_sorting_the_images():
  rng = np.random.default_rng(3)
  scores = rng.random(200)
  wrong = rng.integers(0, 1000, 200) * (scores < 0.5)     # the unsure ones are wrong
  totals = metrics.Totals(2)
  for score, w in zip(scores, wrong):
    sums = metrics.ImageSums(np.array([[1000 - w, w], [0, 0]]), None, None)
    totals.add_image(sums, float(score), float(1 - score))
  for table, ascending in ((totals.by_mean_confidence, True),
                           (totals.by_low_confidence, False)):
    curve = metrics.review_curve(*table, ascending=ascending)
    order = np.argsort(scores)     # both rank the lowest mean confidence first
    for percent in (5, 10, 20, 50):
      reviewed = int(np.ceil(percent / 100 * 200))
      expected = wrong[order[:reviewed]].sum() / wrong.sum()
      assert curve["at"].get(str(percent), curve["caught"][percent]) == pytest.approx(expected)
  assert curve["caught"][0] == 0 and curve["caught"][100] == pytest.approx(1)


def test_totals_add_up_across_images_in_any_split():
  tax = taxonomy(NAMES, NAMES)
  images = [_pixels(seed) for seed in range(4)]
  whole, left, right = metrics.Totals(4), metrics.Totals(4), metrics.Totals(4)
  for i, (predicted, truth, confidence) in enumerate(images):
    sums = metrics.image_sums(predicted, truth, tax, confidence)
    whole.add_image(sums, 0.1 * i, 0.5)
    (left if i % 2 else right).add_image(sums, 0.1 * i, 0.5)
  merged = left.add(right)
  assert metrics.report_figures(merged, NAMES) == metrics.report_figures(whole, NAMES)


def test_class_map_merges_ignores_and_refuses_unknown_names():
  tax = taxonomy(("road", "building", "tree", "grass"), ("street", "house", "veg", "unsure"),
                 {"truth": {"street": "road", "house": "building", "veg": "green",
                            "unsure": None},
                  "model": {"tree": "green", "grass": "green"}})
  assert tax.class_names == ("road", "building", "green")
  assert tax.model_to_eval == (0, 1, 2, 2) and tax.truth_to_eval == (0, 1, 2, -1)
  predicted = np.array([[2, 3, 0, 1]], np.uint8)
  truth = np.array([[2, 2, 3, 0]], np.uint8)
  sums = metrics.image_sums(predicted, truth, tax)
  assert sums.confusion.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 2]]   # 'unsure' not counted
  with pytest.raises(TruthError, match="'roofs' is not one of the truth's classes"):
    taxonomy(("road",), ("road",), {"truth": {"roofs": "road"}, "model": {}})
  with pytest.raises(TruthError, match="not a model class"):
    taxonomy(("road",), ("road", "pool"))
  with pytest.raises(TruthError, match="'lake' is not one of the model's"):
    taxonomy(("road",), ("road",), {"truth": {}, "model": {"lake": "water"}})
