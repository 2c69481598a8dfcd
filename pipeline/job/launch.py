"""Launching the job: `run(argv)` validates the flags into a JobConfig, picks the runner,
runs the graph of graph.py and returns a RunSummary."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (PipelineOptions, StandardOptions,
                                                  TestOptions)
from apache_beam.runners.runner import PipelineState

from pipeline.job.config import JobConfig
from pipeline.job.graph import build_pipeline
from pipeline.job.options import (LOCAL_RUNNER_NAMES, HRNetOptions, check_known_flags,
                                  runs_in_this_process)
from pipeline.job.progress import ProgressDisplay, progress_line
from pipeline.job.validate import job_config_from_options
from transforms.inference.model import release_preloaded
from transforms import timing
from transforms.metrics import METRICS_NAMESPACE, model_load_ids
from transforms.progress import COUNTED_FIELDS, ProgressCounts, metric_name, read_reports

logger = logging.getLogger(__name__)


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
    if cfg.polygons_output:
      failed = self.metrics.get("polygons_failed", 0)
      text += (f"  Polygons: {self.metrics.get('polygons', 0)} in {cfg.polygons_output}-*.parquet"
               + (f" ({failed} rows' polygons failed: see the warnings)" if failed else ""))
    if cfg.patch_output:
      text += (f"  Patches: {self.metrics.get('patches', 0)} in "
               f"{cfg.patch_output}-*.parquet")
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
  values["model_load_ids"] = model_load_ids(values)
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
  check_known_flags(argv)
  options = PipelineOptions(argv)
  in_this_process = test_pipeline is None and runs_in_this_process(options)
  try:
    cfg = job_config_from_options(options.view_as(HRNetOptions),
                                  keep_model_for_local_worker=in_this_process)
    return _run(options, cfg, test_pipeline)
  finally:
    release_preloaded()


def _plan_lines(cfg: JobConfig) -> list:
  """What the job will do, in the words a user checks before waiting for it."""
  model, patterns = cfg.model, len(cfg.input_patterns)
  return [
      f"hrnet-beam: model {model.handle}: {model.num_classes} classes ({model.labels.name}), "
      f"{model.feature_dim} feature channels, " + (
          f"precision {model.precision}" if model.engine == "tensorflow" else
          f"OpenVINO {json.loads(model.manifest_json)['precision']} (optimized from "
          f"{json.loads(model.manifest_json)['source_model']})"),
      f"hrnet-beam: {patterns} input pattern{'s' if patterns > 1 else ''}, each matching "
      f"at least one file (the job counts them as it lists); rows to {cfg.output}-*.parquet, "
      f"errors to {cfg.errors_output}-*.jsonl"]


def _metric_counts(values: dict) -> ProgressCounts:
  errors = values.get("decode_errors", 0) + values.get("inference_errors", 0)
  return ProgressCounts(done=values.get("rows", 0) + errors + values.get("skipped_existing", 0),
                        errors=errors, tiles=values.get("tiles_inferred", 0) +
                        values.get("tiles_nodata_skipped", 0),
                        **{field: values.get(metric_name(field), 0)
                           for field in COUNTED_FIELDS})


def _run(options: PipelineOptions, cfg: JobConfig, test_pipeline) -> RunSummary:
  for line in _plan_lines(cfg):
    print(line, flush=True)
  local = options.view_as(StandardOptions).runner in LOCAL_RUNNER_NAMES
  report_dir = None
  if local and cfg.progress_mode != "off":
    # Workers on this machine report to files here; the display sums them.
    report_dir = tempfile.mkdtemp(prefix="hrnet-beam-progress-")
    cfg = dataclasses.replace(cfg, progress=dataclasses.replace(cfg.progress,
                                                                report_dir=report_dir))
  if test_pipeline is not None:
    p = test_pipeline
  elif local:
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
  display = None
  if report_dir:
    display = ProgressDisplay(len(cfg.input_patterns), lambda: read_reports(report_dir),
                              cfg.progress_mode, cfg.progress.log_interval_s).start()
  started = time.monotonic()
  try:
    result = p.run()
    if local or cfg.progress_mode == "off":
      result.wait_until_finish()
    else:
      _wait_showing_progress(result, cfg)
    values = _counter_values(result)
  except Exception as e:  # pylint: disable=broad-except
    if "ErrorBudgetExceeded" not in f"{type(e).__name__} {e}":
      raise
    # A worker stopped the job: the sinks never finalized, so no rows are visible.
    failure = next((line.strip() for line in str(e).splitlines() if "max_error_fraction" in line),
                   "error budget exceeded")
    exit_status = EXIT_ERROR_BUDGET
  finally:
    if display is not None:
      display.stop()   # every bundle has flushed its report by now
    if report_dir:
      shutil.rmtree(report_dir, ignore_errors=True)
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
  if failure:
    logger.error("%s", summary.line(cfg))
  print(summary.line(cfg), flush=True)
  _report_time(cfg, values, time.monotonic() - started,
               in_one_process=test_pipeline is None and runs_in_this_process(options))
  return summary


def _report_time(cfg: JobConfig, values: dict, wall_seconds: float,
                 in_one_process: bool) -> None:
  """Where the job's time went: one line, and the --stats_output JSON if asked for."""
  document = timing.stats(values, values.get("tiles", 0), wall_seconds, in_one_process)
  if any(document["stage_seconds"].values()):
    print(timing.time_line(document), flush=True)
  document["model_loads"] = len(values.get("model_load_ids", ()))   # distinct model copies
  if cfg.stats_output:
    document["run_id"] = cfg.run_id
    with FileSystems.create(cfg.stats_output) as f:
      f.write(json.dumps(document, indent=1).encode())


def _wait_showing_progress(result, cfg: JobConfig) -> None:
  """A remote job (Dataflow): a plain progress line from its metrics every interval."""
  started = time.monotonic()
  interval_ms = int(cfg.progress.log_interval_s * 1000)
  while True:
    state = result.wait_until_finish(duration=interval_ms)
    if state is not None and PipelineState.is_terminal(state):
      result.wait_until_finish()   # raises as usual if the job failed
      return
    try:
      counts = _metric_counts(_counter_values(result))
    except Exception:  # pylint: disable=broad-except  # metrics not available yet
      continue
    print(progress_line(len(cfg.input_patterns), counts, time.monotonic() - started), file=sys.stderr,
          flush=True)
