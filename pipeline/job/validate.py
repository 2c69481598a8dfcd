"""The job's flags validated into a frozen JobConfig before launch, one concern at a time:
the runner, the tiling, the inputs, the outputs (what is computed and where it goes), and
the model. Each concern is checked by one function, entered once, that returns its part
of the config or raises ConfigError saying what to fix."""
from __future__ import annotations

import dataclasses
import json
import os

from pipeline.job import outputs as outputs_lib
from pipeline.job.config import ConfigError, JobConfig
from pipeline.job.options import HRNetOptions, placement
from transforms import labels as labels_lib
from transforms.config import (GRID_FIT, DecodeConfig, InferenceConfig, ModelConfig,
                               TilingConfig)
from transforms.inference.confidence import MAX_CLASSES_WITH_IGNORE
from transforms.inference.model import inspect_model
from transforms.inference.precision import FLOAT32, PrecisionUnsupportedError
from transforms.inference.sources import ModelLoadError
from transforms.progress import ProgressConfig
from transforms.reading.listing import first_match
from transforms.tiling.channels import parse_channel_mapping
from transforms.tiling.grid import ALIGNMENT


def _positive(name: str, value) -> None:
  if value is not None and value < 1:
    raise ConfigError(f"--{name} {value}: must be at least 1")


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


OPENVINO_MODEL_BATCH = 2   # one tile per stream of a 2-vCPU worker: W48 int8, 3.5% more
                           # tiles/s than 1 (PERFORMANCE.md)


@dataclasses.dataclass(frozen=True)
class _Runner:
  threads: tuple            # (intra, inter) op threads; 0 leaves TensorFlow's default
  require_gpu: bool
  local: bool               # the workers are this machine's processes
  progress: ProgressConfig


def _runner(options: HRNetOptions) -> _Runner:
  """Batch sizes, counts and fractions, threads, the GPU request, progress."""
  if options.progress_interval <= 0:
    raise ConfigError(f"--progress_interval {options.progress_interval}: use seconds > 0")
  for name in ("batch_size", "model_batch_size", "max_pixels", "model_copies",
               "window_threshold", "block_size", "max_record_bytes"):
    _positive(name, getattr(options, name))
  if options.max_error_fraction is not None and not 0 <= options.max_error_fraction < 1:
    raise ConfigError(f"--max_error_fraction {options.max_error_fraction}: use a fraction "
                      "in [0, 1), e.g. 0.05")
  local, asks_for_gpu = placement(options)
  return _Runner(_thread_pools(options), asks_for_gpu, local,
                 ProgressConfig(log_interval_s=options.progress_interval))


def _tiling(options: HRNetOptions) -> TilingConfig:
  tile_size, overlap = options.tile_size, options.tile_overlap
  if tile_size < ALIGNMENT or tile_size % ALIGNMENT:
    raise ConfigError(f"--tile_size {tile_size}: use a multiple of {ALIGNMENT} (e.g. 512)")
  if overlap < 0 or overlap % ALIGNMENT or overlap >= tile_size:
    raise ConfigError(f"--tile_overlap {overlap}: use a multiple of {ALIGNMENT} below "
                      f"--tile_size {tile_size} (e.g. 64)")
  return TilingConfig(tile_size, overlap, options.tile_grid or GRID_FIT)


def _inputs(options: HRNetOptions) -> DecodeConfig:
  """How inputs are read; each pattern proved to match a file (its first match only)."""
  decode = DecodeConfig(
      options.max_pixels, options.max_error_fraction, options.input_format,
      options.tfrecord_image_key,
      tuple(k.strip() for k in options.tfrecord_id_keys.split(",") if k.strip()),
      window_threshold=options.window_threshold, block_size=options.block_size,
      max_record_bytes=options.max_record_bytes)
  _check_inputs_match(list(options.input))
  return decode


def _model(options: HRNetOptions, tiling: TilingConfig, runner: _Runner,
           keep_model_for_local_worker: bool) -> tuple:
  """(ModelConfig, model batch size): the model loaded (or inspected) once, its labels,
  classes, preprocessing and input shape checked against the job."""
  handle = _model_handle(options.model)
  # The hardware check means something before launch only where the workers run here.
  try:
    info = inspect_model(handle, options.model_cache_dir, keep_model_for_local_worker,
                         options.precision if runner.local else FLOAT32,
                         options.precision_fallback if runner.local else "float32",
                         runner.threads if keep_model_for_local_worker else (0, 0))
  except (ModelLoadError, PrecisionUnsupportedError) as e:
    raise ConfigError(str(e)) from e
  try:
    labels, fits = labels_lib.labels_for_model(handle, info.local_dir, info.num_classes,
                                               options.labels_file)
  except (OSError, ValueError) as e:
    where = (f"--labels_file {options.labels_file}" if options.labels_file else
             f"{info.local_dir}/{labels_lib.MODEL_LABELS_FILE}")
    raise ConfigError(f"{where}: {e}") from e
  if not fits:
    raise ConfigError(f"the labels ({labels.name}) name {len(labels.class_names)} classes but "
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
  return model, model_batch_size


def job_config_from_options(options: HRNetOptions,
                            keep_model_for_local_worker: bool = False) -> JobConfig:
  """Checks every flag, the inputs and the model; raises ConfigError saying what to fix."""
  if not options.input:
    raise ConfigError("--input is required: a file pattern such as 'images/*.png' or "
                      "'gs://bucket/tiles/*.tif'")
  if not options.output:
    raise ConfigError("--output is required: a prefix such as 'out/segmentations' or "
                      "'gs://bucket/out/segmentations'")
  runner = _runner(options)
  tiling = _tiling(options)
  decode = _inputs(options)    # before _outputs writes its markers: a bad pattern leaves
  out = outputs_lib.plan(options)   # nothing behind
  model, model_batch_size = _model(options, tiling, runner, keep_model_for_local_worker)
  inference = InferenceConfig(
      outputs=out.computed, min_batch_size=1,
      max_batch_size=max(options.batch_size, model_batch_size),
      model_batch_size=model_batch_size,
      share_model_across_processes=options.share_model_across_processes,
      model_copies=options.model_copies, max_error_fraction=options.max_error_fraction,
      require_gpu=runner.require_gpu, intra_op_threads=runner.threads[0],
      inter_op_threads=runner.threads[1], confidence_threshold=options.confidence_threshold,
      ignore_below=options.ignore_below, augmentation=out.augmentation,
      patch_size=out.patch_size)
  return JobConfig(
      input_patterns=tuple(options.input), output=out.rows, errors_output=out.errors,
      decode=decode, tiling=tiling, model=model, inference=inference, run_id=out.run_id,
      existing_rows=out.existing_rows, existing_errors=out.existing_errors,
      max_error_fraction=options.max_error_fraction, mask_geotiff_dir=out.mask_geotiff_dir,
      polygons_output=out.polygons_output, polygons=out.polygons,
      store_confidence=out.store_confidence, patch_output=out.patch_output,
      progress=runner.progress, progress_mode=options.progress,
      stats_output=options.stats_output)
