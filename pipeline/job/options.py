"""The pipeline's flags, and their validation into a frozen JobConfig before launch."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import uuid

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,
                                                  StandardOptions)

from pipeline.job.config import ConfigError, JobConfig
from pipeline.job.progress import MODES as PROGRESS_MODES
from transforms import labels as labels_lib
from transforms.config import (GRID_FIT, GRID_FIXED, OUTPUT_CONFIDENCE, OUTPUT_FEATURES,
                               OUTPUT_MASKS,
                               DecodeConfig, InferenceConfig, ModelConfig, PolygonConfig,
                               TilingConfig)
from transforms.augmentation import parse as parse_augmentation
from transforms.inference.confidence import MAX_CLASSES_WITH_IGNORE
from transforms.inference.model import inspect_model
from transforms.progress import ProgressConfig
from transforms.reading.listing import first_match
from transforms.inference.sources import DEFAULT_CACHE_DIR, ModelLoadError
from transforms.inference.precision import (FALLBACKS, FLOAT32, PRECISIONS,
                                  PrecisionUnsupportedError)
from transforms.tiling.channels import parse_channel_mapping
from transforms.tiling.grid import ALIGNMENT
from transforms.embeddings.patches import MIN_PATCH_SIZE

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "https://tfhub.dev/google/HRNet/isprs-hrnetv2-w48/1"
LOCAL_RUNNER_NAMES = (None, "DirectRunner", "SwitchingDirectRunner")


def runs_on_this_machine(options: PipelineOptions) -> bool:
  """Whether the workers are this machine's processes (the local runner)."""
  return options.view_as(StandardOptions).runner in LOCAL_RUNNER_NAMES


def runs_in_this_process(options: PipelineOptions) -> bool:
  running_mode = options.view_as(DirectOptions).direct_running_mode
  return runs_on_this_machine(options) and running_mode in (None, "in_memory")


# The job's flags, in the groups `hrnet-beam run --help` shows before Beam's own.
FLAG_GROUPS = (
    ("inputs", "Inputs: what to read"),
    ("model", "Model: which one, its labels and preprocessing, its precision"),
    ("tiling", "Tiling and batching"),
    ("outputs", "Outputs: where rows, errors and masks go"),
    ("robustness", "Robustness: resuming and the error budget"),
    ("runner", "Runner: workers, threads, logs and progress"),
)
LOG_LEVELS = ("warning", "info", "debug")


