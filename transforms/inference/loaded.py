"""What every loaded model gives the handler, whatever engine runs it: the outputs of one
model call and the base both engines (model.py's TensorFlow, openvino_engine.py's
OpenVINO) share. Neither TensorFlow nor OpenVINO is imported here."""
from __future__ import annotations

import dataclasses
import uuid
from typing import Optional

import numpy as np

from transforms.tiling.channels import map_channels, to_unit_float


@dataclasses.dataclass(frozen=True)
class TileOutputs:
  """What one job model call returns for B tiles; None where not asked for."""
  class_ids: Optional[np.ndarray] = None         # (B, H, W) uint8
  confidence: Optional[np.ndarray] = None        # (B, H, W) uint8, max probability x 255
  pseudo_labels: Optional[np.ndarray] = None     # (B, H, W) uint8, IGNORE_VALUE if unsure
  qa_sums: Optional[np.ndarray] = None           # (B, 4) float64, confidence.QA_SUMS
  class_confidence_sums: Optional[np.ndarray] = None   # (B, classes) float64
  features: Optional[np.ndarray] = None          # (B, F) pooled sums
  patch_features: Optional[np.ndarray] = None    # (B, slots, F) sums per patch weight map


class LoadedModel:
  """The handler's view of a loaded model. Subclasses define infer_tiles (the job's call),
  infer (class ids and feature maps, for the benchmark and compare-precision) and probe."""

  engine = "tensorflow"

  def __init__(self, handle: str, local_dir: str, precision: str):
    self.handle = handle
    self.local_dir = local_dir
    self.manifest: Optional[dict] = None
    self.single_pass: Optional[str] = None   # the one-pass path used; None: two passes
    self.has_fused_function = False
    self.scores_kind = "logits"
    self.runs_at = precision   # the precision that really runs (after any fallback)
    self.fixed_shape: Optional[tuple] = None   # an optimized model's (B, H, W, C); -1: any
    self._id = uuid.uuid4().hex[:12]

  # Methods for what a shared model's proxy is asked (proxies carry methods only).
  def precision(self) -> str:
    """The precision that really runs."""
    return self.runs_at

  def load_id(self) -> str:
    """Unique per load: a metric of distinct ids counts the model copies that served."""
    return self._id

  def infer_pixel_tiles(self, pixels: np.ndarray, channel_mapping: str, want_masks: bool,
                        want_features: bool, cell_weights: np.ndarray,
                        pixel_weights: np.ndarray, *args, **kwargs) -> "TileOutputs":
    """infer_tiles on the tiles' own pixels: (B, H, W, bands) uint8 or uint16 and 0/1
    pixel weights in any dtype, scaled and mapped here by the functions the handler uses
    in a process of its own, so the outputs are the same bytes. What a caller of a shared
    model sends: a quarter of the bytes of float32 RGB for 8-bit RGB (the share's RPC
    pickles each argument, sends it over a socket and unpickles it: its cost grows with
    the bytes)."""
    images = np.ascontiguousarray(map_channels(to_unit_float(pixels), channel_mapping),
                                  np.float32)
    return self.infer_tiles(images, want_masks, want_features, cell_weights,
                            np.asarray(pixel_weights, np.float32), *args, **kwargs)

  def input_shape(self) -> Optional[tuple]:
    """An optimized model's (B, H, W, C), -1 where any size goes; None for SavedModels."""
    return self.fixed_shape
