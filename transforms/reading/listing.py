"""Streaming what a file pattern matches, in bounded memory, with Beam's names and rules.

`FileSystems.match` returns one list of every file a pattern matches, and for gs:// its
`GcsIO.list_files` also keeps a set of every name it has seen: at ten million objects, gigabytes
in the process that lists. `matching_files` yields the same `FileMetadata` (same paths, so
the ids of earlier runs still match for --skip_existing) while holding one directory entry
(local disks: os.scandir, directories walked one at a time) or one page of objects (gs://:
the storage client's pages of 1,000). Other file systems go through `FileSystems.match`.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems

__all__ = ["matching_files", "first_match"]

_GLOB = re.compile(r"^[^[*?]*")


def _normalized(pattern: str) -> str:
  # Beam: a pattern ending in a separator matches everything under it.
  return pattern + "*" if pattern.endswith(("/", "\\")) else pattern


def _local_files(pattern: str) -> Iterator[FileMetadata]:
  """Beam's LocalFileSystem.match, one entry at a time: the directory above the part before
  the first glob character, walked top-down; a path is `os.path.join(dirpath, name)` as
  os.walk (and so Beam) spells it. Directories deeper than the pattern can reach are not
  entered unless the pattern holds `**`."""
  prefix = _GLOB.match(pattern).group(0)
  if prefix == pattern:
    if os.path.exists(pattern):
      yield FileMetadata(pattern, os.path.getsize(pattern), os.path.getmtime(pattern))
    return
  root = os.path.dirname(prefix)
  if not os.path.exists(root):
    return
  match = re.compile(FileSystem.translate_pattern(pattern)).match
  # '*' stops at a separator, '?' and '[...]' match one character (a separator, at most):
  # without '**' no match lies deeper than this.
  rest = pattern[len(root):].strip("/")
  max_depth = None if "**" in pattern else sum(rest.count(c) for c in "/?[")
  stack = [(root, 0)]
  while stack:
    directory, depth = stack.pop()
    subdirectories = []
    try:
      entries = os.scandir(directory)
    except OSError:
      continue
    with entries:
      for entry in entries:
        try:
          is_dir = entry.is_dir()
        except OSError:
          continue
        path = os.path.join(directory, entry.name)
        if is_dir:
          if max_depth is None or depth < max_depth:
            subdirectories.append(path)
          continue
        if not match(path):
          continue
        try:
          stat = entry.stat()
        except OSError:   # gone since it was listed, as Beam skips it
          continue
        yield FileMetadata(path, stat.st_size, stat.st_mtime)
    stack.extend((d, depth + 1) for d in reversed(subdirectories))


def _gcs_files(pattern: str) -> Iterator[FileMetadata]:
  """Beam's GCSFileSystem.match (a listing of the part before the first glob character,
  filtered by the pattern), page by page through the storage client, without GcsIO's set of
  every name seen."""
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.gcp import gcsio
  prefix = _GLOB.match(pattern).group(0)
  bucket_name, object_prefix = gcsio.parse_gcs_path(prefix, object_optional=True)
  match = re.compile(FileSystem.translate_pattern(pattern)).match
  client = gcsio.GcsIO().client
  if prefix == pattern:
    blob = client.bucket(bucket_name).get_blob(object_prefix)
    if blob is not None:
      yield FileMetadata(pattern, blob.size, blob.updated.timestamp() if blob.updated else 0)
    return
  for blob in client.list_blobs(bucket_name, prefix=object_prefix, page_size=1000):
    path = f"gs://{bucket_name}/{blob.name}"
    if match(path):
      yield FileMetadata(path, blob.size, blob.updated.timestamp() if blob.updated else 0)


def matching_files(pattern: str) -> Iterator[FileMetadata]:
  """Every file the pattern matches, as FileSystems.match names them, streamed."""
  pattern = _normalized(pattern)
  scheme = FileSystems.get_scheme(pattern)
  if scheme is None:
    return _local_files(pattern)
  if scheme == "gs":
    return _gcs_files(pattern)
  return iter(FileSystems.match([pattern])[0].metadata_list)


def first_match(pattern: str) -> FileMetadata | None:
  """One file the pattern matches, or None; the listing stops at the first."""
  return next(iter(matching_files(pattern)), None)
