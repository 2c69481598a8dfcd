"""Writing segmentation rows to Parquet (one explicit schema) and errors to JSON lines."""
from __future__ import annotations

import dataclasses
import json
import logging

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.parquetio import WriteToParquet

from transforms.timing import StageClock
from transforms.config import InferenceConfig, ModelConfig, TilingConfig
from transforms.inference.confidence import IGNORE_VALUE, PROBABILITIES
from transforms.types import NODATA_CLASS

__all__ = ["WriteSegmentations", "WriteErrors", "segmentation_schema"]

logger = logging.getLogger(__name__)

MASK_ENCODING = "PNG, 8-bit single channel, H x W; pixel value = index into class_names"

_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("mask_png", pa.binary()),
    pa.field("class_counts", pa.list_(pa.int64())),
    pa.field("pooled_features", pa.list_(pa.float32())),   # fixed size when computed
    pa.field("model", pa.string(), nullable=False),
    pa.field("precision", pa.string(), nullable=False),
    pa.field("valid_pixels", pa.int64(), nullable=False),
    pa.field("crs_wkt", pa.string()),
    pa.field("crs_epsg", pa.int32()),
    pa.field("transform", pa.list_(pa.float64())),
    pa.field("mask_geotiff", pa.string()),
    pa.field("block_y", pa.int32()),
    pa.field("block_x", pa.int32()),
    pa.field("mean_confidence", pa.float32()),
    pa.field("mean_margin", pa.float32()),
    pa.field("mean_entropy", pa.float32()),
    pa.field("low_confidence_fraction", pa.float32()),
    pa.field("class_mean_confidence", pa.list_(pa.float32())),
    pa.field("confidence_png", pa.binary()),
    pa.field("pseudo_label_png", pa.binary()),
    pa.field("augmentation", pa.string(), nullable=False),
    pa.field("engine", pa.string(), nullable=False),
]
_COLUMN_INDEX = {field.name: i for i, field in enumerate(_FIELDS)}


def row_dict(row) -> dict:
  """A Segmentation as the columns' values (patch sums travel on, unwritten)."""
  return {f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name != "patches"}


def vector_field(name: str, model: ModelConfig, meaning: str) -> pa.Field:
  """A non-null Arrow fixed-size list of float32: DuckDB casts it to FLOAT[F] (vss),
  LanceDB and pyarrow read it as a vector column. Its metadata names the model."""
  return pa.field(name, pa.list_(pa.float32(), model.feature_dim), nullable=False,
                  metadata={"hrnet_beam.model": model.handle,
                            "hrnet_beam.engine": model.engine,
                            "hrnet_beam.vector": meaning})


def fractions_type(class_names) -> pa.DataType:
  """One float32 per class, named by the labels: `class_fractions.building >= 0.3`."""
  return pa.struct([pa.field(name, pa.float32()) for name in class_names])


