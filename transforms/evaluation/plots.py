"""The report's plots as PNG bytes (matplotlib, no display): the row-normalised confusion
matrix, per-class IoU, the reliability diagram and the review curve."""
from __future__ import annotations

import io

import numpy as np


def _figure(width: float = 6.0, height: float = 4.5):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  return pyplot, pyplot.figure(figsize=(width, height), dpi=100)


def _png(pyplot, figure) -> bytes:
  buffer = io.BytesIO()
  figure.tight_layout()
  figure.savefig(buffer, format="png")
  pyplot.close(figure)
  return buffer.getvalue()


def confusion_png(report: dict) -> bytes:
  names = report["classes"]
  matrix = np.asarray(report["confusion_row_normalised"])
  pyplot, figure = _figure(1.5 + 0.7 * len(names), 1.2 + 0.6 * len(names))
  axes = figure.add_subplot()
  axes.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
  for (i, j), value in np.ndenumerate(matrix):
    if value >= 0.005:
      axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if value > 0.5 else "black")
  axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
  axes.set_yticks(range(len(names)), names)
  axes.set_xlabel("predicted")
  axes.set_ylabel("truth")
  axes.set_title("confusion (each truth row sums to 1)")
  return _png(pyplot, figure)


def class_iou_png(report: dict) -> bytes:
  names = report["classes"]
  values = [report["per_class"][n]["iou"] for n in names]
  pyplot, figure = _figure()
  axes = figure.add_subplot()
  axes.bar(range(len(names)), [v or 0 for v in values], color="#4c72b0")
  axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
  axes.set_ylim(0, 1)
  axes.set_ylabel("IoU")
  axes.set_title(f"per-class IoU (mIoU {report['miou']:.3f})")
  return _png(pyplot, figure)


def reliability_png(report: dict) -> bytes:
  calibration = report["calibration"]
  bins = calibration["bins"]
  centres = [(i + 0.5) / bins for i in range(bins)]
  accuracy = [a if a is not None else 0 for a in calibration["bin_accuracy"]]
  pyplot, figure = _figure(5, 5)
  axes = figure.add_subplot()
  axes.bar(centres, accuracy, width=1 / bins, edgecolor="black", color="#4c72b0",
           label="accuracy in the bin")
  confidence = [(c, v) for c, v in zip(centres, calibration["bin_confidence"])
                if v is not None]
  axes.plot([c for c, _ in confidence], [v for _, v in confidence], "o", color="#dd8452",
            label="mean confidence in the bin")
  axes.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
  axes.set_xlim(0, 1)
  axes.set_ylim(0, 1)
  axes.set_xlabel("confidence (max probability)")
  axes.set_ylabel("share of pixels right")
  axes.set_title(f"reliability: ECE {calibration['ece']:.3f} ({bins} bins)")
  axes.legend(loc="upper left", fontsize=8)
  return _png(pyplot, figure)


def review_png(report: dict) -> bytes:
  review = report["review"]
  pyplot, figure = _figure()
  axes = figure.add_subplot()
  for key, label in (("by_mean_confidence", "lowest mean_confidence first"),
                     ("by_low_confidence_fraction", "highest low_confidence_fraction first")):
    curve = review[key]
    axes.plot(curve["percent"], [100 * c for c in curve["caught"]], label=label)
  axes.plot([0, 100], [0, 100], "--", color="grey", label="images in random order")
  for percent in (5, 10, 20):
    axes.axvline(percent, color="#cccccc", linewidth=0.8)
  axes.set_xlim(0, 100)
  axes.set_ylim(0, 100)
  axes.set_xlabel("% of images reviewed")
  axes.set_ylabel("% of all wrong pixels caught")
  axes.set_title("what reviewing the least confident images catches")
  axes.legend(loc="lower right", fontsize=8)
  return _png(pyplot, figure)
