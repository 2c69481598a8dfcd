"""The job's configuration: validated once from the options, before launch, then frozen."""
from __future__ import annotations

import dataclasses

from transforms.config import (DecodeConfig, InferenceConfig, ModelConfig, PolygonConfig,
                               TilingConfig)
from transforms.progress import ProgressConfig


class ConfigError(ValueError):
  """A flag or input that cannot work; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class JobConfig:
  input_patterns: tuple
  output: str                   # file prefix of this run's Parquet files
  errors_output: str            # file prefix of this run's error records
  decode: DecodeConfig
  tiling: TilingConfig
  model: ModelConfig
  inference: InferenceConfig
  run_id: str = ""
  existing_rows: str | None = None   # pattern of earlier runs' Parquet files to skip
  existing_errors: str | None = None  # pattern of earlier runs' error files to skip
  max_error_fraction: float | None = None
  mask_geotiff_dir: str | None = None   # where georeferenced masks go as COGs
  polygons_output: str | None = None    # GeoParquet prefix for polygons (--polygons_output)
  polygons: PolygonConfig = PolygonConfig()
  patch_output: str | None = None       # GeoParquet prefix for patch embeddings
  store_confidence: bool = True         # False: confidence maps were computed for the
                                        # polygons only and stay out of the Parquet rows
  progress: ProgressConfig = ProgressConfig()
  progress_mode: str = "auto"          # auto, bar, lines or off (progress.py)
  stats_output: str | None = None      # where the per-stage time JSON goes (--stats_output)