class HRNetOptions(PipelineOptions):
  """Flags of the segmentation job (Beam's own flags, e.g. --runner, work as usual)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    groups = {name: parser.add_argument_group(title) for name, title in FLAG_GROUPS}

    groups["inputs"].add_argument(
        "--input", action="append", default=None,
        help="File pattern of input images (PNG, JPEG, TIFF), local or gs://; repeatable. "
             "Each pattern must match at least one file.")

    groups["inputs"].add_argument(
        "--input_format", default="auto", choices=("auto", "image", "tfrecord", "tar"),
        help="auto: by extension (.tfrecord[.gz]/.tfrecords[.gz]/.tfr: TFRecord of "
             "tf.train.Example; .tar/.tar.gz/.tgz: WebDataset tar; else an image file).")

    groups["inputs"].add_argument(
        "--tfrecord_image_key", default="image/encoded",
        help="tf.train.Example feature holding the encoded image.")

    groups["inputs"].add_argument(
        "--tfrecord_id_keys", default="image/filename,image/id",
        help="Features tried in order for a record's id (else its index in the shard).")

    groups["inputs"].add_argument(
        "--max_record_bytes", type=int, default=DecodeConfig.max_record_bytes,
        help="An image file, TFRecord record or tar member larger than this many bytes "
             "(default 1 GiB, half of the 2 GiB that Beam's data channel carries) becomes "
             "one error, passed over without being read into memory; the shard goes on.")
    groups["inputs"].add_argument(
        "--max_pixels", type=int, default=100_000_000,
        help="Images declaring more pixels than this go to the errors output undecoded "
             "(TIFFs above --window_threshold are read by blocks instead, never whole).")

    groups["inputs"].add_argument(
        "--window_threshold", type=int, default=64_000_000,
        help="TIFFs (GeoTIFF, COG) with more pixels than this are never decoded whole: "
             "they are read by windows of --block_size, through byte ranges for gs://, "
             "spread over workers, and give one row per block.")

    groups["inputs"].add_argument(
        "--block_size", type=int, default=4096,
        help="Block side in pixels for rasters above --window_threshold.")

    groups["model"].add_argument(
        "--model", default=DEFAULT_MODEL,
        help="A short name of the HRNet suite (isprs, ade20k, city, ...: "
             "transforms/model_labels/suite.json), a TF Hub handle/URL, a local "
             "SavedModel directory or a gs:// directory.")

    groups["model"].add_argument(
        "--labels_file", default=None,
        help="JSON labels file (class names and palette, one entry per model output). "
             "Default: labels.json in the model directory, else the packaged file for a "
             "known TF Hub handle, else generic names.")

    groups["model"].add_argument(
        "--channel_mapping", default=None,
        help="How decoded RGB becomes the model's input: rgb, rg_mean (R, G, (R+G)/2: "
             "how the ISPRS model was trained), irg (IR-R-G images), or band indices like "
             "'2,1,0'. Default: the labels file's channel_mapping, else rgb.")

    groups["model"].add_argument(
        "--model_cache_dir", default=DEFAULT_CACHE_DIR,
        help="Where workers copy a gs:// model before loading it (once per machine).")

    groups["model"].add_argument(
        "--tta", default="none",
        help="Test-time augmentation: 'flip' averages the probabilities of each tile and "
             "its horizontal mirror; 'scales=0.75,1.0,1.25' adds passes on the tile resized "
             "(the tile as it is always counts); 'flip,scales=...' both. Passes multiply the "
             "model's work. Recorded in each row.")
    groups["model"].add_argument(
        "--precision", default=FLOAT32, choices=PRECISIONS,
        help="Run the float32 model at lower precision through TensorFlow's graph "
             "rewrite: bfloat16 on CPUs with AVX512-BF16 or AMX, float16 on NVIDIA GPUs "
             "(compute capability 7.0+). Faster, not identical: measure the agreement "
             "first with hrnet-beam compare-precision.")

    groups["model"].add_argument(
        "--precision_fallback", default="float32", choices=FALLBACKS,
        help="Where the hardware lacks --precision: 'float32' runs float32 with a warning "
             "(each row's precision column says what ran), 'fail' stops the job.")

    groups["tiling"].add_argument(
        "--tile_size", type=int, default=512,
        help=f"Tile side in pixels (multiple of {ALIGNMENT}); images are tiled at native "
             "resolution, never resized.")

    groups["tiling"].add_argument(
        "--tile_overlap", type=int, default=64,
        help=f"Overlap between neighbouring tiles in pixels (multiple of {ALIGNMENT}); "
             "each side keeps half.")
    groups["tiling"].add_argument(
        "--tile_grid", choices=(GRID_FIT, GRID_FIXED), default=GRID_FIT,
        help="'fit': the fewest tiles of at most --tile_size that cover each image with at "
             "least --tile_overlap, each shrunk to the smallest multiple of 32 that still "
             "covers it (a 1024 px side: three 384 px tiles). 'fixed': every tile "
             "--tile_size, the last ones padded (the grid before 2026-11; more pixels for "
             "the model).")

    groups["tiling"].add_argument(
        "--batch_size", type=int, default=4,
        help="Most tiles RunInference hands to the model step at once. Does not change "
             "results.")

    groups["tiling"].add_argument(
        "--model_batch_size", type=int, default=None,
        help="Tiles per model call: a fixed shape, partial groups are padded. Default: 1 "
             "for TensorFlow (fastest on CPUs; raise it on GPUs), 2 for an optimized "
             "(OpenVINO) model: each tile of a call runs on its own OpenVINO stream, so "
             "a call keeps at most this many streams busy (OpenVINO makes one per core "
             "here; measured 3.5%% faster at int8 than 1). Features differ in their last "
             "bits between 1 and more for OpenVINO, between any two values for "
             "TensorFlow (kernels are chosen by batch size); each file's metadata "
             "records it.")

    groups["outputs"].add_argument(
        "--output", default=None,
        help="Output prefix: rows go to <output>-SSSSS-of-NNNNN.parquet. A directory "
             "(ending in '/', or an existing local directory) holds several runs: each "
             "writes segmentations-<run_id>-SSSSS-of-NNNNN.parquet there.")

    groups["outputs"].add_argument(
        "--errors_output", default=None,
        help="Prefix for the errors (JSON lines); default <output>-errors, or "
             "<output>/errors-<run_id> for a directory.")

    groups["outputs"].add_argument(
        "--run_id", default=None,
        help="Names this run's files in an output directory; default UTC time + random.")

    groups["outputs"].add_argument(
        "--outputs", default=f"{OUTPUT_MASKS},{OUTPUT_FEATURES}",
        help="What to compute: 'masks', 'features' or both, comma-separated; add "
             "'confidence' (with masks) for a confidence PNG per row.")

    groups["outputs"].add_argument(
        "--confidence_threshold", type=float, default=0.5,
        help="Pixels whose top class probability is below this count in each row's "
             "low_confidence_fraction.")
    groups["outputs"].add_argument(
        "--ignore_below", type=float, default=None,
        help="Also write a pseudo-label mask (pseudo_label_png) in which pixels whose top "
             "probability is below this carry the ignore value 254 (nodata stays 255).")
    groups["outputs"].add_argument(
        "--mask_geotiff_dir", default=None,
        help="Also write each georeferenced input's mask as a Cloud-Optimized GeoTIFF "
             "here (local or gs://), with the source's CRS and transform and the class "
             "palette as colour map; the row's mask_geotiff column names the file.")

    groups["outputs"].add_argument(
        "--polygons_output", default=None,
        help="Also write one polygon per region of one class as GeoParquet 1.1 (local or "
             "gs://): <prefix>-<crs>-<run_id>-SSSSS-of-NNNNN.parquet, one file set per "
             "CRS; plain images in pixel coordinates. A prefix ending in '/' is a "
             "directory: files are named polygons-... there. Needs masks.")
    groups["outputs"].add_argument(
        "--min_polygon_area", type=int, default=0,
        help="With --polygons_output: drop regions of fewer pixels than this.")
    groups["outputs"].add_argument(
        "--simplify_tolerance", type=float, default=0.0,
        help="With --polygons_output: simplify outlines by up to this many pixels "
             "(Douglas-Peucker, topology-preserving); 0 keeps the exact pixel edges.")
    groups["outputs"].add_argument(
        "--polygon_denoise", type=int, default=0,
        help="With --polygons_output: regions under this many pixels first take the class "
             "of their largest neighbour (GDAL's sieve); nodata is never filled. "
             "Polygons only: the mask in the rows is unchanged.")

    groups["outputs"].add_argument(
        "--patch_output", default=None,
        help="Also write patch embeddings as GeoParquet 1.1 (local or gs://): one row per "
             "cell of a --patch_size grid aligned to each image's top-left corner, with "
             "the mean feature over its valid pixels, its class fractions and its "
             "footprint; files <prefix>-<crs>-<run_id>-SSSSS-of-NNNNN.parquet, one set per "
             "CRS. A prefix ending in '/' is a directory: files are named patches-... "
             "there. Needs features.")
    groups["outputs"].add_argument(
        "--patch_size", type=int, default=256,
        help=f"With --patch_output: the patches' side in pixels (>= {MIN_PATCH_SIZE}), "
             "independent of the tiles.")

    groups["robustness"].add_argument(
        "--skip_existing", action="store_true", default=False,
        help="With an output directory: process only inputs that have neither a row nor an "
             "error in the files earlier runs wrote there.")

    groups["robustness"].add_argument(
        "--retry_errors", action="store_true", default=False,
        help="With --skip_existing: also process inputs that earlier runs recorded as "
             "errors (by default they are skipped like inputs with rows, so a deterministic "
             "failure is reported once).")
    groups["robustness"].add_argument(
        "--max_error_fraction", type=float, default=None,
        help="Fail the job when more than this fraction of inputs fail (default: never). "
             "A worker stops the job early once it has seen 50 inputs over the budget.")

    groups["runner"].add_argument(
        "--share_model_across_processes", action="store_true", default=False,
        help="Load one model per machine, shared by all its worker processes.")

    groups["runner"].add_argument(
        "--model_copies", type=int, default=None,
        help="With shared models: how many copies per machine (implies sharing).")

    groups["runner"].add_argument(
        "--require_gpu", action="store_true", default=False,
        help="Workers fail loudly at start-up if TensorFlow sees no GPU. On by default "
             "when --dataflow_service_options asks for a worker_accelerator.")

    groups["runner"].add_argument(
        "--tf_intra_op_threads", type=int, default=0,
        help="TensorFlow threads per worker process for one op (0: TF's default, all "
             "cores). With several worker processes per machine (Dataflow runs one SDK "
             "process per vCPU unless the model is shared) a smaller pool avoids "
             "oversubscription. Features differ in their last bits between values.")

    groups["runner"].add_argument(
        "--tf_inter_op_threads", type=int, default=0,
        help="TensorFlow threads running independent ops at once (0: TF's default).")

    groups["runner"].add_argument(
        "--log_level", default="warning", choices=LOG_LEVELS,
        help="warning (default): the job's own lines, progress and warnings that matter; "
             "info or debug: also TensorFlow's, absl's and Beam's logs.")
    groups["runner"].add_argument(
        "--progress", default="auto", choices=PROGRESS_MODES,
        help="auto: one line updated in place on a terminal, else a plain line every "
             "--progress_interval seconds; bar, lines or off to choose.")
    groups["runner"].add_argument(
        "--progress_interval", type=float, default=10.0,
        help="Seconds between plain progress lines (also each remote worker's log line).")


def _beam_option_classes() -> list:
  """Every PipelineOptions subclass Beam defines, in a stable order, ours left out."""
  found, todo = [], list(PipelineOptions.__subclasses__())
  while todo:
    cls = todo.pop(0)
    if cls not in found:
      found.append(cls)
      todo.extend(cls.__subclasses__())
  return [c for c in found if c.__module__.startswith("apache_beam.")]


def run_parser(prog: str = "hrnet-beam run") -> argparse.ArgumentParser:
  """Every flag `run` takes: the job's own, in groups, then Beam's, one group per class."""
  parser = argparse.ArgumentParser(
      prog=prog, allow_abbrev=False, conflict_handler="resolve",
      description="Segments images (local or gs://) with an HRNet model and writes one "
                  "Parquet row per image (mask, class counts, pooled features); inputs "
                  "that fail go to an errors file. The job's flags come first, then "
                  "Beam's (runner, Dataflow, workers).")
  HRNetOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return add_beam_flags(parser)


def add_beam_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Beam's flags (runner, Dataflow, workers) on `parser`, one group per options class:
  every command that runs a pipeline takes the same ones."""
  for cls in _beam_option_classes():
    group = parser.add_argument_group(f"Beam: {cls.__name__}")
    # Beam's template flags need its own parser's add_value_provider_argument.
    group.add_value_provider_argument = group.add_argument
    try:
      cls._add_argparse_args(group)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except  # a class that cannot be listed
      continue
  return parser


