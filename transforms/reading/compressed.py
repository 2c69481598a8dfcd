"""Opening inputs so that decompression never makes more than a bounded piece at a time.

Beam's CompressedFile decompresses each 16 MiB of compressed input in one call with no
limit on the output: a 230:1 gzip stream becomes a 3.7 GB buffer. Here a file is opened
as its raw bytes and, when it is gzip (by its magic bytes, whatever its name), read
through Python's gzip reader, which inflates at most the bytes asked for per read. Whole
files are read in chunks up to a limit, so a small file that inflates past the limit is
an error after the limit, not an allocation of its full size.
"""
from __future__ import annotations

import gzip
import io
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 20     # bytes inflated per read when reading a whole file


class InflatesTooFar(ValueError):
  """A compressed file that inflates past the limit; nothing past it was held."""


def open_decompressed(path: str) -> BinaryIO:
  """The file's bytes, gunzipped (one layer) when they are gzip; reads are bounded."""
  raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  buffered = io.BufferedReader(raw) if not hasattr(raw, "peek") else raw
  if buffered.peek(2)[:2] == GZIP_MAGIC:
    return gzip.GzipFile(fileobj=buffered, mode="rb")
  return buffered


def read_bounded(stream: BinaryIO, limit: int) -> bytes:
  """All of the stream, or InflatesTooFar once it passes `limit` bytes."""
  chunks, total = [], 0
  while True:
    chunk = stream.read(min(CHUNK, limit + 1 - total))
    if not chunk:
      return b"".join(chunks)
    chunks.append(chunk)
    total += len(chunk)
    if total > limit:
      raise InflatesTooFar(f"it decompresses to more than {limit:,} bytes (--max_record_bytes);"
                           " the rest was not read")


def read_file(path: str, limit: int) -> bytes:
  with open_decompressed(path) as stream:
    return read_bounded(stream, limit)
