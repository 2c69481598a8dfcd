"""Ranks models for your imagery before you commit to one: for each, LogME on sampled
get_features pixels, and the held-out mIoU of a logistic head fitted the same way.

    hrnet-beam rank-models --models isprs,city,ade20k --images 'scenes/*.png' \\
        --truth 'scenes/*.labels.png' --truth_suffix .labels --truth_labels L --report DIR

The protocol of google-research stable_transfer (the suite was released as a benchmark
of transferability metrics): the first 150 labeled images (by name), labels nearest-
downsampled to the feature grid, ignored and nodata pixels dropped, --pixels_per_image
(1000) pixels per image class-balanced. LogME follows You et al. (ICML 2021). Prints a
ranked table; DIR/ranking.json names each model with its scores.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from pipeline.cli.fit_head import run_head_command, truth_labels
from transforms.evaluation import metrics
from transforms.heads.dataset import LabeledDataError, labeled_images, sample_features, split
from transforms.heads.logme import logme
from transforms.heads.train import LOGISTIC, fit_head

FIRST_IMAGES = 150


def score_model(model_name: str, args, labels) -> dict:
  from transforms.heads.features import FeatureModel  # pylint: disable=import-outside-toplevel
  started = time.monotonic()
  model = FeatureModel(model_name)
  names = labels.class_names
  pairs, notes = labeled_images(args.images, args.truth, args.truth_format, names,
                                args.truth_suffix)
  training, held_out = split(pairs[:FIRST_IMAGES], args.holdout, args.seed)
  sample = sample_features(model, training, len(names), args.ignore_value,
                           args.pixels_per_image, args.seed)
  validation = sample_features(model, held_out, len(names), args.ignore_value,
                               args.pixels_per_image, args.seed + 1)
  head = fit_head(sample.features, sample.labels, len(names),
                  (validation.features, validation.labels), LOGISTIC, args.seed)
  confusion = np.zeros((len(names), len(names)), np.int64)
  np.add.at(confusion, (validation.labels, head.logits(validation.features).argmax(1)), 1)
  return {"model": model_name, "handle": model.handle,
          "logme": logme(sample.features, sample.labels),
          "held_out_head_miou": metrics.class_scores(confusion)["miou"],
          "feature_dim": int(sample.features.shape[1]), "sample_pixels": int(len(sample.labels)),
          "training_images": len(training), "held_out_images": len(held_out),
          "seconds": round(time.monotonic() - started, 1), "notes": notes + sample.notes}


def rank(args) -> dict:
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  if len(models) < 2:
    raise LabeledDataError("--models: name at least two models to rank, comma-separated")
  labels = truth_labels(args, None)
  if labels is None:
    raise LabeledDataError("give --truth_labels (or a --truth_format file): the classes "
                           "to rank the models on")
  scores = [score_model(m, args, labels) for m in models]
  ranked = sorted(scores, key=lambda s: -s["logme"])
  by_head = sorted(scores, key=lambda s: -(s["held_out_head_miou"] or 0))
  report = {"ranked_by_logme": ranked, "classes": list(labels.class_names),
            "orders_agree": [s["model"] for s in ranked] == [s["model"] for s in by_head],
            "protocol": {"first_images": FIRST_IMAGES, "pixels_per_image": args.pixels_per_image,
                         "holdout": args.holdout, "seed": args.seed,
                         "logme": "You et al., ICML 2021: mean over classes of the log "
                                  "maximum evidence per sample"}}
  os.makedirs(args.report, exist_ok=True)
  with open(os.path.join(args.report, "ranking.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  return report


def table(report: dict) -> str:
  lines = [f"{'rank':<5} {'model':<40} {'LogME':>8} {'head mIoU':>10} {'dim':>5} {'s':>6}"]
  for i, s in enumerate(report["ranked_by_logme"], 1):
    miou = s["held_out_head_miou"]
    lines.append(f"{i:<5} {s['model'][-40:]:<40} {s['logme']:>8.3f} "
                 f"{'-' if miou is None else f'{miou:.3f}':>10} {s['feature_dim']:>5} "
                 f"{s['seconds']:>6.1f}")
  lines.append("LogME and the fitted heads' mIoU rank the models " +
               ("the same way" if report["orders_agree"] else "differently"))
  return "\n".join(lines)


def _flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--models", required=True,
                      help="Comma-separated models: SavedModel directories, TF Hub handles "
                           "or the suite's short names (isprs, city, ade20k, ...).")
  parser.add_argument("--report", required=True, help="Directory for ranking.json.")


def main(argv=None, prog: str | None = None) -> int:
  return run_head_command(argv, prog or "hrnet-beam rank-models", __doc__, _flags, rank,
                          lambda args, report: f"{table(report)}\nreport: "
                                               f"{os.path.join(args.report, 'ranking.json')}")
