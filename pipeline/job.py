"""The segmentation job: `build_pipeline(p, cfg)` wires the graph, `run(argv)` launches it."""
from __future__ import annotations

import dataclasses
import logging
import sys

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (PipelineOptions, StandardOptions,
                                                  TestOptions)

from pipeline.config import ConfigError, JobConfig
from pipeline.options import (LOCAL_RUNNER_NAMES, HRNetOptions, job_config_from_options,
                              runs_in_this_process)
from transforms.model_handler import METRICS_NAMESPACE, release_preloaded
from transforms.read import ReadImages
from transforms.segment import SegmentImages
from transforms.write import (WriteErrors, WriteMaskGeoTiffs, WriteSegmentations,
                              segmentation_schema)

logger = logging.getLogger(__name__)


def build_pipeline(p: beam.Pipeline, cfg: JobConfig) -> None:
  """Files -> decoded images -> tiles -> RunInference -> stitched rows -> Parquet; errors aside."""
  images, read_errors = p | "ReadImages" >> ReadImages(list(cfg.input_patterns), cfg.decode,
                                                       cfg.existing_rows)
  rows, segment_errors = images | "SegmentImages" >> SegmentImages(
      cfg.tiling, cfg.model, cfg.inference)
  if cfg.mask_geotiff_dir:
    rows = rows | "WriteMaskGeoTiffs" >> WriteMaskGeoTiffs(cfg.mask_geotiff_dir,
                                                           cfg.model.labels.palette)
  _ = rows | "WriteSegmentations" >> WriteSegmentations(
      cfg.output, segmentation_schema(cfg.model, cfg.tiling, cfg.inference))
  _ = ((read_errors, segment_errors)
       | "AllErrors" >> beam.Flatten()
       | "WriteErrors" >> WriteErrors(cfg.errors_output))


EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_ERROR_BUDGET = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class RunSummary:
  inputs: int
  rows: int
  errors: int
  skipped: int
  state: str            # "done" or "failed"
  failure: str          # why it failed; "" when done
  exit_status: int
  metrics: dict
  job: object = None    # the translated job description, for --dry_run on Dataflow

  def line(self, cfg: JobConfig) -> str:
    skipped = f", {self.skipped} skipped (rows exist)" if self.skipped else ""
    text = (f"hrnet-beam {self.state}: {self.inputs} inputs, {self.rows} rows, "
            f"{self.errors} errors{skipped}. Rows: {cfg.output}-*.parquet  Errors: "
            f"{cfg.errors_output}-*.jsonl")
    return f"{text}  FAILED: {self.failure}" if self.failure else text


def _counter_values(result) -> dict:
  values = {}
  try:
    metrics = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
  except Exception:  # pylint: disable=broad-except  # some runners have no metrics
    return values
  for counter in metrics["counters"]:
    value = counter.committed if counter.committed is not None else counter.attempted
    values[counter.key.metric.name] = values.get(counter.key.metric.name, 0) + (value or 0)
  for distribution in metrics["distributions"]:
    result_value = distribution.committed or distribution.attempted
    if result_value is not None:
      values[f"{distribution.key.metric.name}.count"] = (
          values.get(f"{distribution.key.metric.name}.count", 0) + result_value.count)
  for string_set in metrics.get("string_sets", []):
    result_value = string_set.committed or string_set.attempted or set()
    values.setdefault(string_set.key.metric.name, set()).update(result_value)
  return values


def local_runner(options: PipelineOptions):
  """Beam's FnApiRunner, set up as the DirectRunner sets it up for batch pipelines.

  Beam 2.77's DirectRunner first tries Prism, which it downloads from GitHub at run
  time; a job on a machine without internet (or a test) must not depend on that.
  --direct_num_workers and --direct_running_mode work as with the DirectRunner.
  """
  # pylint: disable=import-outside-toplevel
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def run(argv=None, test_pipeline=None) -> RunSummary:
  """Validates the flags, checks inputs and model, runs the job and returns its summary.

  Raises ConfigError before anything is launched when a flag, pattern or model is wrong.
  """
  options = PipelineOptions(argv)
  in_this_process = test_pipeline is None and runs_in_this_process(options)
  try:
    cfg = job_config_from_options(options.view_as(HRNetOptions),
                                  keep_model_for_local_worker=in_this_process)
    return _run(options, cfg, test_pipeline)
  finally:
    release_preloaded()


def _run(options: PipelineOptions, cfg: JobConfig, test_pipeline) -> RunSummary:
  logger.info("Model %s: %d classes (%s), %d feature channels, fused function: %s",
              cfg.model.handle, cfg.model.num_classes, cfg.model.labels.name,
              cfg.model.feature_dim, cfg.model.has_fused_function)
  if test_pipeline is not None:
    p = test_pipeline
  elif options.view_as(StandardOptions).runner in LOCAL_RUNNER_NAMES:
    p = beam.Pipeline(runner=local_runner(options), options=options)
  else:
    p = beam.Pipeline(options=options)
  build_pipeline(p, cfg)
  logger.info("Run %s: rows to %s-*.parquet, errors to %s-*.jsonl", cfg.run_id, cfg.output,
              cfg.errors_output)
  if options.view_as(TestOptions).dry_run:
    result = p.run()
    print(f"hrnet-beam dry run: job translated for {options.view_as(StandardOptions).runner}, "
          "not submitted", flush=True)
    return RunSummary(0, 0, 0, 0, "dry_run", "", EXIT_OK, {}, getattr(result, "job", None))
  failure, exit_status, values = "", EXIT_OK, {}
  try:
    result = p.run()
    result.wait_until_finish()
    values = _counter_values(result)
  except Exception as e:  # pylint: disable=broad-except
    if "ErrorBudgetExceeded" not in f"{type(e).__name__} {e}":
      raise
    # A worker stopped the job: the sinks never finalized, so no rows are visible.
    failure = next((line.strip() for line in str(e).splitlines() if "max_error_fraction" in line),
                   "error budget exceeded")
    exit_status = EXIT_ERROR_BUDGET
  inputs = values.get("inputs", 0)
  errors = values.get("decode_errors", 0) + values.get("inference_errors", 0)
  if (not failure and cfg.max_error_fraction is not None and inputs and
      errors > cfg.max_error_fraction * inputs):
    failure = (f"{errors} of {inputs} inputs failed ({errors / inputs:.1%}), above "
               f"--max_error_fraction={cfg.max_error_fraction}")
    exit_status = EXIT_ERROR_BUDGET
  summary = RunSummary(
      inputs=inputs, rows=values.get("rows", 0), errors=errors,
      skipped=values.get("skipped_existing", 0), state="failed" if failure else "done",
      failure=failure, exit_status=exit_status, metrics=values)
  if not failure and summary.inputs != summary.rows + summary.errors:
    logger.error("Accounting mismatch: %d inputs but %d rows + %d errors", summary.inputs,
                 summary.rows, summary.errors)
  (logger.error if failure else logger.info)("%s", summary.line(cfg))
  print(summary.line(cfg), flush=True)
  return summary


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  try:
    return run(argv).exit_status
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG
