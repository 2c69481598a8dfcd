"""Trains a new head for your classes on a model's frozen features, from your labels, and
saves it with the model as a new model directory.

    hrnet-beam fit-head --model M --images 'scenes/*.png' --truth 'scenes/*.labels.png' \\
        --truth_suffix .labels --truth_labels my_labels.json --to models/mine

Samples get_features pixels class-balanced (labels nearest-downsampled to the 1/4 feature
grid; ignored and nodata pixels dropped), standardises them, trains a multinomial logistic
regression (or --head mlp: one hidden layer) with early stopping on held-out images, and
writes DIR: a SavedModel that run, optimize, evaluate, export, index and serve take,
labels.json (your classes, and how the head was made) and fit_report.json (held-out
per-class IoU beside the base model's own head, a learning curve, where the time went).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from transforms.evaluation import metrics
from transforms.evaluation.truth import FORMATS, TruthError, taxonomy, tool_classes
from transforms.heads.dataset import (LabeledDataError, check_classes, labeled_images,
                                      load_pair, sample_features, split)
from transforms.heads.train import HEADS, LOGISTIC, fit_head
from transforms.inference.sources import ModelLoadError
from transforms.labels import LabelSet, generic_labels, read_labels

LEARNING_CURVE = (0.25, 0.5, 1.0)
EXIT_OK, EXIT_INPUT = 0, 2


def add_data_flags(parser: argparse.ArgumentParser) -> None:
  """The flags fit-head and rank-models share: images, truth as `evaluate` reads it,
  the sample and the split."""
  parser.add_argument("--images", required=True, action="append",
                      help="Pattern of the labeled source images (local or gs://; "
                           "repeatable).")
  parser.add_argument("--truth", required=True, action="append",
                      help="Truth masks (pattern; PNG or GeoTIFF of class ids), or with "
                           "--truth_format one labeling tool's file: as for evaluate.")
  parser.add_argument("--truth_format", choices=FORMATS, default=None)
  parser.add_argument("--truth_suffix", default="",
                      help="Stripped from truth stems before matching images by stem.")
  parser.add_argument("--truth_labels", default=None,
                      help="Labels JSON of the truth's classes (names and colours): the "
                           "new head's classes. Default: the tool file's classes, or the "
                           "model's for masks.")
  parser.add_argument("--ignore_value", type=int, default=255,
                      help="Truth mask value of unlabelled pixels.")
  parser.add_argument("--pixels_per_image", type=int, default=1000,
                      help="Feature-grid pixels sampled per image, class-balanced.")
  parser.add_argument("--holdout", type=float, default=0.2,
                      help="Share of the labeled images held out for validation.")
  parser.add_argument("--seed", type=int, default=0)


def truth_labels(args, base_labels):
  """The truth's LabelSet: --truth_labels, the tool file's classes, or the model's."""
  if args.truth_labels:
    return read_labels(args.truth_labels)
  if args.truth_format:
    names = tool_classes(args.truth_format, args.truth[0])
    palette = generic_labels(max(1, len(names))).palette[:len(names)]
    return LabelSet(f"{args.truth_format} classes", names, palette)
  return base_labels


def _scores(predicted_and_truth: list, tax) -> dict:
  totals = metrics.Totals(tax.num_classes)
  for predicted, truth in predicted_and_truth:
    totals.add_image(metrics.image_sums(predicted, truth, tax), None, None)
  return metrics.class_scores(totals.confusion)


