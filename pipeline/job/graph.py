"""The job's graph: `build_pipeline(p, cfg)` wires the stages and does no I/O itself."""
from __future__ import annotations

import apache_beam as beam

from pipeline.job.config import JobConfig
from transforms.inference import SegmentImages
from transforms.reading import ReadImages
from transforms.writing import (WriteErrors, WriteMaskGeoTiffs, WriteSegmentations,
                                segmentation_schema)


def build_pipeline(p: beam.Pipeline, cfg: JobConfig) -> None:
  """Files -> decoded images -> tiles -> RunInference -> stitched rows -> Parquet; errors aside."""
  images, read_errors = p | "ReadImages" >> ReadImages(
      list(cfg.input_patterns), cfg.decode, cfg.existing_rows, cfg.progress,
      existing_errors=cfg.existing_errors)
  rows, segment_errors = images | "SegmentImages" >> SegmentImages(
      cfg.tiling, cfg.model, cfg.inference, cfg.progress)
  if cfg.mask_geotiff_dir:
    rows = rows | "WriteMaskGeoTiffs" >> WriteMaskGeoTiffs(cfg.mask_geotiff_dir,
                                                           cfg.model.labels.palette)
  _ = rows | "WriteSegmentations" >> WriteSegmentations(
      cfg.output, segmentation_schema(cfg.model, cfg.tiling, cfg.inference))
  _ = ((read_errors, segment_errors)
       | "AllErrors" >> beam.Flatten()
       | "WriteErrors" >> WriteErrors(cfg.errors_output))