def check_known_flags(argv, parser: argparse.ArgumentParser | None = None,
                      command: str = "run") -> None:
  """A misspelt flag fails before launch instead of being dropped with a log line."""
  _, unknown = (parser or run_parser()).parse_known_args(list(argv or []))
  flags = [word.split("=", 1)[0] for word in unknown if word.startswith("-")]
  if flags:
    raise ConfigError(f"unknown flag {', '.join(flags)}: see `hrnet-beam {command} --help` "
                      "for its flags and Beam's")


def _check_inputs_match(patterns: list[str]) -> None:
  """Each pattern must match a file: the listing stops at the first one (one list call), so
  launch takes the same time and memory for ten files or ten million. The job lists them."""
  for pattern in patterns:
    try:
      found = first_match(pattern)
    except Exception as e:  # e.g. a missing bucket, no permission
      raise ConfigError(f"cannot list --input {pattern!r}: {e}") from e
    if found is None:
      raise ConfigError(f"--input {pattern!r} matches no file: check the path and the "
                        "pattern (quote it so the shell does not expand it)")


def _parse_outputs(text: str) -> tuple:
  outputs = tuple(dict.fromkeys(o.strip() for o in text.split(",") if o.strip()))
  allowed = (OUTPUT_MASKS, OUTPUT_FEATURES, OUTPUT_CONFIDENCE)
  if not outputs or any(o not in allowed for o in outputs):
    raise ConfigError(f"--outputs {text!r}: use one or more of {', '.join(allowed)}, "
                      "comma-separated")
  if OUTPUT_CONFIDENCE in outputs and OUTPUT_MASKS not in outputs:
    raise ConfigError(f"--outputs {text!r}: confidence comes with masks; add 'masks'")
  return tuple(o for o in allowed if o in outputs)


