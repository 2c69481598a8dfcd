"""Reading image shards record by record: TFRecord of tf.train.Example, and WebDataset tar.

Pure iterators over an open binary stream; no Beam. A damaged shard yields the records
before the damage, then raises ShardError saying where it stopped.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import tarfile
from typing import BinaryIO, Iterator, Optional

import google_crc32c

FORMAT_IMAGE, FORMAT_TFRECORD, FORMAT_TAR = "image", "tfrecord", "tar"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "tif", "tiff", "webp", "bmp", "gif")
_TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrecord.gz", ".tfrecords.gz", ".tfr")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardError(ValueError):
  """The shard is damaged from some record on; the records before it were yielded."""


@dataclasses.dataclass(frozen=True)
class ShardRecord:
  """One record of a shard: its index, its key (id or index), and the encoded image,
  or the reason the record holds no usable image."""
  index: int
  key: str
  data: Optional[bytes]
  problem: Optional[str] = None


def detect_format(path: str) -> str:
  name = path.lower()
  if name.endswith(_TFRECORD_SUFFIXES):
    return FORMAT_TFRECORD
  if name.endswith(_TAR_SUFFIXES):
    return FORMAT_TAR
  return FORMAT_IMAGE


def _masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_payloads(stream: BinaryIO) -> Iterator[bytes]:
  """The records of a TFRecord stream (already decompressed), CRCs checked."""
  index = 0
  while True:
    header = stream.read(12)
    if not header:
      return
    if len(header) < 12:
      raise ShardError(f"truncated at record {index} (incomplete header)")
    length, length_crc = struct.unpack("<QI", header)
    if _masked_crc(header[:8]) != length_crc:
      raise ShardError(f"corrupt at record {index} (length checksum mismatch)")
    payload = stream.read(length)
    footer = stream.read(4)
    if len(payload) < length or len(footer) < 4:
      raise ShardError(f"truncated at record {index} ({len(payload)} of {length} bytes)")
    if _masked_crc(payload) != struct.unpack("<I", footer)[0]:
      raise ShardError(f"corrupt at record {index} (data checksum mismatch)")
    yield payload
    index += 1


def tfrecord_examples(stream: BinaryIO, image_key: str,
                      id_keys: tuple) -> Iterator[ShardRecord]:
  """tf.train.Example records -> ShardRecords (image under `image_key`, id under an id key)."""
  from tensorflow.core.example import example_pb2  # pylint: disable=import-outside-toplevel
  for index, payload in enumerate(tfrecord_payloads(stream)):
    key = str(index)
    try:
      features = example_pb2.Example.FromString(payload).features.feature
    except Exception as e:  # pylint: disable=broad-except  # protobuf DecodeError
      yield ShardRecord(index, key, None, f"record {index} is not a tf.train.Example: {e}")
      continue
    for id_key in id_keys:
      values = features[id_key].bytes_list.value if id_key in features else []
      if values:
        key = values[0].decode("utf-8", "replace")
        break
    images = features[image_key].bytes_list.value if image_key in features else []
    if not images:
      yield ShardRecord(index, key, None, f"record {index} has no '{image_key}' bytes")
      continue
    yield ShardRecord(index, key, bytes(images[0]))


def _webdataset_key(member_name: str) -> tuple[str, str]:
  """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'): the key runs to the basename's first dot."""
  directory, base = os.path.split(member_name)
  stem, _, extension = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), extension.lower()


def tar_samples(stream: BinaryIO) -> Iterator[ShardRecord]:
  """WebDataset tar (plain or gzip): consecutive members sharing a key form one sample,
  and the sample's image is its member with an image extension."""
  index = 0
  current_key, files = None, {}

  def sample():
    image = next((files[e] for e in files if e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image is None:
      return ShardRecord(index, current_key, None,
                         f"sample {index} ({current_key}) has no image member "
                         f"(members: {', '.join(sorted(files))})")
    return ShardRecord(index, current_key, image)

  try:
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
      for member in archive:
        if not member.isfile():
          continue
        key, extension = _webdataset_key(member.name)
        if key != current_key and current_key is not None:
          yield sample()
          index += 1
          files = {}
        current_key = key
        files[extension] = archive.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, struct.error) as e:
    raise ShardError(f"damaged after sample {index} ({type(e).__name__}: {e})") from e
  if current_key is not None:
    yield sample()