def learning_curve(base, held_out: list, heads: list, names: tuple, ignore_value: int) -> list:
  """Each head's held-out mIoU over every labelled cell of the held-out images' feature
  grids (the grid the heads were trained at)."""
  from transforms.heads.sampling import FEATURE_STRIDE, grid_labels  # pylint: disable=import-outside-toplevel
  k = len(names)
  confusions = [np.zeros((k, k), np.int64) for _ in heads]
  for pair in held_out:
    try:
      pixels, truth = load_pair(pair, k, ignore_value)
    except LabeledDataError:
      continue
    grid = (-(-truth.shape[0] // FEATURE_STRIDE), -(-truth.shape[1] // FEATURE_STRIDE))
    cell_labels = grid_labels(truth, grid).ravel()
    cells = np.flatnonzero(cell_labels < k)
    features = base.gather(pixels, cells, grid[1])
    for confusion, (_, _, head) in zip(confusions, heads):
      np.add.at(confusion, (cell_labels[cells], head.logits(features).argmax(1)), 1)
  return [{"fraction": fraction, "images": images, "steps": head.steps,
           "held_out_grid_miou": metrics.class_scores(confusion)["miou"]}
          for confusion, (fraction, images, head) in zip(confusions, heads)]


def fit(args) -> dict:
  from transforms.heads.export import save_head_model  # pylint: disable=import-outside-toplevel
  from transforms.heads.features import FeatureModel  # pylint: disable=import-outside-toplevel
  timings, started = {}, time.monotonic()
  base = FeatureModel(args.model)
  timings["load_model_s"] = time.monotonic() - started
  labels = truth_labels(args, base.labels)
  if labels is None:
    raise LabeledDataError("the model ships no labels: give --truth_labels")
  names = labels.class_names
  pairs, notes = labeled_images(args.images, args.truth, args.truth_format, names,
                                args.truth_suffix)
  training, held_out = split(pairs, args.holdout, args.seed)
  step = time.monotonic()
  sample = sample_features(base, training, len(names), args.ignore_value,
                           args.pixels_per_image, args.seed)
  validation = sample_features(base, held_out, len(names), args.ignore_value,
                               args.pixels_per_image, args.seed + 1)
  timings["sample_features_s"] = time.monotonic() - step
  notes += sample.notes + validation.notes
  check_classes(sample, names, minimum=20)
  step = time.monotonic()
  order = np.random.default_rng(args.seed).permutation(len(training))
  heads = []
  for fraction in LEARNING_CURVE:
    images = max(1, int(round(fraction * len(training))))
    chosen = np.isin(sample.image_index, order[:images])
    heads.append((fraction, images, fit_head(
        sample.features[chosen], sample.labels[chosen], len(names),
        (validation.features, validation.labels), args.head, args.seed,
        class_counts=sample.class_cells)))
  head = heads[-1][2]
  timings["train_s"] = time.monotonic() - step
  described = {
      "base_model": base.handle, "head": args.head, "seed": args.seed,
      "pixels_per_image": args.pixels_per_image, "sample_pixels": int(len(sample.labels)),
      "sample_pixels_per_class": {n: int(c) for n, c in zip(
          names, np.bincount(sample.labels, minlength=len(names)))},
      "training_images": [p.image for p in training],
      "held_out_images": [p.image for p in held_out], "steps": head.steps,
      "feature_dim": int(sample.features.shape[1])}
  label_json = labels.to_json()
  label_json["name"] = f"{labels.name} head on {base.handle.rstrip('/').rsplit('/', 1)[-1]}"
  label_json["channel_mapping"] = base.channel_mapping
  label_json["note"] = (f"a {args.head} head fitted by hrnet-beam fit-head on the frozen "
                        f"features of {base.handle} ({len(training)} training images, "
                        f"{len(sample.labels)} sampled pixels, seed {args.seed})")
  label_json["head"] = described
  step = time.monotonic()
  save_head_model(base.module, head, args.to, label_json)
  timings["save_model_s"] = time.monotonic() - step
  step = time.monotonic()
  fitted = FeatureModel(args.to)
  new_pairs, base_pairs = [], []
  for pair in held_out:
    try:
      pixels, truth = load_pair(pair, len(names), args.ignore_value)
    except LabeledDataError:
      continue
    new_pairs.append((fitted.class_ids(pixels), truth))
    base_pairs.append((base.class_ids(pixels), truth))
  new_scores = _scores(new_pairs, taxonomy(names, names))
  base_names = base.class_names(int(base.module.predict(
      np.zeros((1, 32, 32, 3), np.float32)).shape[-1]))
  related = {n: None for n in names if n not in base_names}
  base_scores = _scores(base_pairs, taxonomy(base_names, names, {"truth": related,
                                                                  "model": {}}))
  curve = learning_curve(base, held_out, heads, names, args.ignore_value)
  timings["evaluate_held_out_s"] = time.monotonic() - step
  timings["total_s"] = time.monotonic() - started
  per_class = {}
  for i, name in enumerate(names):
    per_class[name] = {"new_head_iou": new_scores["iou"][i],
                       "base_head_iou": (base_scores["iou"][base_names.index(name)]
                                         if name in base_names else None),
                       "support": new_scores["support"][i]}
  shared = [n for n in names if n in base_names and per_class[n]["base_head_iou"] is not None
            and per_class[n]["new_head_iou"] is not None]
  report = {
      "model": args.to, **described, "classes": list(names),
      "held_out": {"images": len(new_pairs), "new_head_miou": new_scores["miou"],
                   "new_head_pixel_accuracy": new_scores["pixel_accuracy"],
                   "per_class": per_class,
                   "shared_classes": shared,
                   "new_head_miou_on_shared": (float(np.mean([per_class[n]["new_head_iou"]
                                                              for n in shared]))
                                               if shared else None),
                   "base_head_miou_on_shared": (float(np.mean([per_class[n]["base_head_iou"]
                                                               for n in shared]))
                                                if shared else None)},
      "learning_curve": curve, "timings": {k: round(v, 2) for k, v in timings.items()},
      "notes": notes}
  with open(f"{args.to}/fit_report.json", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  return report


def _f(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def table(report: dict) -> str:
  held = report["held_out"]
  lines = [f"{'class':<22} {'new head IoU':>12} {'base head IoU':>13} {'support':>9}"]
  for name, row in held["per_class"].items():
    lines.append(f"{name:<22} {_f(row['new_head_iou']):>12} {_f(row['base_head_iou']):>13} "
                 f"{row['support']:>9}")
  lines.append(f"held out: {held['images']} images, new head mIoU {_f(held['new_head_miou'])}"
               f"; on the classes both heads know: new {_f(held['new_head_miou_on_shared'])}, "
               f"base {_f(held['base_head_miou_on_shared'])}")
  lines.append("learning curve (held-out mIoU on the feature grid): " + ", ".join(
      f"{c['images']} images {_f(c['held_out_grid_miou'])}" for c in report["learning_curve"]))
  lines.append("time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in report["timings"].items()))
  for note in report["notes"][:10]:
    lines.append(f"note: {note}")
  return "\n".join(lines)


HEAD_COMMAND_ERRORS = (LabeledDataError, TruthError, ModelLoadError, OSError, ValueError)


def run_head_command(argv, prog: str, doc: str, add_flags, work, describe) -> int:
  """fit-head's and rank-models' shared shell: flags (theirs, then the data flags),
  the work, its table; a bad input is one line on stderr and exit status 2."""
  lines = doc.splitlines()
  parser = argparse.ArgumentParser(prog=prog, description=lines[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(lines[1:]))
  add_flags(parser)
  add_data_flags(parser)
  args = parser.parse_args(argv)
  try:
    report = work(args)
  except HEAD_COMMAND_ERRORS as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return EXIT_INPUT
  print(describe(args, report))
  return EXIT_OK


def _flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", required=True,
                      help="The base model: a SavedModel (local or gs://), a TF Hub handle "
                           "or a suite short name (isprs, city, ade20k...).")
  parser.add_argument("--head", choices=HEADS, default=LOGISTIC)
  parser.add_argument("--to", required=True, help="The new model directory (local).")


def main(argv=None, prog: str | None = None) -> int:
  return run_head_command(argv, prog or "hrnet-beam fit-head", __doc__, _flags, fit,
                          lambda args, report: f"{table(report)}\nmodel: {args.to} "
                                               "(fit_report.json, labels.json)")