def _fraction(name: str, value, low_open: bool = True) -> None:
  if value is not None and not (0 < value <= 1 if low_open else 0 <= value <= 1):
    raise ConfigError(f"--{name} {value}: use a probability in (0, 1], e.g. 0.9")


def _check_tiling(tile_size: int, overlap: int, grid: str = GRID_FIT) -> TilingConfig:
  if tile_size < ALIGNMENT or tile_size % ALIGNMENT:
    raise ConfigError(f"--tile_size {tile_size}: use a multiple of {ALIGNMENT} (e.g. 512)")
  if overlap < 0 or overlap % ALIGNMENT or overlap >= tile_size:
    raise ConfigError(f"--tile_overlap {overlap}: use a multiple of {ALIGNMENT} below "
                      f"--tile_size {tile_size} (e.g. 64)")
  return TilingConfig(tile_size, overlap, grid)


def _thread_pools(options: HRNetOptions) -> tuple:
  """(intra, inter) op threads per worker process; 0 leaves TensorFlow's default.

  Never chosen automatically: oneDNN picks kernels by thread count, so features would
  then differ in their last bits between 1 and 2 worker processes (measured), and
  splitting the 2 cores here gained nothing (PERFORMANCE.md).
  """
  for name in ("tf_intra_op_threads", "tf_inter_op_threads"):
    if getattr(options, name) < 0:
      raise ConfigError(f"--{name} {getattr(options, name)}: use 0 (TF's default) or more")
  return options.tf_intra_op_threads, options.tf_inter_op_threads


