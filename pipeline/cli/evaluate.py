"""Evaluates a job's masks against reviewed labels: per-class IoU, precision, recall and
F1, the confusion matrix, calibration of the confidence, and what reviewing the least
confident images would catch; per-image scores as Parquet to join to the rows.

    hrnet-beam evaluate OUTPUT_PREFIX --truth 'labels/*.png' --report DIR
    hrnet-beam evaluate OUTPUT_PREFIX --truth reviewed.json --truth_format coco --report DIR

Runs as a Beam pipeline (the local runner by default; Beam's flags, such as
--runner DataflowRunner, as for `run`). DIR (local or gs://) gets report.json, the plots
(confusion.png, class_iou.png, reliability.png, review.png), per_image-*.parquet and
problems-*.jsonl. Exit status: 0 done, 2 a flag, class map or input is wrong (nothing ran).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, TestOptions

from pipeline.job.config import ConfigError
from pipeline.job.launch import local_runner
from pipeline.job.options import add_beam_flags, check_known_flags, runs_on_this_machine
from transforms.evaluation import EvaluateSegmentations, ReadTruth
from transforms.evaluation import plots
from transforms.evaluation.evaluate import (PROBLEMS, ROW_COLUMNS, per_image_schema,
                                            totals_from_json)
from transforms.evaluation.metrics import Taxonomy, report_figures
from transforms.evaluation.truth import (FORMATS, TruthError, match_key, read_class_map,
                                         taxonomy, tool_classes)
from transforms.exports.rows import ExportError, create, output_info, row_files
from transforms.labels import read_labels

EXIT_OK, EXIT_CONFIG = 0, 2
EXAMPLES_PER_PROBLEM = 20
PLOTS = {"confusion.png": plots.confusion_png, "class_iou.png": plots.class_iou_png,
         "reliability.png": plots.reliability_png, "review.png": plots.review_png}


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  row_files: tuple
  model: str
  truth: tuple                 # mask patterns, or the one tool file
  truth_format: Optional[str]  # None: mask images
  truth_suffix: str
  ignore_value: int
  taxonomy: Taxonomy
  report_dir: str
  class_map: Optional[str]


def parser(prog: str = "hrnet-beam evaluate",
           with_beam_flags: bool = True) -> argparse.ArgumentParser:
  """The command's flags, then (for --help and the check of misspelt flags) Beam's."""
  doc = __doc__.splitlines()
  p = argparse.ArgumentParser(prog=prog, description=doc[0], allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(doc[1:]), conflict_handler="resolve")
  group = p.add_argument_group("Evaluation")
  group.add_argument("output", help="The job's --output prefix or output directory (local "
                                    "or gs://).")
  group.add_argument("--truth", required=True, action="append",
                     help="Truth masks: a pattern of PNG or GeoTIFF files, one per source "
                          "image, pixel values = class ids (repeatable); or, with "
                          "--truth_format, one labeling tool's file.")
  group.add_argument("--truth_format", choices=FORMATS, default=None,
                     help="The truth is a labeling tool's file: coco (annotations JSON: "
                          "RLE or polygons), labelstudio (its JSON export: brushes and "
                          "polygons), cvat (CVAT for images 1.1 XML: masks and polygons; "
                          "or a Segmentation mask 1.1 directory).")
  group.add_argument("--truth_suffix", default="",
                     help="Stripped from each truth file's stem before matching it to a "
                          "row by the source's stem: '.labels' matches scene_000.labels.png "
                          "to scene_000.png.")
  group.add_argument("--truth_labels", default=None,
                     help="Labels JSON naming the truth's classes (the models' format). "
                          "Default: the model's own classes for masks; the tool file's "
                          "own classes for --truth_format.")
  group.add_argument("--ignore_value", type=int, default=255,
                     help="Truth mask value of unlabelled pixels: never counted.")
  group.add_argument("--class_map", default=None,
                     help='JSON: {"truth class": "model class" or null (ignored), ...}; or '
                          '{"truth": {...}, "model": {"model class": "evaluation class"}} '
                          "to merge model classes (many to one). Unmapped truth classes "
                          "go to the model class of the same name.")
  group.add_argument("--report", required=True, help="Directory for the report (local or "
                                                     "gs://).")
  return add_beam_flags(p) if with_beam_flags else p


def config_from_args(args) -> EvaluationConfig:
  """Checks everything that can be known before running; raises ConfigError."""
  try:
    files = row_files(args.output)
    info = output_info(files)
  except ExportError as e:
    raise ConfigError(str(e)) from e
  if not 0 <= args.ignore_value <= 255:
    raise ConfigError(f"--ignore_value {args.ignore_value}: truth masks are 8-bit, give "
                      "0..255")
  try:
    if args.truth_labels:
      truth_names = read_labels(args.truth_labels).class_names
    elif args.truth_format:
      if len(args.truth) != 1:
        raise ConfigError("--truth_format takes one --truth file")
      truth_names = tool_classes(args.truth_format, args.truth[0])
    else:
      truth_names = info.class_names
    class_map = read_class_map(args.class_map) if args.class_map else None
    chosen = taxonomy(info.class_names, truth_names, class_map)
  except (TruthError, OSError, ValueError) as e:
    raise ConfigError(str(e)) from e
  if not args.truth_format:
    for pattern in args.truth:
      try:
        found = FileSystems.match([pattern], limits=[1])[0].metadata_list
      except Exception:  # pylint: disable=broad-except  # no such directory
        found = []
      if not found:
        raise ConfigError(f"--truth {pattern} matches no file")
  return EvaluationConfig(tuple(files), info.model, tuple(args.truth), args.truth_format,
                          args.truth_suffix, args.ignore_value, chosen,
                          args.report.rstrip("/"), args.class_map)


def _key_row(row: dict):
  yield match_key(row["image_id"]), row


def build_evaluation(p: beam.Pipeline, cfg: EvaluationConfig) -> None:
  """Rows and truth -> the totals, per-image Parquet and problem lines under cfg.report_dir."""
  from apache_beam.io.parquetio import ReadAllFromParquet, WriteToParquet  # pylint: disable=import-outside-toplevel
  rows = (p
          | "RowFiles" >> beam.Create(list(cfg.row_files))
          | "ReadRows" >> ReadAllFromParquet(columns=ROW_COLUMNS)
          | "KeyRows" >> beam.FlatMap(_key_row))
  truth = p | "ReadTruth" >> ReadTruth(list(cfg.truth), cfg.truth_format,
                                       cfg.taxonomy.truth_names, cfg.truth_suffix)
  totals, per_image, problems = ((rows, truth) | "Evaluate" >> EvaluateSegmentations(
      cfg.taxonomy, cfg.ignore_value))
  _ = totals | "WriteTotals" >> beam.io.WriteToText(
      f"{cfg.report_dir}/_totals", file_name_suffix=".json", shard_name_template="")
  _ = per_image | "WritePerImage" >> WriteToParquet(
      f"{cfg.report_dir}/per_image", per_image_schema(cfg.taxonomy.class_names),
      file_name_suffix=".parquet")
  _ = (problems
       | "ProblemLines" >> beam.Map(json.dumps, sort_keys=True)
       | "WriteProblems" >> beam.io.WriteToText(f"{cfg.report_dir}/{PROBLEMS}",
                                                file_name_suffix=".jsonl"))


def _clear(report_dir: str) -> None:
  """An earlier report's shards would be read as this one's."""
  for pattern in (f"{report_dir}/per_image-*.parquet", f"{report_dir}/{PROBLEMS}-*.jsonl",
                  f"{report_dir}/_totals.json"):
    try:
      paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception:  # pylint: disable=broad-except  # nothing there yet
      paths = []
    if paths:
      FileSystems.delete(paths)


def _read_text(path: str) -> str:
  with FileSystems.open(path) as f:
    return f.read().decode("utf-8")


def problem_summary(report_dir: str) -> dict:
  """Counts per kind and the first examples of each, streaming the problem lines."""
  counts, examples = {}, {}
  try:
    paths = sorted(m.path for m in FileSystems.match(
        [f"{report_dir}/{PROBLEMS}-*.jsonl"])[0].metadata_list)
  except Exception:  # pylint: disable=broad-except
    paths = []
  for path in paths:
    with FileSystems.open(path) as f:
      for line in f:
        problem = json.loads(line)
        counts[problem["kind"]] = counts.get(problem["kind"], 0) + 1
        kept = examples.setdefault(problem["kind"], [])
        if len(kept) < EXAMPLES_PER_PROBLEM:
          kept.append(problem)
  return {"counts": counts, "examples": examples,
          "files": f"{report_dir}/{PROBLEMS}-*.jsonl"}


def headline(report: dict) -> dict:
  """The weakest class and the confusion that dominates, in words."""
  names = report["classes"]
  scored = [(v["iou"], n) for n, v in report["per_class"].items() if v["iou"] is not None]
  confusion = report["confusion"]
  worst = max(((confusion[i][j], i, j) for i in range(len(names)) for j in range(len(names))
               if i != j), default=(0, 0, 0))
  support = report["per_class"][names[worst[1]]]["support"]
  return {"weakest_class": min(scored)[1] if scored else None,
          "dominant_confusion": None if not worst[0] else {
              "truth": names[worst[1]], "predicted": names[worst[2]], "pixels": worst[0],
              "share_of_truth_class": worst[0] / support if support else None,
              "share_of_wrong_pixels": worst[0] / max(1, report["pixels"] - sum(
                  confusion[i][i] for i in range(len(names))))}}


def make_report(cfg: EvaluationConfig) -> dict:
  totals, worst = totals_from_json(_read_text(f"{cfg.report_dir}/_totals.json"))
  report = report_figures(totals, cfg.taxonomy.class_names)
  report.update(headline(report))
  report["worst_images"] = worst
  report["problems"] = problem_summary(cfg.report_dir)
  report["inputs"] = {
      "rows": cfg.row_files[0].rsplit("/", 1)[0], "row_files": len(cfg.row_files),
      "model": cfg.model, "truth": list(cfg.truth), "truth_format": cfg.truth_format or "masks",
      "truth_suffix": cfg.truth_suffix, "ignore_value": cfg.ignore_value,
      "truth_classes": list(cfg.taxonomy.truth_names), "class_map": cfg.class_map,
      "truth_to_class": {t: (cfg.taxonomy.class_names[e] if e >= 0 else None)
                         for t, e in zip(cfg.taxonomy.truth_names,
                                         cfg.taxonomy.truth_to_eval)},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  report["files"] = {"per_image": f"{cfg.report_dir}/per_image-*.parquet"}
  return report


def write_report(report: dict, report_dir: str) -> list:
  written = [f"{report_dir}/report.json"]
  with create(written[0], "application/json") as f:
    f.write(json.dumps(report, indent=1).encode())
  for name, draw in PLOTS.items():
    if name == "reliability.png" and not report["calibration"]:
      continue
    if name == "review.png" and not (report["review"] and report["review"]["wrong_pixels"]):
      continue
    if report["miou"] is None:
      continue
    with create(f"{report_dir}/{name}", "image/png") as f:
      f.write(draw(report))
    written.append(f"{report_dir}/{name}")
  return written


def _f(value, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def table(report: dict) -> str:
  """The report as a user reads it at the terminal."""
  width = max(12, *(len(n) for n in report["classes"]))
  lines = [f"{'class':<{width}}  {'IoU':>6}  {'prec':>6}  {'recall':>6}  {'F1':>6}  "
           f"{'support':>10}"]
  for name in report["classes"]:
    c = report["per_class"][name]
    lines.append(f"{name:<{width}}  {_f(c['iou']):>6}  {_f(c['precision']):>6}  "
                 f"{_f(c['recall']):>6}  {_f(c['f1']):>6}  {c['support']:>10}")
  lines.append(f"images {report['images_evaluated']}, pixels {report['pixels']}: mIoU "
               f"{_f(report['miou'])}, fwIoU {_f(report['fwiou'])}, pixel accuracy "
               f"{_f(report['pixel_accuracy'])}")
  if report["weakest_class"]:
    lines.append(f"weakest class: {report['weakest_class']}")
  confusion = report["dominant_confusion"]
  if confusion:
    lines.append(f"dominant confusion: {confusion['truth']} read as {confusion['predicted']}"
                 f" ({confusion['pixels']} px, {_f(confusion['share_of_wrong_pixels'], 2)} "
                 "of all wrong pixels)")
  calibration = report["calibration"]
  lines.append("calibration: " + (
      f"ECE {_f(calibration['ece'], 4)} (15 bins), AUROC right vs wrong "
      f"{_f(calibration['auroc_right_vs_wrong'])}" if calibration else
      "no confidence maps in the rows (run the job with --outputs ...,confidence)"))
  review = report["review"]
  if review and review["wrong_pixels"]:
    for key, words in (("by_mean_confidence", "lowest mean_confidence"),
                       ("by_low_confidence_fraction", "highest low_confidence_fraction")):
      at = review[key]["at"]
      lines.append(f"review by {words}: " + ", ".join(
          f"{p}% of images -> {100 * at[p]:.1f}% of wrong pixels" for p in at))
  counts = report["problems"]["counts"]
  lines.append("problems: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                               + f" (each named in {report['problems']['files']})"
                               if counts else "none"))
  return "\n".join(lines)


def evaluate(argv, prog: str = "hrnet-beam evaluate", test_pipeline=None) -> dict:
  """Runs the evaluation; returns the report. Raises ConfigError before running."""
  check_known_flags(argv, parser(prog), "evaluate")
  args, beam_args = parser(prog, with_beam_flags=False).parse_known_args(argv)
  cfg = config_from_args(args)
  options = PipelineOptions(beam_args)
  _clear(cfg.report_dir)
  if test_pipeline is not None:
    p = test_pipeline
  elif runs_on_this_machine(options):
    p = beam.Pipeline(runner=local_runner(options), options=options)
  else:
    p = beam.Pipeline(options=options)
  build_evaluation(p, cfg)
  if options.view_as(TestOptions).dry_run:
    result = p.run()
    return {"dry_run": True, "job": getattr(result, "job", None)}
  p.run().wait_until_finish()
  report = make_report(cfg)
  report["files"]["written"] = write_report(report, cfg.report_dir)
  FileSystems.delete([f"{cfg.report_dir}/_totals.json"])
  return report


def main(argv=None, prog: str = "hrnet-beam evaluate") -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    report = evaluate(argv, prog)
  except ConfigError as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return EXIT_CONFIG
  if report.get("dry_run"):
    print("hrnet-beam evaluate dry run: pipeline translated, not submitted")
    return EXIT_OK
  print(table(report))
  print(f"report: {', '.join(report['files']['written'])}; per image: "
        f"{report['files']['per_image']}")
  return EXIT_OK
