"""Reading images from file patterns (local or gs://): single image files and shards."""
from __future__ import annotations

import json
import logging

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.parquetio import ReadFromParquet

from transforms.budget import ErrorBudget
from transforms.config import DecodeConfig
from transforms.reading.decode import DecodeError, decode_raster, read_block
from transforms.reading import geotiff as geo
from transforms.metrics import METRICS_NAMESPACE
from transforms.timing import StageClock, timed_iter
from transforms.progress import ProgressConfig, ProgressReporter
from transforms.reading.compressed import open_decompressed, read_file
from transforms.reading.listing import matching_files
from transforms.reading.shards import (FORMAT_IMAGE, FORMAT_TFRECORD, ShardError,
                               detect_format, tar_samples, tfrecord_examples)
from transforms.types import EncodedImage, ErrorRecord, ImageRecord, RasterBlock

__all__ = ["ReadImages"]

logger = logging.getLogger(__name__)

ERRORS = "errors"


def _error_output(errors_counter, budget, progress, record: ErrorRecord):
  errors_counter.inc()
  progress.add(done=1, errors=1)
  budget.record(failed=True)
  logger.warning("Skipping %s (%s): %s", record.image_id, record.stage, record.reason)
  return beam.pvalue.TaggedOutput(ERRORS, record)


class _DecodeFn(beam.DoFn):
  """ReadableFile or EncodedImage -> ImageRecord, or an ErrorRecord on the errors output."""

  def __init__(self, config: DecodeConfig, progress: ProgressConfig):
    self._clock = StageClock("read")
    self._config = config
    self._progress_config = progress
    self._inputs = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "inputs")
    self._errors = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "decode_errors")
    self._budget = None
    self._progress = None

  def setup(self):
    self._budget = ErrorBudget(self._config.max_error_fraction, "read/decode")
    self._progress = ProgressReporter(self._progress_config, "decode")

  def finish_bundle(self):
    self._progress.flush()

  def _error(self, image_id: str, source: str, stage: str, reason: str):
    return _error_output(self._errors, self._budget, self._progress,
                         ErrorRecord(image_id, source, stage, reason))

  def process(self, element):
    yield from timed_iter(self._clock, self._process(element))

  def _process(self, element):
    self._inputs.inc()
    if isinstance(element, RasterBlock):
      yield from self._read_block(element)
      return
    if isinstance(element, EncodedImage):
      image_id, source, data = element.image_id, element.source, element.data
    else:
      image_id = source = element.metadata.path
      size, limit = element.metadata.size_in_bytes, self._config.max_record_bytes
      if size > limit:
        yield self._error(image_id, source, "read",
                          f"file is {size:,} bytes, above the limit of {limit:,} bytes "
                          "(--max_record_bytes); not read")
        return
      try:
        data = read_file(element.metadata.path, limit)
      except Exception as e:  # pylint: disable=broad-except
        yield self._error(image_id, source, "read", f"{type(e).__name__}: {e}")
        return
    try:
      raster = decode_raster(data, self._config.max_pixels)
    except DecodeError as e:
      yield self._error(image_id, source, "decode", str(e))
      return
    except MemoryError:
      yield self._error(image_id, source, "decode", "out of memory while decoding")
      return
    decoded = raster.pixels.nbytes
    if decoded > self._config.max_record_bytes:
      # Under --max_pixels but many bands deep: never let such an element reach a runner.
      yield self._error(image_id, source, "decode",
                        f"decoded pixels are {decoded:,} bytes {raster.pixels.shape}, above "
                        f"--max_record_bytes={self._config.max_record_bytes:,}")
      return
    self._budget.record(failed=False)
    yield ImageRecord(image_id, source, raster.pixels, raster.geo, raster.valid)


  def _read_block(self, block: RasterBlock):
    try:
      raster = read_block(block)
    except DecodeError as e:
      yield self._error(block.image_id, block.source, "decode", str(e))
      return
    self._budget.record(failed=False)
    yield ImageRecord(block.image_id, block.source, raster.pixels, raster.geo, raster.valid,
                      (block.y, block.x))


_TIFF_EXTENSIONS = (".tif", ".tiff")


def may_expand(path: str, config: DecodeConfig) -> bool:
  """Whether one matched file can become several inputs (a shard's records, or a TIFF
  above --window_threshold read by blocks): known only once the job has opened it."""
  return (_format_of(path, config) != FORMAT_IMAGE or
          path.lower().endswith(_TIFF_EXTENSIONS))


