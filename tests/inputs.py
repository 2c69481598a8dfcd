"""Builders of test inputs shared by several test modules: odd PNGs, shards, GeoTIFFs,
objects in the GCS emulator."""
import io
import struct
import tarfile
import zlib

import rasterio
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import from_origin

from conftest import textured_image

# The GeoTIFF tests' georeferencing: UTM coordinates, 0.25 m pixels.
TRANSFORM = from_origin(500000.0, 5800000.0, 0.25, 0.25)


def png_declaring(width: int, height: int) -> bytes:
  """A PNG whose header declares a huge size, with almost no data behind it."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
          chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def shard_png(seed, height=48, width=64):
  buffer = io.BytesIO()
  Image.fromarray(textured_image(height, width, seed)).save(buffer, format="PNG")
  return buffer.getvalue()


def tf_example(image=None, **ids):
  feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
             for k, v in ids.items()}
  if image is not None:
    feature["image/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecord(path, records, compress=False):
  options = tf.io.TFRecordOptions(compression_type="GZIP" if compress else "")
  with tf.io.TFRecordWriter(str(path), options) as writer:
    for record in records:
      writer.write(record)
  return str(path)


def write_tar(path, members, compress=False):
  with tarfile.open(str(path), "w:gz" if compress else "w") as archive:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return str(path)


def write_geotiff(path, rgb, *, alpha=None, nodata=None, epsg=32632, tiled=False):
  bands = [rgb[:, :, i] for i in range(3)] + ([alpha] if alpha is not None else [])
  profile = dict(driver="GTiff", width=rgb.shape[1], height=rgb.shape[0], count=len(bands),
                 dtype="uint8", crs=CRS.from_epsg(epsg), transform=TRANSFORM)
  if nodata is not None:
    profile["nodata"] = nodata
  if tiled:
    profile.update(tiled=True, blockxsize=256, blockysize=256)
  if alpha is not None:
    profile["photometric"] = "RGB"
  with rasterio.open(path, "w", **profile) as dataset:
    for i, band in enumerate(bands, start=1):
      dataset.write(band, i)
    if alpha is not None:
      dataset.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                             rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.alpha]
  return str(path)


def upload(path: str, data: bytes) -> None:
  """Stores the bytes as they are (FileSystems would gzip again a path ending in .gz)."""
  with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(data)


def png_bytes(image) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()