def _model_handle(model: str) -> str:
  """--model as a handle: short names resolved; a bare word that is nothing else fails."""
  handle = labels_lib.resolve_model_name(model)
  if handle == model and "/" not in model and not os.path.exists(model):
    names = ", ".join(labels_lib.model_suite()["names"])
    raise ConfigError(f"--model {model!r} is not a short name of the HRNet suite ({names}), "
                      "a TF Hub handle, or an existing SavedModel directory")
  return handle


def _resolve_labels(options, handle: str, model_dir: str):
  try:
    return labels_lib.model_labels(handle, model_dir, options.labels_file)
  except (OSError, ValueError) as e:
    where = (f"--labels_file {options.labels_file}" if options.labels_file else
             f"{model_dir}/{labels_lib.MODEL_LABELS_FILE}")
    raise ConfigError(f"{where}: {e}") from e


def _positive(name: str, value) -> None:
  if value is not None and value < 1:
    raise ConfigError(f"--{name} {value}: must be at least 1")


ROWS_NAME = "segmentations"
ERRORS_NAME = "errors"


def _is_directory(output: str) -> bool:
  return output.endswith("/") or ("://" not in output and os.path.isdir(output))


def _run_id(given: str | None) -> str:
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


def _outputs(options, run_id: str) -> tuple[str, str, str | None, str | None]:
  """(rows prefix, errors prefix, patterns of earlier runs' rows and errors, or None)."""
  if not _is_directory(options.output):
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