class _PlanRastersFn(beam.DoFn):
  """FileMetadata -> itself, or, for a TIFF above the window threshold, its blocks as
  (image_id, RasterBlock) on the 'blocks' output: such a raster is never decoded whole.

  Only the header is read here (byte ranges through rasterio, gs:// included); a file
  whose header cannot be read goes on as a plain file and its decoder says why.
  """

  def __init__(self, config: DecodeConfig, progress: ProgressConfig):
    self._clock = StageClock("read")
    self._config = config
    self._progress_config = progress
    self._rasters = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "windowed_rasters")
    self._progress = None

  def setup(self):
    self._progress = ProgressReporter(self._progress_config, "plan")

  def finish_bundle(self):
    self._progress.flush()

  def process(self, meta):
    yield from timed_iter(self._clock, self._process(meta))

  def _process(self, meta):
    if not meta.path.lower().endswith(_TIFF_EXTENSIONS):
      yield meta
      return
    try:
      height, width = geo.raster_size(meta.path)
    except Exception:  # pylint: disable=broad-except
      self._progress.add(resolved=1)
      yield meta
      return
    if height * width <= self._config.window_threshold:
      self._progress.add(resolved=1)
      yield meta
      return
    self._rasters.inc()
    blocks = geo.block_grid(height, width, self._config.block_size)
    self._progress.add(found=len(blocks) - 1, resolved=1)
    logger.info("%s: %dx%d pixels, above --window_threshold: read as %d blocks of %d",
                meta.path, width, height, len(blocks), self._config.block_size)
    for y, x, block_height, block_width in blocks:
      image_id = f"{meta.path}#block={y},{x}"
      yield beam.pvalue.TaggedOutput(BLOCKS, (image_id, RasterBlock(
          image_id, meta.path, y, x, block_height, block_width)))


BLOCKS = "blocks"


class _ShardRecordsFn(beam.DoFn):
  """A shard (ReadableFile) -> (image_id, EncodedImage) per record, or (image_id,
  ErrorRecord) for a bad record and for the damaged remainder of a shard. Errors are keyed
  like records so that a rerun skips them too; _KeepNewFn counts and reports them."""

  def __init__(self, config: DecodeConfig, progress: ProgressConfig):
    self._clock = StageClock("read")
    self._config = config
    self._progress_config = progress
    self._records = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "shard_records")
    self._progress = None

  def setup(self):
    self._progress = ProgressReporter(self._progress_config, "shards")

  def finish_bundle(self):
    self._progress.flush()

  @staticmethod
  def _error(image_id: str, shard: str, reason: str):
    return image_id, ErrorRecord(image_id, shard, "read", reason)

  def process(self, readable_file):
    yield from timed_iter(self._clock, self._process(readable_file))

  def _process(self, readable_file):
    shard = readable_file.metadata.path
    shard_format = _format_of(shard, self._config)
    count = 0
    try:
      with open_decompressed(shard) as stream:
        if shard_format == FORMAT_TFRECORD:
          records = tfrecord_examples(stream, self._config.tfrecord_image_key,
                                      tuple(self._config.tfrecord_id_keys),
                                      self._config.max_record_bytes)
        else:
          records = tar_samples(stream, self._config.max_record_bytes)
        for record in records:
          count += 1
          image_id = f"{shard}#{record.key}"
          if record.problem:
            yield self._error(image_id, shard, record.problem)
          else:
            self._records.inc()
            yield image_id, EncodedImage(image_id, shard, record.data)
    except ShardError as e:
      count += 1
      yield self._error(f"{shard}#damaged-from-{count - 1}", shard,
                        f"shard {e}: {count - 1} records read before it, the rest are lost")
    except Exception as e:  # pylint: disable=broad-except  # unreadable, not gzip, ...
      count += 1
      yield self._error(f"{shard}#damaged-from-{count - 1}", shard,
                        f"cannot read shard after {count - 1} records: {type(e).__name__}: "
                        f"{e}")
    # The shard counted as one input until now; it is `count` inputs.
    self._progress.add(found=count - 1, resolved=1)


class _KeepNewFn(beam.DoFn):
  """(id, {'input': [...], 'done': [...]}) -> the input once, unless an earlier run wrote a
  row or an error for id. An ErrorRecord input (a bad shard record) goes to the errors
  output. A second input with the same id (a shard with a repeated key) is reported, not
  dropped.
  """

  def __init__(self, config: DecodeConfig, progress: ProgressConfig):
    self._config = config
    self._progress_config = progress
    self._skipped = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "skipped_existing")
    self._inputs = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "inputs")
    self._errors = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "decode_errors")
    self._progress = None
    self._budget = None

  def setup(self):
    self._progress = ProgressReporter(self._progress_config, "skip")
    self._budget = ErrorBudget(self._config.max_error_fraction, "read")

  def _error(self, record: ErrorRecord):
    self._inputs.inc()
    return _error_output(self._errors, self._budget, self._progress, record)

  def finish_bundle(self):
    self._progress.flush()

  def process(self, keyed):
    image_id, seen = keyed
    inputs = list(seen["input"])
    if not inputs:
      return
    first = inputs[0]
    is_file = isinstance(first, FileMetadata)
    if is_file:   # a path matched by two patterns is one input
      self._progress.add(checked=len(inputs), duplicates=len(inputs) - 1)
    if seen["done"]:
      self._skipped.inc(1 if is_file else len(inputs))
      self._progress.add(done=1 if is_file else len(inputs))
      return
    if is_file and may_expand(first.path, self._config):
      self._progress.add(expandable=1)
    yield self._error(first) if isinstance(first, ErrorRecord) else first
    for duplicate in inputs[1:]:
      # The same file matched twice is just one input; records are each an input.
      if isinstance(duplicate, ErrorRecord):
        yield self._error(duplicate)
      elif isinstance(duplicate, EncodedImage):
        yield self._error(ErrorRecord(
            image_id, duplicate.source, "read",
            "another record of this shard has the same key; only the first is processed"))


