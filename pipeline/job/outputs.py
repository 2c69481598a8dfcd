"""The outputs concern: what the job computes (plan), and where a run's files go: prefixes and run ids, an output directory shared by runs (and
what earlier runs left there to skip), the extra GeoParquet outputs, and the check that
each location can be written before anything is launched."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import uuid

from apache_beam.io.filesystems import FileSystems

from pipeline.job.config import ConfigError
from transforms.augmentation import parse as parse_augmentation
from transforms.config import OUTPUT_CONFIDENCE, OUTPUT_FEATURES, OUTPUT_MASKS, PolygonConfig
from transforms.embeddings.patches import MIN_PATCH_SIZE

logger = logging.getLogger(__name__)

ROWS_NAME = "segmentations"
ERRORS_NAME = "errors"


def _fraction(name: str, value, low_open: bool = True) -> None:
  if value is not None and not (0 < value <= 1 if low_open else 0 <= value <= 1):
    raise ConfigError(f"--{name} {value}: use a probability in (0, 1], e.g. 0.9")


def _parse_outputs(text: str) -> tuple:
  outputs = tuple(dict.fromkeys(o.strip() for o in text.split(",") if o.strip()))
  allowed = (OUTPUT_MASKS, OUTPUT_FEATURES, OUTPUT_CONFIDENCE)
  if not outputs or any(o not in allowed for o in outputs):
    raise ConfigError(f"--outputs {text!r}: use one or more of {', '.join(allowed)}, "
                      "comma-separated")
  if OUTPUT_CONFIDENCE in outputs and OUTPUT_MASKS not in outputs:
    raise ConfigError(f"--outputs {text!r}: confidence comes with masks; add 'masks'")
  return tuple(o for o in allowed if o in outputs)


@dataclasses.dataclass(frozen=True)
class OutputPlan:
  """What the job computes and where each output goes, every location checked writable."""
  computed: tuple            # what the model step computes (OUTPUT_*)
  store_confidence: bool     # False: confidence maps only for the polygons
  augmentation: object
  run_id: str
  rows: str
  errors: str
  existing_rows: str | None
  existing_errors: str | None
  mask_geotiff_dir: str | None
  polygons_output: str | None
  polygons: PolygonConfig
  patch_output: str | None
  patch_size: int | None


def plan(options) -> OutputPlan:
  """The outputs concern in one pass: what is computed (--outputs, --tta, thresholds),
  the run id, and where each output goes, each location checked writable."""
  computed = _parse_outputs(options.outputs)
  try:
    augmentation = parse_augmentation(options.tta, masks=OUTPUT_MASKS in computed)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  _fraction("confidence_threshold", options.confidence_threshold)
  _fraction("ignore_below", options.ignore_below)
  if options.ignore_below is not None and OUTPUT_MASKS not in computed:
    raise ConfigError("--ignore_below needs masks: add 'masks' to --outputs")
  if options.mask_geotiff_dir and OUTPUT_MASKS not in computed:
    raise ConfigError("--mask_geotiff_dir needs masks: add 'masks' to --outputs")
  run_id = _run_id_for(options.run_id)
  rows, errors, existing_rows, existing_errors = _prefixes(options, run_id)
  polygons_output, polygons = _polygon_output(options, computed, run_id)
  patch_output, patch_size = _patch_output(options, computed, run_id)
  _check_writable(rows, run_id)
  _check_writable(errors, run_id)
  if options.mask_geotiff_dir:
    _check_writable(options.mask_geotiff_dir.rstrip("/") + "/mask", run_id)
  if options.stats_output:
    _check_writable(options.stats_output, run_id)
  store_confidence = OUTPUT_CONFIDENCE in computed
  if polygons_output:   # polygons carry their mean confidence: maps are computed
    computed = tuple(o for o in (OUTPUT_MASKS, OUTPUT_FEATURES, OUTPUT_CONFIDENCE)
                     if o in computed or o == OUTPUT_CONFIDENCE)
  return OutputPlan(computed, store_confidence, augmentation, run_id, rows, errors,
                    existing_rows, existing_errors, options.mask_geotiff_dir,
                    polygons_output, polygons, patch_output, patch_size)


def is_directory(output: str) -> bool:
  return output.endswith("/") or ("://" not in output and os.path.isdir(output))


def _run_id_for(given: str | None) -> str:
  if given is None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"
  if not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", given):
    raise ConfigError(f"--run_id {given!r}: use letters, digits, '_', '.' and '-'")
  return given


def _earlier(pattern: str) -> str | None:
  """The pattern if earlier runs wrote files matching it, else None."""
  try:
    found = FileSystems.match([pattern], limits=[1])[0].metadata_list
  except Exception:  # pylint: disable=broad-except  # a new directory: nothing to skip
    found = []
  return pattern if found else None


def _prefixes(options, run_id: str) -> tuple[str, str, str | None, str | None]:
  """(rows prefix, errors prefix, patterns of earlier runs' rows and errors, or None)."""
  if not is_directory(options.output):
    if options.skip_existing:
      raise ConfigError(f"--skip_existing needs --output to be a directory (end it with "
                        f"'/'), so that runs write side by side; got {options.output!r}")
    return options.output, options.errors_output or f"{options.output}-errors", None, None
  if options.retry_errors and not options.skip_existing:
    raise ConfigError("--retry_errors only means something with --skip_existing")
  directory = options.output.rstrip("/")
  rows = f"{directory}/{ROWS_NAME}-{run_id}"
  errors = options.errors_output or f"{directory}/{ERRORS_NAME}-{run_id}"
  existing_rows = existing_errors = None
  if options.skip_existing:
    existing_rows = _earlier(f"{directory}/{ROWS_NAME}-*-of-*.parquet")
    if not options.retry_errors:
      existing_errors = _earlier(f"{directory}/{ERRORS_NAME}-*-of-*.jsonl")
    logger.info("--skip_existing: rows %s, errors %s", existing_rows, existing_errors)
  return rows, errors, existing_rows, existing_errors


def _check_writable(prefix: str, run_id: str) -> None:
  """Writes and deletes a marker where the output goes: a missing bucket or a missing
  permission then stops the job here, not after hours of work."""
  directory = prefix.rsplit("/", 1)[0] if "/" in prefix else "."
  marker = f"{directory}/.hrnet-beam-write-check-{run_id}"
  try:
    if marker.startswith("gs://"):
      # One request: a failed streaming writer would retry its upload again when
      # garbage-collected, for minutes, long after this check has reported.
      from google.cloud import storage  # pylint: disable=import-outside-toplevel
      bucket, name = marker[len("gs://"):].split("/", 1)
      client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "hrnet-beam"))
      blob = client.bucket(bucket).blob(name)
      blob.upload_from_string(b"ok")
      blob.delete()
    else:
      with FileSystems.create(marker) as f:
        f.write(b"ok")
      FileSystems.delete([marker])
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"cannot write to the output location {directory}: "
                      f"{type(e).__name__}: {e}") from e