def segmentation_schema(model: ModelConfig, tiling: TilingConfig,
                        inference: InferenceConfig) -> pa.Schema:
  """The output schema; its metadata tells a reader everything needed to use the rows.

  pooled_features is a fixed-size vector column when features are computed (NaN for an
  image without a valid pixel: pyarrow cannot read nulls back from such a column), and
  a null list<float> column when they are not.
  """
  labels = model.labels
  fields = list(_FIELDS)
  if inference.want_features:
    fields[_COLUMN_INDEX["pooled_features"]] = vector_field(
        "pooled_features", model, "mean of the 1/4-resolution features over the image's "
        "valid pixels; NaN where it has none")
  fields.append(pa.field("class_fractions", fractions_type(labels.class_names)))
  metadata = {
      "hrnet_beam.model": model.handle,
      "hrnet_beam.class_names": json.dumps(list(labels.class_names)),
      "hrnet_beam.palette": json.dumps([list(c) for c in labels.palette]),
      "hrnet_beam.labels_note": labels.note,
      "hrnet_beam.num_classes": str(labels.num_classes),
      "hrnet_beam.feature_dim": str(model.feature_dim),
      "hrnet_beam.pooling": "mean over the image's pixels of the 1/4-resolution feature "
                            "of the cell each pixel falls in; each pixel counted once",
      "hrnet_beam.mask_encoding": MASK_ENCODING,
      "hrnet_beam.tile_size": str(tiling.tile_size),
      "hrnet_beam.tile_overlap": str(tiling.tile_overlap),
      "hrnet_beam.tile_grid": tiling.grid,
      "hrnet_beam.model_batch_size": str(inference.model_batch_size),
      "hrnet_beam.outputs": ",".join(inference.outputs),
      "hrnet_beam.channel_mapping": model.channel_mapping,
      "hrnet_beam.engine": model.engine,
      "hrnet_beam.optimized_model_manifest": model.manifest_json,
      "hrnet_beam.precision_requested": model.precision,
      "hrnet_beam.precision_fallback": model.precision_fallback,
      "hrnet_beam.precision_note": "each row's precision column says what its model ran at",
      "hrnet_beam.nodata_class": str(NODATA_CLASS),
      "hrnet_beam.nodata_note": f"mask value {NODATA_CLASS} marks nodata pixels (the "
                                "raster's nodata value, mask or alpha); they are left out "
                                "of class_counts, pooled_features and valid_pixels",
      "hrnet_beam.scores": model.scores_kind,
      "hrnet_beam.scores_note": ("predict returned probabilities (used as they are)"
                                 if model.scores_kind == PROBABILITIES else
                                 "predict returned logits: softmax applied where the model "
                                 "runs"),
      "hrnet_beam.class_fractions_note": "class_fractions: each class's share of the "
                                         "valid pixels; null without masks or valid "
                                         "pixels",
      "hrnet_beam.qa_note": "mean_confidence (max probability), mean_margin (top-1 minus "
                            "top-2), mean_entropy (divided by log(classes): 0 to 1) and "
                            "low_confidence_fraction (share below confidence_threshold) "
                            "over the valid pixels; class_mean_confidence: mean max "
                            "probability of the pixels of each class, null if absent",
      "hrnet_beam.confidence_threshold": str(inference.confidence_threshold),
      "hrnet_beam.confidence_encoding": "confidence_png: PNG, 8-bit, round(max probability "
                                        "x 255); nodata pixels 0",
      "hrnet_beam.ignore_below": "" if inference.ignore_below is None else str(
          inference.ignore_below),
      "hrnet_beam.ignore_value": str(IGNORE_VALUE),
      "hrnet_beam.pseudo_label_note": f"pseudo_label_png: the mask with {IGNORE_VALUE} where "
                                      "the max probability is below ignore_below; nodata "
                                      f"stays {NODATA_CLASS}",
      "hrnet_beam.augmentation": inference.augmentation.describe(),
      "hrnet_beam.augmentation_note": "masks, confidence and QA come from the probabilities "
                                      "averaged over the passes (each resized back to the "
                                      "tile, mirrors mirrored back); pooled_features from "
                                      "the tile as it is (scale 1, not mirrored)",
      "hrnet_beam.transform_order": "a,b,c,d,e,f (rasterio/affine): x = a*col + b*row + c, "
                                    "y = d*col + e*row + f, at pixel corners",
  }
  return pa.schema(fields, metadata=metadata)


class _RowDictFn(beam.DoFn):
  """Segmentation -> its columns' values, timed as the write stage (Beam's Parquet sink
  itself runs after it and is not in the figure)."""

  def __init__(self):
    self._clock = StageClock("write")

  def process(self, row):
    with self._clock:
      values = row_dict(row)
    yield values


class WriteSegmentations(beam.PTransform):
  """PCollection[Segmentation] -> Parquet files `<prefix>-SSSSS-of-NNNNN.parquet`.

  Beam's sink writes temporary files and renames them when the job ends, so a failed
  run leaves no partial Parquet file under the prefix. Usage:
      rows | WriteSegmentations("out/segmentations", schema)
  """

  def __init__(self, file_path_prefix: str, schema: pa.Schema):
    super().__init__()
    self._prefix = file_path_prefix
    self._schema = schema

  def expand(self, rows):
    return (
        rows
        | "AsDicts" >> beam.ParDo(_RowDictFn())
        # Rows carry mask PNGs of up to a few MB: small record batches bound the memory.
        | "WriteParquet" >> WriteToParquet(self._prefix, self._schema, record_batch_size=4,
                                           row_group_buffer_size=32 << 20,
                                           file_name_suffix=".parquet", codec="snappy"))


class WriteErrors(beam.PTransform):
  """PCollection[ErrorRecord] -> JSON lines `<prefix>-SSSSS-of-NNNNN.jsonl`, one per error."""

  def __init__(self, file_path_prefix: str):
    super().__init__()
    self._prefix = file_path_prefix

  def expand(self, errors):
    return (
        errors
        | "AsJson" >> beam.Map(lambda e: json.dumps(dataclasses.asdict(e), sort_keys=True))
        | "WriteErrors" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl"))
