"""gs:// for real, against a local emulator: inputs, model, rows and errors in buckets."""
import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipeline.job.config import ConfigError
from pipeline.cli.stage_model import stage_model

from conftest import read_errors, read_rows, run_job, textured_image
from inputs import png_bytes, upload


def _read_rows_through_gcsfs(emulator_endpoint: str, prefix: str) -> dict:
  import gcsfs  # pylint: disable=import-outside-toplevel
  fs = gcsfs.GCSFileSystem(endpoint_url=emulator_endpoint, token="anon")
  files = fs.glob(prefix.removeprefix("gs://") + "-*-of-*.parquet")
  assert files, prefix
  rows = {}
  for file in files:
    for row in pq.read_table(file, filesystem=fs).to_pylist():
      assert row["image_id"] not in rows, row["image_id"]
      rows[row["image_id"]] = row
  return rows


def _stage_inputs(bucket, count=6):
  sources = []
  for i in range(count):
    path = f"{bucket}/images/{i}.png"
    upload(path, png_bytes(textured_image(90 + 10 * i, 120, i)))
    sources.append(path)
  upload(f"{bucket}/images/broken.png", b"\x89PNG\r\n\x1a\nbroken")
  return sources


def test_whole_job_in_buckets_with_storage_faults(gcs, bucket, tiny_model, tmp_path):
  sources = _stage_inputs(bucket)
  stage_model(tiny_model, f"{bucket}/models/tiny")
  gcs.proxy.set_faults(fraction=0.25, max_faults=40, seed=3)
  try:
    summary = run_job("--input", f"{bucket}/images/*.png", "--output", f"{bucket}/out/rows",
                      "--model", f"{bucket}/models/tiny", "--model_cache_dir",
                      tmp_path / "model-cache", "--tile_size", 64, "--tile_overlap", 32)
    injected = dict(gcs.proxy.faults)
  finally:
    gcs.proxy.set_faults(fraction=0.0, max_faults=0)
  assert sum(injected.values()) >= 3, injected  # the job really met 503s, 429s and drops
  assert (summary.inputs, summary.rows, summary.errors) == (7, 6, 1)
  rows = _read_rows_through_gcsfs(gcs.emulator.endpoint, f"{bucket}/out/rows")
  assert sorted(rows) == sorted(sources)
  for source, row in rows.items():
    mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
    assert mask.shape == (row["height"], row["width"])
  errors_file = FileSystems.match([f"{bucket}/out/rows-errors-*.jsonl"])[0].metadata_list
  assert len(errors_file) == 1
  local_copy = tmp_path / "errors-00000-of-00001.jsonl"
  local_copy.write_bytes(FileSystems.open(errors_file[0].path).read())
  assert [e["source"] for e in read_errors(tmp_path / "errors")] == [
      f"{bucket}/images/broken.png"]
  # The model was copied from the bucket to local disk once, then loaded from there.
  assert len(os.listdir(tmp_path / "model-cache")) == 2  # the copy and its lock file


def test_missing_input_bucket_fails_before_launch(gcs, tiny_model, tmp_path):
  with pytest.raises(ConfigError, match="gs://no-such-bucket-x/"):
    run_job("--input", "gs://no-such-bucket-x/*.png", "--output", tmp_path / "rows",
            "--model", tiny_model)


def test_missing_output_bucket_fails_before_launch(gcs, bucket, tiny_model):
  _stage_inputs(bucket, count=1)
  with pytest.raises(ConfigError, match="cannot write to the output location "
                                        "gs://no-such-bucket-y"):
    run_job("--input", f"{bucket}/images/0.png", "--output", "gs://no-such-bucket-y/rows",
            "--model", tiny_model)


def test_a_forbidden_input_object_is_one_error_and_the_job_goes_on(gcs, bucket, tiny_model,
                                                                   tmp_path):
  sources = _stage_inputs(bucket, count=3)
  gcs.proxy.deny("images/1.png", method="GET")   # listed, but its bytes are forbidden
  try:
    summary = run_job("--input", f"{bucket}/images/*.png", "--output", tmp_path / "rows",
                      "--model", tiny_model)
  finally:
    gcs.proxy.allow_all()
  assert gcs.proxy.denied, "the proxy never saw the forbidden read"
  assert (summary.inputs, summary.rows, summary.errors) == (4, 2, 2)
  assert sorted(read_rows(tmp_path / "rows")) == sorted(s for s in sources
                                                        if not s.endswith("/1.png"))
  errors = {e["source"]: e for e in read_errors(tmp_path / "rows-errors")}
  forbidden = errors[f"{bucket}/images/1.png"]
  assert forbidden["stage"] == "read" and "403" in forbidden["reason"]


