"""The job's graph: `build_pipeline(p, cfg)` wires the stages and does no I/O itself."""
from __future__ import annotations

import dataclasses

import apache_beam as beam

from pipeline.job.config import JobConfig
from transforms.config import OUTPUT_CONFIDENCE
from transforms.embeddings import EmbedPatches
from transforms.inference import SegmentImages
from transforms.polygons import PolygonizeMasks
from transforms.reading import ReadImages
from transforms.writing import (WriteErrors, WriteMaskGeoTiffs, WritePatches, WritePolygons,
                                WriteSegmentations, segmentation_schema)


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
  if cfg.polygons_output:
    _ = (rows
         | "PolygonizeMasks" >> PolygonizeMasks(cfg.polygons, cfg.model.labels.class_names)
         | "WritePolygons" >> WritePolygons(cfg.polygons_output, cfg.run_id,
                                            cfg.model.handle, cfg.model.labels.class_names,
                                            cfg.polygons))
  if cfg.patch_output:
    _ = (rows
         | "EmbedPatches" >> EmbedPatches(cfg.model.labels.class_names)
         | "WritePatches" >> WritePatches(cfg.patch_output, cfg.run_id, cfg.model,
                                          cfg.model.labels.class_names,
                                          cfg.inference.patch_size))
  inference = cfg.inference
  if not cfg.store_confidence:
    rows = rows | "DropConfidence" >> beam.Map(
        lambda row: dataclasses.replace(row, confidence_png=None))
    inference = dataclasses.replace(inference, outputs=tuple(
        o for o in inference.outputs if o != OUTPUT_CONFIDENCE))
  _ = rows | "WriteSegmentations" >> WriteSegmentations(
      cfg.output, segmentation_schema(cfg.model, cfg.tiling, inference))
  _ = ((read_errors, segment_errors)
       | "AllErrors" >> beam.Flatten()
       | "WriteErrors" >> WriteErrors(cfg.errors_output))