def _polygon_output(options, outputs: tuple, run_id: str) -> tuple:
  """(GeoParquet prefix or None, PolygonConfig), checked."""
  if options.min_polygon_area < 0:
    raise ConfigError(f"--min_polygon_area {options.min_polygon_area}: use pixels >= 0")
  if not 0 <= options.simplify_tolerance < float("inf"):
    raise ConfigError(f"--simplify_tolerance {options.simplify_tolerance}: use pixels >= 0")
  if options.polygon_denoise < 0:
    raise ConfigError(f"--polygon_denoise {options.polygon_denoise}: use pixels >= 0")
  config = PolygonConfig(options.min_polygon_area, options.simplify_tolerance,
                         options.polygon_denoise)
  prefix = options.polygons_output
  if not prefix:
    if config != PolygonConfig():
      raise ConfigError("--min_polygon_area, --simplify_tolerance and --polygon_denoise "
                        "shape polygons: add --polygons_output PREFIX")
    return None, config
  return _extra_output("polygons_output", prefix, "polygons", OUTPUT_MASKS, outputs,
                       run_id), config


def _extra_output(flag: str, prefix: str, name: str, needs: str, outputs: tuple,
                  run_id: str) -> str:
  """A GeoParquet prefix checked: what it needs is computed, and it can be written; a
  directory gets files named `name-...`."""
  if needs not in outputs:
    raise ConfigError(f"--{flag} needs {needs}: add '{needs}' to --outputs")
  if is_directory(prefix):
    prefix = prefix.rstrip("/") + "/" + name
  _check_writable(prefix, run_id)
  return prefix


def _patch_output(options, outputs: tuple, run_id: str) -> tuple:
  """(GeoParquet prefix or None, patch size or None), checked."""
  if options.patch_size < MIN_PATCH_SIZE:
    raise ConfigError(f"--patch_size {options.patch_size}: use pixels >= {MIN_PATCH_SIZE}")
  prefix = options.patch_output
  if not prefix:
    return None, None
  return (_extra_output("patch_output", prefix, "patches", OUTPUT_FEATURES, outputs, run_id),
          options.patch_size)