class _ListFilesFn(beam.DoFn):
  """A pattern -> the files it matches, streamed as they are listed (one directory entry or
  one page of objects held at a time), each counted for the progress total."""

  def __init__(self, progress: ProgressConfig):
    self._progress_config = progress
    self._progress = None

  def setup(self):
    self._progress = ProgressReporter(self._progress_config, "list")

  def finish_bundle(self):
    self._progress.flush()

  def process(self, pattern):
    for meta in matching_files(pattern):
      self._progress.add(listed=1)
      yield meta.path, FileMetadata(meta.path, meta.size_in_bytes)
    self._progress.add(patterns=1)


def _format_of(path: str, config: DecodeConfig) -> str:
  return detect_format(path) if config.input_format == "auto" else config.input_format


class ReadImages(beam.PTransform):
  """PBegin -> (PCollection[ImageRecord], PCollection[ErrorRecord]).

  Matches the patterns; image files are read once each (a file matched by two patterns
  too), shards (TFRecord, WebDataset tar) are expanded into records. Files, then shard
  records, are shuffled by id so work spreads over workers and, given `existing_rows`,
  ids that already have a row or an error from an earlier run are skipped. Usage:
      images, errors = p | ReadImages(["gs://bucket/tiles/*.png"], DecodeConfig())
  """

  def __init__(self, patterns: list[str], config: DecodeConfig,
               existing_rows: str | None = None, progress: ProgressConfig = ProgressConfig(),
               existing_errors: str | None = None):
    super().__init__()
    self._patterns = list(patterns)
    self._config = config
    self._existing_rows = existing_rows
    self._existing_errors = existing_errors
    self._progress = progress

  def expand(self, pbegin):
    config, progress = self._config, self._progress
    earlier = []
    if self._existing_rows:
      earlier.append(
          pbegin
          | "ReadExistingIds" >> ReadFromParquet(self._existing_rows, columns=["image_id"])
          | "RowIds" >> beam.Map(lambda row: row["image_id"]))
    if self._existing_errors:
      earlier.append(
          pbegin
          | "ReadExistingErrors" >> beam.io.ReadFromText(self._existing_errors)
          | "ErrorIds" >> beam.Map(lambda line: json.loads(line)["image_id"]))
    if earlier:
      done = (earlier | "EarlierIds" >> beam.Flatten()
              | "KeyExisting" >> beam.Map(lambda image_id: (image_id, None)))
    else:
      done = pbegin | "NothingDone" >> beam.Create([])
    files = (
        {"input": (pbegin
                   | "Patterns" >> beam.Create(self._patterns)
                   | "MatchInputs" >> beam.ParDo(_ListFilesFn(progress))),
         "done": done}
        | "OncePerFile" >> beam.CoGroupByKey()
        | "KeepNewFiles" >> beam.ParDo(_KeepNewFn(config, progress)).with_outputs(
            ERRORS, main="files"))
    image_files, shard_files = files.files | "ByFormat" >> beam.Partition(
        lambda meta, _: 0 if _format_of(meta.path, config) == FORMAT_IMAGE else 1, 2)
    planned = image_files | "PlanRasters" >> beam.ParDo(_PlanRastersFn(config, progress)).with_outputs(
        BLOCKS, main="files")
    readable_files = planned.files | "ReadMatches" >> fileio.ReadMatches()
    records = (
        shard_files
        | "ReadShardMatches" >> fileio.ReadMatches()
        | "ReadShards" >> beam.ParDo(_ShardRecordsFn(config, progress)))
    # The second shuffle fans a few huge shards out over all workers, record by record,
    # and the blocks of huge rasters, block by block.
    records_and_blocks = ((records, planned[BLOCKS])
                          | "RecordsAndBlocks" >> beam.Flatten())
    new_records = (
        {"input": records_and_blocks, "done": done}
        | "OncePerRecord" >> beam.CoGroupByKey()
        | "KeepNewRecords" >> beam.ParDo(_KeepNewFn(config, progress)).with_outputs(
            ERRORS, main="records"))
    # Flatten before decoding, not after: a runner that materializes a flatten's inputs
    # between stages (the local one does) then holds file handles and encoded records,
    # not every decoded image of the job (measured: 5.5 GB for one 20000^2 raster).
    decoded = (
        (readable_files, new_records.records)
        | "FilesAndRecords" >> beam.Flatten()
        | "Decode" >> beam.ParDo(_DecodeFn(config, progress)).with_outputs(
            ERRORS, main="images"))
    images = decoded.images
    errors = ((files[ERRORS], new_records[ERRORS], decoded[ERRORS])
              | "AllReadErrors" >> beam.Flatten())
    return images, errors
