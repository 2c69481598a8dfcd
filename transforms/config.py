"""Frozen configuration passed to the transforms; built once from the options, before launch."""
from __future__ import annotations

import dataclasses

from transforms.augmentation import Augmentation
from transforms.labels import LabelSet

OUTPUT_MASKS = "masks"
OUTPUT_FEATURES = "features"
OUTPUT_CONFIDENCE = "confidence"   # a confidence PNG per row, beside the mask


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  max_pixels: int = 100_000_000
  max_error_fraction: float | None = None
  input_format: str = "auto"              # auto (by extension), image, tfrecord or tar
  tfrecord_image_key: str = "image/encoded"
  tfrecord_id_keys: tuple = ("image/filename", "image/id")
  window_threshold: int = 64_000_000   # TIFFs above this many pixels are read by block
  block_size: int = 4096               # block side for those; one row per block
  max_record_bytes: int = 1 << 30      # larger files and shard records are errors, unread


GRID_FIT = "fit"       # the fewest tiles that cover the image, each shrunk to fit it
GRID_FIXED = "fixed"   # every tile tile_size, the last ones padded (before 2026-11)


@dataclasses.dataclass(frozen=True)
class TilingConfig:
  tile_size: int = 512
  tile_overlap: int = 64
  grid: str = GRID_FIT


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which model, where it is staged on workers, and what it was found to be at launch."""
  handle: str
  labels: LabelSet
  feature_dim: int
  has_fused_function: bool
  cache_dir: str
  channel_mapping: str = "rgb"   # how decoded RGB becomes the model's input (tiling.py)
  precision: str = "float32"     # float32, bfloat16 or float16 (precision.py)
  precision_fallback: str = "float32"   # where unsupported: run float32, or "fail"
  scores_kind: str = "logits"    # what predict returns, found at load: probabilities or logits
  engine: str = "tensorflow"     # or "openvino": an optimized model (hrnet-beam optimize)
  manifest_json: str = ""        # an optimized model's manifest, for the files' metadata

  @property
  def num_classes(self) -> int:
    return self.labels.num_classes


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
  outputs: tuple = (OUTPUT_MASKS, OUTPUT_FEATURES)
  min_batch_size: int = 1
  max_batch_size: int = 4      # tiles RunInference hands to the handler at once
  model_batch_size: int = 1    # tiles per model call, a fixed shape (padded): see handler
  share_model_across_processes: bool = False
  model_copies: int | None = None
  max_error_fraction: float | None = None
  require_gpu: bool = False    # workers fail at model load if TensorFlow sees no GPU
  intra_op_threads: int = 0    # TensorFlow's thread pools per process; 0: TF's default
  inter_op_threads: int = 0
  confidence_threshold: float = 0.5     # pixels below it count in low_confidence_fraction
  ignore_below: float | None = None     # pseudo-label masks: IGNORE_VALUE below this
  augmentation: Augmentation = Augmentation()   # test-time augmentation (--tta)
  patch_size: int | None = None         # patch embeddings pooled where the model runs

  @property
  def want_masks(self) -> bool:
    return OUTPUT_MASKS in self.outputs

  @property
  def want_features(self) -> bool:
    return OUTPUT_FEATURES in self.outputs

  @property
  def want_confidence(self) -> bool:
    return OUTPUT_CONFIDENCE in self.outputs


@dataclasses.dataclass(frozen=True)
class PolygonConfig:
  """How masks become polygons (--polygons_output); sizes in pixels of the source."""
  min_area_px: int = 0          # regions with fewer pixels are dropped
  simplify_px: float = 0.0      # Douglas-Peucker tolerance (topology-preserving)
  denoise_px: int = 0           # sieve: regions below this take their largest neighbour's class