def _check_optimized_shape(info, tiling: TilingConfig) -> None:
  """An optimized model with a fixed input size serves only tiles of that size."""
  if info.input_shape is None:
    return
  height, width = info.input_shape[1], info.input_shape[2]
  if height == -1 and width == -1:
    return
  if tiling.grid == GRID_FIT or (height, width) != (tiling.tile_size, tiling.tile_size):
    raise ConfigError(f"the optimized model takes only {height}x{width} inputs, but the job "
                      f"cuts tiles of {'any size up to ' if tiling.grid == GRID_FIT else ''}"
                      f"{tiling.tile_size}: optimize again (hrnet-beam optimize writes any "
                      f"size), or run with --tile_grid fixed --tile_size {height}")


def _polygons(options, outputs: tuple, run_id: str) -> tuple:
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
  if _is_directory(prefix):
    prefix = prefix.rstrip("/") + "/" + name
  _check_writable(prefix, run_id)
  return prefix


OPENVINO_MODEL_BATCH = 2   # one tile per stream of a 2-vCPU worker: W48 int8, 3.5% more
                           # tiles/s than 1 (PERFORMANCE.md)


def _patches(options, outputs: tuple, run_id: str) -> tuple:
  """(GeoParquet prefix or None, patch size or None), checked."""
  if options.patch_size < MIN_PATCH_SIZE:
    raise ConfigError(f"--patch_size {options.patch_size}: use pixels >= {MIN_PATCH_SIZE}")
  prefix = options.patch_output
  if not prefix:
    return None, None
  return (_extra_output("patch_output", prefix, "patches", OUTPUT_FEATURES, outputs, run_id),
          options.patch_size)


def _asks_for_gpu(options: HRNetOptions) -> bool:
  service_options = options.get_all_options().get("dataflow_service_options") or []
  return options.require_gpu or any("worker_accelerator" in o for o in service_options)


