"""Evaluating a job's rows against reviewed labels, as a Beam pipeline: rows and truth
meet on the source file's stem; each pair adds bounded sums (metrics.py) to one global
combine; each image's scores go to Parquet; whatever cannot be paired or read is a
problem record naming it. Memory does not grow with the number of images.

    results, problems = (rows, truth) | EvaluateSegmentations(taxonomy, ignore_value)
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.evaluation import metrics
from transforms.evaluation.metrics import Taxonomy, Totals
from transforms.evaluation.truth import (UNLABELLED, decode_mask_image,
                                         decode_tool_file, match_key, read_bytes)
from transforms.metrics import METRICS_NAMESPACE
from transforms.pngs import decode_png, encode_png
from transforms.types import NODATA_CLASS, TruthRef

__all__ = ["ReadTruth", "EvaluateSegmentations", "per_image_schema", "ROW_COLUMNS",
           "WORST_IMAGES"]

ROW_COLUMNS = ["image_id", "source", "height", "width", "mask_png", "confidence_png",
               "mean_confidence", "low_confidence_fraction", "block_y"]
WORST_IMAGES = 20
PROBLEMS = "problems"
# Problem kinds, each with what it means for the user.
NO_TRUTH, NO_ROW, AMBIGUOUS = "row_without_truth", "truth_without_row", "ambiguous_match"
UNDECODABLE, SIZE, UNKNOWN_IDS = "truth_does_not_decode", "size_mismatch", "unknown_class_ids"
NO_MASK, BLOCK, NOTHING = "row_without_mask", "block_row", "no_pixel_to_compare"


def _tool_refs(path: str, fmt: str, class_names: tuple, suffix: str):
  for item in decode_tool_file(fmt, path, class_names):
    key = match_key(item.image_id or item.name, suffix)
    yield key, TruthRef(f"{path}#{item.name}", item.image_id, None,
                        None if item.mask is None else encode_png(item.mask), item.error)


class ReadTruth(beam.PTransform):
  """Truth mask patterns, or one labeling tool's file -> PCollection[(key, TruthRef)].

      truth = p | ReadTruth(["truth/*.png"], suffix=".labels")
      truth = p | ReadTruth(["review/annotations.json"], fmt="coco", class_names=names)
  """

  def __init__(self, patterns: list, fmt: Optional[str] = None, class_names: tuple = (),
               suffix: str = ""):
    super().__init__()
    self._patterns, self._fmt, self._names, self._suffix = patterns, fmt, class_names, suffix

  def expand(self, pbegin):
    suffix = self._suffix
    if self._fmt is None:
      from apache_beam.io import fileio  # pylint: disable=import-outside-toplevel
      return (pbegin
              | "TruthPatterns" >> beam.Create(self._patterns)
              | "MatchTruth" >> fileio.MatchAll()
              | "KeyTruth" >> beam.Map(lambda m: (match_key(m.path, suffix),
                                                  TruthRef(m.path, path=m.path))))
    fmt, names = self._fmt, self._names
    return (pbegin
            | "ToolFile" >> beam.Create(self._patterns)
            | "DecodeToolFile" >> beam.FlatMap(_tool_refs, fmt, names, suffix)
            | "SpreadTruth" >> beam.Reshuffle())


def _problem(kind: str, reason: str, image_id: Optional[str] = None,
             truth: Optional[str] = None) -> dict:
  return {"kind": kind, "image_id": image_id, "truth": truth, "reason": reason}


def _pairs(rows: list, truths: list):
  """(rows, truths) of one key -> ([(row, truth)], [problem]): an exact image id in the
  truth pairs first; what remains pairs only one to one."""
  by_id, problems, pairs = {}, [], []
  for row in rows:
    by_id.setdefault(row["image_id"], row)        # a resumed job's duplicate rows
  loose = []
  for truth in truths:
    if truth.image_id is not None and truth.image_id in by_id:
      pairs.append((by_id.pop(truth.image_id), truth))
    else:
      loose.append(truth)
  left = list(by_id.values())
  if len(left) == 1 and len(loose) == 1:
    return pairs + [(left[0], loose[0])], problems
  if left and loose:
    reason = (f"{len(left)} rows and {len(loose)} truth files share this stem: rename, or "
              "give truth that carries the image id")
    problems += [_problem(AMBIGUOUS, reason, image_id=r["image_id"]) for r in left]
    problems += [_problem(AMBIGUOUS, reason, truth=t.origin) for t in loose]
  else:
    problems += [_problem(NO_TRUTH, "no truth has this stem", image_id=r["image_id"])
                 for r in left]
    problems += [_problem(NO_ROW, "no row has this stem (not in the job's output?)",
                          truth=t.origin) for t in loose]
  return pairs, problems


@dataclasses.dataclass(frozen=True)
class ImageResult:
  record: dict                 # the per-image Parquet row
  sums: metrics.ImageSums
  mean_confidence: Optional[float]
  low_confidence_fraction: Optional[float]


def evaluate_pair(row: dict, truth: TruthRef, taxonomy: Taxonomy, ignore_value: int):
  """One row against its truth -> ImageResult, or a problem dict."""
  image_id, origin = row["image_id"], truth.origin
  if row.get("block_y") is not None:
    return _problem(BLOCK, "a block of a raster too big to open whole: evaluate its own "
                    "truth per block is not supported", image_id, origin)
  if row.get("mask_png") is None:
    return _problem(NO_MASK, "the row has no mask: run the job with masks in --outputs",
                    image_id, origin)
  if truth.error:
    return _problem(UNDECODABLE, truth.error, image_id, origin)
  try:
    mask = (decode_mask_image(read_bytes(truth.path)) if truth.path is not None
            else decode_png(truth.mask_png))
  except Exception as e:  # pylint: disable=broad-except  # named, and the rest goes on
    return _problem(UNDECODABLE, f"does not decode: {e}", image_id, origin)
  if mask.shape != (row["height"], row["width"]):
    return _problem(SIZE, f"truth is {mask.shape[1]}x{mask.shape[0]}, the row's mask "
                    f"{row['width']}x{row['height']}", image_id, origin)
  ignore = ignore_value if truth.path is not None else UNLABELLED
  known = len(taxonomy.truth_names)
  outside = np.unique(mask[(mask >= known) & (mask != ignore)])
  if outside.size:
    return _problem(UNKNOWN_IDS, f"class ids {outside.tolist()[:10]} are outside the "
                    f"truth's {known} classes (ignore value {ignore})", image_id, origin)
  if ignore < known:
    mask = np.where(mask == ignore, UNLABELLED, mask).astype(np.uint8)
  predicted = decode_png(row["mask_png"])
  confidence = None if row.get("confidence_png") is None else decode_png(row["confidence_png"])
  sums = metrics.image_sums(predicted, mask, taxonomy, confidence)
  if not sums.pixels:
    return _problem(NOTHING, "no pixel is labelled in the truth and valid in the row",
                    image_id, origin)
  scores = metrics.per_image_scores(sums)
  record = {"image_id": image_id, "source": row["source"], "truth": origin,
            "pixels": scores["pixels"], "wrong_pixels": scores["wrong_pixels"],
            "pixel_accuracy": scores["pixel_accuracy"], "miou": scores["miou"],
            "class_iou": dict(zip(taxonomy.class_names, scores["class_iou"])),
            "mean_confidence": row.get("mean_confidence"),
            "low_confidence_fraction": row.get("low_confidence_fraction"),
            "nodata_pixels": int((predicted == NODATA_CLASS).sum())}
  return ImageResult(record, sums, row.get("mean_confidence"),
                     row.get("low_confidence_fraction"))


class _EvaluateFn(beam.DoFn):

  def __init__(self, taxonomy: Taxonomy, ignore_value: int):
    self._taxonomy, self._ignore = taxonomy, ignore_value
    self._evaluated = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "images_evaluated")
    self._problems = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "evaluation_problems")

  def process(self, element):
    _, grouped = element
    pairs, problems = _pairs(list(grouped["rows"]), list(grouped["truth"]))
    for row, truth in pairs:
      outcome = evaluate_pair(row, truth, self._taxonomy, self._ignore)
      if isinstance(outcome, ImageResult):
        self._evaluated.inc()
        yield outcome
      else:
        problems.append(outcome)
    for problem in problems:
      self._problems.inc()
      yield beam.pvalue.TaggedOutput(PROBLEMS, problem)


class _TotalsFn(beam.CombineFn):
  """ImageResults -> (Totals, the WORST_IMAGES lowest-mIoU images)."""

  def __init__(self, num_classes: int):
    super().__init__()
    self._k = num_classes

  def create_accumulator(self):
    return Totals(self._k), []

  def add_input(self, accumulator, result: ImageResult):
    totals, worst = accumulator
    totals.add_image(result.sums, result.mean_confidence, result.low_confidence_fraction)
    worst.append((result.record["miou"], result.record["image_id"],
                  result.record["pixel_accuracy"]))
    worst.sort()
    del worst[WORST_IMAGES:]
    return accumulator

  def merge_accumulators(self, accumulators):
    accumulators = iter(accumulators)
    totals, worst = next(accumulators)
    for other, other_worst in accumulators:
      totals.add(other)
      worst = sorted(worst + other_worst)[:WORST_IMAGES]
    return totals, worst

  def extract_output(self, accumulator):
    totals, worst = accumulator
    return totals_json(totals, worst)


def totals_json(totals: Totals, worst: list) -> str:
  data = {f.name: getattr(totals, f.name) for f in dataclasses.fields(totals)}
  data = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in data.items()}
  data["worst"] = [{"image_id": i, "miou": m, "pixel_accuracy": a} for m, i, a in worst]
  return json.dumps(data)


def totals_from_json(text: str) -> tuple:
  data = json.loads(text)
  worst = data.pop("worst")
  arrays = {k: np.asarray(v, np.int64) if isinstance(v, list) else v for k, v in data.items()}
  return Totals(**arrays), worst


def per_image_schema(class_names) -> pa.Schema:
  return pa.schema([
      pa.field("image_id", pa.string(), nullable=False),
      pa.field("source", pa.string(), nullable=False),
      pa.field("truth", pa.string(), nullable=False),
      pa.field("pixels", pa.int64(), nullable=False),
      pa.field("wrong_pixels", pa.int64(), nullable=False),
      pa.field("pixel_accuracy", pa.float64()),
      pa.field("miou", pa.float64()),
      pa.field("class_iou", pa.struct([pa.field(n, pa.float64()) for n in class_names])),
      pa.field("mean_confidence", pa.float32()),
      pa.field("low_confidence_fraction", pa.float32()),
      pa.field("nodata_pixels", pa.int64(), nullable=False),
  ], metadata={"hrnet_beam.per_image_note":
               "one row per evaluated image; pixels: those labelled in the truth and "
               "valid in the row; miou over the classes present in its truth or its "
               "prediction; class_iou null for a class absent from both"})


class EvaluateSegmentations(beam.PTransform):
  """(rows keyed by stem, truth keyed by stem) -> (totals JSON (one element),
  per-image records, problem dicts).

      totals, per_image, problems = (rows, truth) | EvaluateSegmentations(taxonomy, 255)
  """

  def __init__(self, taxonomy: Taxonomy, ignore_value: int):
    super().__init__()
    self._taxonomy, self._ignore = taxonomy, ignore_value

  def expand(self, inputs):
    rows, truth = inputs
    results = (
        {"rows": rows, "truth": truth}
        | "JoinOnStem" >> beam.CoGroupByKey()
        | "Compare" >> beam.ParDo(_EvaluateFn(self._taxonomy, self._ignore))
        .with_outputs(PROBLEMS, main="results"))
    totals = (results.results
              | "AddUp" >> beam.CombineGlobally(_TotalsFn(self._taxonomy.num_classes)))
    per_image = results.results | "PerImage" >> beam.Map(lambda r: r.record)
    return totals, per_image, results[PROBLEMS]
