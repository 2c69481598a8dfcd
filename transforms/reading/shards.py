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


SKIP_CHUNK = 8 << 20   # bytes read at a time when passing over a record that is too large


@dataclasses.dataclass(frozen=True)
class TooLarge:
  """A record passed over without being held in memory: its name and size in bytes."""
  name: str
  size: int

  def reason(self, limit: int) -> str:
    return (f"{self.name} is {self.size:,} bytes, above the record limit of {limit:,} bytes "
            "(--max_record_bytes); it was passed over, not read into memory")


def _mask(crc: int) -> int:
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  return _mask(google_crc32c.value(data))


def _skip_payload(stream: BinaryIO, length: int, index: int) -> int:
  """Reads past `length` bytes in chunks; returns their masked CRC."""
  checksum, left = google_crc32c.Checksum(), length
  while left:
    chunk = stream.read(min(left, SKIP_CHUNK))
    if not chunk:
      raise ShardError(f"truncated at record {index} ({length - left} of {length} bytes)")
    checksum.update(chunk)
    left -= len(chunk)
  return _mask(int.from_bytes(checksum.digest(), "big"))


def tfrecord_payloads(stream: BinaryIO, max_bytes: Optional[int] = None
                      ) -> Iterator[bytes | TooLarge]:
  """The records of a TFRecord stream (already decompressed), CRCs checked. A record above
  `max_bytes` is read past in chunks (its CRC still checked) and yields TooLarge."""
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
    if max_bytes is not None and length > max_bytes:
      crc = _skip_payload(stream, length, index)
      payload = TooLarge(f"record {index}", length)
    else:
      payload = stream.read(length)
      if len(payload) < length:
        raise ShardError(f"truncated at record {index} ({len(payload)} of {length} bytes)")
      crc = _masked_crc(payload)
    footer = stream.read(4)
    if len(footer) < 4:
      raise ShardError(f"truncated at record {index} ({length} of {length} bytes, no CRC)")
    if crc != struct.unpack("<I", footer)[0]:
      raise ShardError(f"corrupt at record {index} (data checksum mismatch)")
    yield payload
    index += 1


def tfrecord_examples(stream: BinaryIO, image_key: str, id_keys: tuple,
                      max_bytes: Optional[int] = None) -> Iterator[ShardRecord]:
  """tf.train.Example records -> ShardRecords (image under `image_key`, id under an id key).
  A record above `max_bytes` becomes a ShardRecord with a problem, keyed by its index."""
  from tensorflow.core.example import example_pb2  # pylint: disable=import-outside-toplevel
  for index, payload in enumerate(tfrecord_payloads(stream, max_bytes)):
    key = str(index)
    if isinstance(payload, TooLarge):
      yield ShardRecord(index, key, None, payload.reason(max_bytes))
      continue
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


def tar_samples(stream: BinaryIO, max_bytes: Optional[int] = None) -> Iterator[ShardRecord]:
  """WebDataset tar (plain or gzip): consecutive members sharing a key form one sample,
  and the sample's image is its member with an image extension. A member above
  `max_bytes` is passed over unread (tar streams skip by reading in blocks) and its
  sample gets a problem."""
  index = 0
  current_key, files = None, {}

  def sample():
    too_large = next((f for f in files.values() if isinstance(f, TooLarge)), None)
    if too_large is not None:
      return ShardRecord(index, current_key, None,
                         f"sample {index} ({current_key}): {too_large.reason(max_bytes)}")
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
        if max_bytes is not None and member.size > max_bytes:
          files[extension] = TooLarge(f"member {member.name}", member.size)
        else:
          files[extension] = archive.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, struct.error) as e:
    raise ShardError(f"damaged after sample {index} ({type(e).__name__}: {e})") from e
  if current_key is not None:
    yield sample()
