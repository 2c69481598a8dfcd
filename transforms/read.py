"""Reading images from file patterns (local or gs://) into decoded ImageRecords."""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.parquetio import ReadFromParquet

from transforms.budget import ErrorBudget
from transforms.config import DecodeConfig
from transforms.decode import DecodeError, decode_image
from transforms.model_handler import METRICS_NAMESPACE
from transforms.types import ErrorRecord, ImageRecord

__all__ = ["ReadImages"]

logger = logging.getLogger(__name__)

ERRORS = "errors"


class _DecodeFn(beam.DoFn):
  """ReadableFile -> ImageRecord, or an ErrorRecord (stage read/decode) on the errors output."""

  def __init__(self, config: DecodeConfig):
    self._config = config
    self._inputs = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "inputs")
    self._errors = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "decode_errors")
    self._budget = None

  def setup(self):
    self._budget = ErrorBudget(self._config.max_error_fraction, "read/decode")

  def _error(self, path: str, stage: str, reason: str):
    self._errors.inc()
    self._budget.record(failed=True)
    logger.warning("Skipping %s (%s): %s", path, stage, reason)
    return beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(path, path, stage, reason))

  def process(self, readable_file):
    path = readable_file.metadata.path
    self._inputs.inc()
    try:
      data = readable_file.read()
    except Exception as e:  # pylint: disable=broad-except
      yield self._error(path, "read", f"{type(e).__name__}: {e}")
      return
    try:
      pixels = decode_image(data, self._config.max_pixels)
    except DecodeError as e:
      yield self._error(path, "decode", str(e))
      return
    except MemoryError:
      yield self._error(path, "decode", "out of memory while decoding")
      return
    self._budget.record(failed=False)
    yield ImageRecord(path, path, pixels)


class _KeepNewFn(beam.DoFn):
  """(path, {'input': [...], 'done': [...]}) -> the path once, unless a row exists for it."""

  def __init__(self):
    self._skipped = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "skipped_existing")

  def process(self, keyed):
    path, seen = keyed
    if not seen["input"]:
      return
    if seen["done"]:
      self._skipped.inc()
      return
    yield FileMetadata(path, 0)


class ReadImages(beam.PTransform):
  """PBegin -> (PCollection[ImageRecord], PCollection[ErrorRecord]).

  Matches the patterns, drops files matched twice (and, given `existing_rows`, files
  that already have a row there), spreads files over workers, then reads and decodes
  each one. Usage:
      images, errors = p | ReadImages(["gs://bucket/tiles/*.png"], DecodeConfig())
  """

  def __init__(self, patterns: list[str], config: DecodeConfig,
               existing_rows: str | None = None):
    super().__init__()
    self._patterns = list(patterns)
    self._config = config
    self._existing_rows = existing_rows

  def expand(self, pbegin):
    inputs = (
        pbegin
        | "Patterns" >> beam.Create(self._patterns)
        | "MatchInputs" >> fileio.MatchAll()
        | "KeyInputs" >> beam.Map(lambda meta: (meta.path, None)))
    if self._existing_rows:
      done = (
          pbegin
          | "ReadExistingIds" >> ReadFromParquet(self._existing_rows, columns=["image_id"])
          | "KeyExisting" >> beam.Map(lambda row: (row["image_id"], None)))
    else:
      done = pbegin | "NothingDone" >> beam.Create([])
    # One shuffle by path: a file matched by two patterns is read once, files with rows
    # are skipped, and the files are spread over workers before the expensive steps.
    paths = (
        {"input": inputs, "done": done}
        | "OncePerFile" >> beam.CoGroupByKey()
        | "KeepNew" >> beam.ParDo(_KeepNewFn()))
    decoded = (
        paths
        | "ReadMatches" >> fileio.ReadMatches()
        | "Decode" >> beam.ParDo(_DecodeFn(self._config)).with_outputs(ERRORS, main="images"))
    return decoded.images, decoded[ERRORS]
