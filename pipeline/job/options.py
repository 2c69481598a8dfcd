"""The job's flags: HRNetOptions (in the groups `run --help` shows), Beam's flags beside them,
and the check that every flag given is one of them. Validation into a frozen JobConfig is
pipeline/job/validate.py; output naming is pipeline/job/outputs.py."""
from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,
                                                  StandardOptions)

from pipeline.job.config import ConfigError
from pipeline.job.progress import MODES as PROGRESS_MODES
from transforms.config import (GRID_FIT, GRID_FIXED, OUTPUT_FEATURES, OUTPUT_MASKS,
                               DecodeConfig)
from transforms.embeddings.patches import MIN_PATCH_SIZE
from transforms.inference.precision import FALLBACKS, FLOAT32, PRECISIONS
from transforms.inference.sources import DEFAULT_CACHE_DIR
from transforms.tiling.grid import ALIGNMENT

DEFAULT_MODEL = "https://tfhub.dev/google/HRNet/isprs-hrnetv2-w48/1"
LOCAL_RUNNER_NAMES = (None, "DirectRunner", "SwitchingDirectRunner")


def runs_on_this_machine(options: PipelineOptions) -> bool:
  """Whether the workers are this machine's processes (the local runner)."""
  return options.view_as(StandardOptions).runner in LOCAL_RUNNER_NAMES


def placement(options) -> tuple[bool, bool]:
  """(the workers are this machine's processes, the job asks for a GPU)."""
  service_options = options.get_all_options().get("dataflow_service_options") or []
  asks_for_gpu = options.require_gpu or any("worker_accelerator" in o for o in service_options)
  return runs_on_this_machine(options), asks_for_gpu


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
        help="Where workers copy a gs:// model before loading it (once per machine), "
        "and where OpenVINO keeps an optimized model's compiled forms (openvino-blobs/: "
        "compiled once per machine, then read).")

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
        help="Load one model per machine, shared by all its worker processes (Beam's "
             "MultiProcessShared: callers send their tiles' own pixels by RPC).")

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
    groups["runner"].add_argument(
        "--stats_output", default=None,
        help="Also write where the job's time went, per stage (seconds and ms per tile), "
             "as JSON to this path (local or gs://); the same figures end the job's output "
             "in one line and are Beam metrics stage_us_<stage>.")


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