def job_config_from_options(options: HRNetOptions,
                            keep_model_for_local_worker: bool = False) -> JobConfig:
  """Checks every flag, the inputs and the model; raises ConfigError saying what to fix."""
  if not options.input:
    raise ConfigError("--input is required: a file pattern such as 'images/*.png' or "
                      "'gs://bucket/tiles/*.tif'")
  if not options.output:
    raise ConfigError("--output is required: a prefix such as 'out/segmentations' or "
                      "'gs://bucket/out/segmentations'")
  if options.progress_interval <= 0:
    raise ConfigError(f"--progress_interval {options.progress_interval}: use seconds > 0")
  for name in ("batch_size", "model_batch_size", "max_pixels", "model_copies",
               "window_threshold", "block_size", "max_record_bytes"):
    _positive(name, getattr(options, name))
  if options.max_error_fraction is not None and not 0 <= options.max_error_fraction < 1:
    raise ConfigError(f"--max_error_fraction {options.max_error_fraction}: use a fraction "
                      "in [0, 1), e.g. 0.05")
  tiling = _check_tiling(options.tile_size, options.tile_overlap, options.tile_grid)
  outputs = _parse_outputs(options.outputs)
  try:
    augmentation = parse_augmentation(options.tta)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if augmentation.passes > 1 and OUTPUT_MASKS not in outputs:
    raise ConfigError("--tta changes masks only: add 'masks' to --outputs")
  _fraction("confidence_threshold", options.confidence_threshold)
  _fraction("ignore_below", options.ignore_below)
  if options.ignore_below is not None and OUTPUT_MASKS not in outputs:
    raise ConfigError("--ignore_below needs masks: add 'masks' to --outputs")
  run_id = _run_id(options.run_id)
  rows_prefix, errors_prefix, existing, existing_errors = _outputs(options, run_id)
  decode = DecodeConfig(
      options.max_pixels, options.max_error_fraction, options.input_format,
      options.tfrecord_image_key,
      tuple(k.strip() for k in options.tfrecord_id_keys.split(",") if k.strip()),
      window_threshold=options.window_threshold, block_size=options.block_size,
      max_record_bytes=options.max_record_bytes)
  _check_inputs_match(list(options.input))
  _check_writable(rows_prefix, run_id)
  _check_writable(errors_prefix, run_id)
  if options.mask_geotiff_dir:
    if not options.outputs or OUTPUT_MASKS not in _parse_outputs(options.outputs):
      raise ConfigError("--mask_geotiff_dir needs masks: add 'masks' to --outputs")
    _check_writable(options.mask_geotiff_dir.rstrip("/") + "/mask", run_id)
  polygons_output, polygons = _polygons(options, outputs, run_id)
  patch_output, patch_size = _patches(options, outputs, run_id)
  store_confidence = OUTPUT_CONFIDENCE in outputs
  if polygons_output:   # polygons carry their mean confidence: maps are computed
    outputs = tuple(o for o in (OUTPUT_MASKS, OUTPUT_FEATURES, OUTPUT_CONFIDENCE)
                    if o in outputs or o == OUTPUT_CONFIDENCE)
  threads = _thread_pools(options)
  handle = _model_handle(options.model)
  # The hardware check means something before launch only where the workers run here.
  local = runs_on_this_machine(options)
  try:
    info = inspect_model(handle, options.model_cache_dir, keep_model_for_local_worker,
                         options.precision if local else FLOAT32,
                         options.precision_fallback if local else "float32",
                         threads if keep_model_for_local_worker else (0, 0))
  except (ModelLoadError, PrecisionUnsupportedError) as e:
    raise ConfigError(str(e)) from e
  labels = _resolve_labels(options, handle, info.local_dir) or labels_lib.generic_labels(
      info.num_classes)
  if not labels_lib.fits_model(labels, info.num_classes):
    raise ConfigError(f"the labels ({labels.name}) name {labels.num_classes} classes but "
                      f"model {handle} outputs {info.num_classes}: pass --labels_file with "
                      f"one class per output ({info.num_classes}; docs/models.md, 'Class names "
                      "and colours')")
  if info.num_classes > 255:
    raise ConfigError(f"model outputs {info.num_classes} classes; masks are 8-bit PNGs "
                      "and hold at most 255")
  if options.ignore_below is not None and info.num_classes > MAX_CLASSES_WITH_IGNORE:
    raise ConfigError(f"--ignore_below: model outputs {info.num_classes} classes; the ignore "
                      f"value {MAX_CLASSES_WITH_IGNORE} would be a class id")
  try:
    mapping = parse_channel_mapping(options.channel_mapping or labels.channel_mapping or "rgb")
  except ValueError as e:
    raise ConfigError(f"--channel_mapping: {e}") from e
  _check_optimized_shape(info, tiling)
  model_batch_size = options.model_batch_size or (
      OPENVINO_MODEL_BATCH if info.engine == "openvino" else 1)
  model = ModelConfig(handle, labels, info.feature_dim, info.has_fused_function,
                      options.model_cache_dir, mapping, options.precision,
                      options.precision_fallback, info.scores_kind, info.engine,
                      json.dumps(info.manifest, sort_keys=True) if info.manifest else "")
  inference = InferenceConfig(
      outputs=outputs, min_batch_size=1,
      max_batch_size=max(options.batch_size, model_batch_size),
      model_batch_size=model_batch_size,
      share_model_across_processes=options.share_model_across_processes,
      model_copies=options.model_copies, max_error_fraction=options.max_error_fraction,
      require_gpu=_asks_for_gpu(options), intra_op_threads=threads[0],
      inter_op_threads=threads[1], confidence_threshold=options.confidence_threshold,
      ignore_below=options.ignore_below, augmentation=augmentation, patch_size=patch_size)
  return JobConfig(
      input_patterns=tuple(options.input), output=rows_prefix, errors_output=errors_prefix,
      decode=decode,
      tiling=tiling,
      model=model, inference=inference, run_id=run_id, existing_rows=existing,
      existing_errors=existing_errors,
      max_error_fraction=options.max_error_fraction,
      mask_geotiff_dir=options.mask_geotiff_dir,
      polygons_output=polygons_output, polygons=polygons, store_confidence=store_confidence,
      patch_output=patch_output,
      progress=ProgressConfig(log_interval_s=options.progress_interval),
      progress_mode=options.progress)