def test_a_forbidden_output_location_fails_before_launch_naming_it(gcs, bucket, tiny_model):
  """An output bucket the job may read but not write (no storage.objects.create)."""
  _stage_inputs(bucket, count=1)
  output_bucket = f"{bucket}-out"
  gcs.emulator.create_bucket(output_bucket.removeprefix("gs://"))
  gcs.proxy.deny(f"/b/{output_bucket.removeprefix('gs://')}/o", method="POST")
  try:
    with pytest.raises(ConfigError, match=f"cannot write to the output location "
                                          f"{output_bucket}/out.*403"):
      run_job("--input", f"{bucket}/images/0.png", "--output", f"{output_bucket}/out/rows",
              "--model", tiny_model)
  finally:
    gcs.proxy.allow_all()
  assert gcs.proxy.denied


def test_shards_in_a_bucket(gcs, bucket, pixel_local_model, tmp_path):
  from inputs import shard_png, tf_example, write_tar, write_tfrecord
  local_tfrecord = write_tfrecord(tmp_path / "a.tfrecord.gz",
                                  [tf_example(shard_png(i), **{"image/id": f"r{i}"}) for i in range(3)],
                                  compress=True)
  local_tar = write_tar(tmp_path / "b.tar", [("k1.png", shard_png(7)), ("k2.png", shard_png(8))])
  for local in (local_tfrecord, local_tar):
    with open(local, "rb") as f:
      upload(f"{bucket}/shards/{os.path.basename(local)}", f.read())
  summary = run_job("--input", f"{bucket}/shards/*", "--output", f"{bucket}/out/rows",
                    "--model", pixel_local_model)
  assert (summary.inputs, summary.rows, summary.errors) == (5, 5, 0)
  rows = _read_rows_through_gcsfs(gcs.emulator.endpoint, f"{bucket}/out/rows")
  assert sorted(rows) == sorted([f"{bucket}/shards/a.tfrecord.gz#r{i}" for i in range(3)] +
                                [f"{bucket}/shards/b.tar#k1", f"{bucket}/shards/b.tar#k2"])


def test_huge_raster_in_a_bucket_is_read_by_byte_ranges(gcs, bucket, tiny_model, tmp_path):
  """A tiled GeoTIFF in GCS: one window reads a small part of the file, and the whole job
  (blocks, georeferenced mask COGs) works on gs:// as locally."""
  import rasterio  # pylint: disable=import-outside-toplevel
  from inputs import write_geotiff  # pylint: disable=import-outside-toplevel
  from transforms.reading import geotiff as geo  # pylint: disable=import-outside-toplevel
  from transforms.reading.decode import _to_rgb  # pylint: disable=import-outside-toplevel
  side = 2048
  rng = np.random.default_rng(0)
  noise = rng.integers(1, 255, (side, side, 3), dtype=np.uint8)   # barely compressible
  local = write_geotiff(tmp_path / "huge.tif", noise, tiled=True)
  size = os.path.getsize(local)
  with open(local, "rb") as f:
    upload(f"{bucket}/rasters/huge.tif", f.read())
  source = f"{bucket}/rasters/huge.tif"
  gcs.proxy.bytes_out.clear()
  window = geo.read_window(source, 1024, 512, 256, 256, _to_rgb)
  fetched = sum(n for path, n in gcs.proxy.bytes_out.items() if "huge.tif" in path)
  np.testing.assert_array_equal(window.pixels, noise[1024:1280, 512:768])
  assert window.geo.crs_epsg == 32632
  assert fetched < size / 4, (fetched, size)       # 1/64 of the raster, in 1 MiB ranges
  summary = run_job("--input", source, "--output", f"{bucket}/out/rows", "--model",
                    tiny_model, "--window_threshold", 1_000_000, "--block_size", 1024,
                    "--tile_size", 256, "--tile_overlap", 32, "--outputs", "masks",
                    "--mask_geotiff_dir", f"{bucket}/masks")
  assert (summary.inputs, summary.rows, summary.errors) == (4, 4, 0)
  rows = _read_rows_through_gcsfs(gcs.emulator.endpoint, f"{bucket}/out/rows")
  assert sorted((r["block_y"], r["block_x"]) for r in rows.values()) == [
      (0, 0), (0, 1024), (1024, 0), (1024, 1024)]
  for row in rows.values():
    assert row["mask_geotiff"].startswith(f"{bucket}/masks/huge-")
    with FileSystems.open(row["mask_geotiff"],
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
      data = f.read()
    with rasterio.io.MemoryFile(data) as memory, memory.open() as mask_file:
      assert tuple(mask_file.transform)[:6] == tuple(row["transform"])
      assert (mask_file.height, mask_file.width) == (1024, 1024)
