"""GeoTIFFs: georeferencing kept in rows and mask COGs, nodata left out of everything."""
import glob

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from conftest import NUM_CLASSES, read_rows, run_job, save_image, textured_image
from transforms.geo import NODATA_CLASS
from transforms.labels import read_labels
from transforms.tiling import pooled_feature_sum, pooled_feature_sum_masked, tile_grid

TRANSFORM = from_origin(500000.0, 5800000.0, 0.25, 0.25)
TILE, OVERLAP = 128, 32


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


def test_masked_pooling_equals_plain_pooling_when_all_valid_and_brute_force_otherwise():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(8, 8, 5))
  box = (3, 29, 0, 22)
  full = np.ones((32, 32), bool)
  np.testing.assert_allclose(pooled_feature_sum_masked(features, box, 4, full),
                             pooled_feature_sum(features, box, 4), rtol=1e-12)
  valid = rng.random((32, 32)) > 0.4
  per_pixel = np.repeat(np.repeat(features, 4, axis=0), 4, axis=1)
  inside = np.zeros((32, 32), bool)
  inside[3:29, 0:22] = True
  expected = per_pixel[valid & inside].sum(axis=0)
  np.testing.assert_allclose(pooled_feature_sum_masked(features, box, 4, valid), expected,
                             rtol=1e-12)


def test_georeferencing_is_kept_and_the_mask_cog_aligns(tiny_model, tmp_path):
  directory = tmp_path / "in"
  directory.mkdir()
  rgb = textured_image(300, 420, seed=5)
  write_geotiff(directory / "scene.tif", rgb)
  save_image(directory / "plain.png", textured_image(100, 120, seed=6))
  out, masks_dir = tmp_path / "out" / "rows", tmp_path / "masks"
  summary = run_job("--input", str(directory / "*"), "--output", out, "--model", tiny_model,
                    "--tile_size", TILE, "--tile_overlap", OVERLAP,
                    "--mask_geotiff_dir", masks_dir)
  assert summary.rows == 2 and summary.errors == 0
  rows = {row["source"].rsplit("/", 1)[-1]: row for row in read_rows(out).values()}
  scene, plain = rows["scene.tif"], rows["plain.png"]
  assert scene["crs_epsg"] == 32632
  assert CRS.from_wkt(scene["crs_wkt"]) == CRS.from_epsg(32632)
  assert tuple(scene["transform"]) == tuple(TRANSFORM)[:6]
  assert plain["crs_epsg"] is None and plain["crs_wkt"] is None and plain["transform"] is None
  assert plain["mask_geotiff"] is None
  with rasterio.open(scene["mask_geotiff"]) as mask_file:
    assert mask_file.crs == CRS.from_epsg(32632)
    assert tuple(mask_file.transform)[:6] == tuple(TRANSFORM)[:6]
    assert (mask_file.height, mask_file.width) == (300, 420)
    assert mask_file.nodata == NODATA_CLASS
    assert mask_file.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    np.testing.assert_array_equal(mask_file.read(1), scene["mask"])   # pixel for pixel
    palette = read_labels(f"{tiny_model}/labels.json").palette
    assert mask_file.colormap(1)[1][:3] == tuple(palette[1])
  assert len(glob.glob(str(masks_dir / "*.tif"))) == 1


@pytest.mark.parametrize("style", ["nodata_value", "alpha"])
def test_nodata_is_left_out_of_counts_features_and_inference(pixel_local_model, tmp_path,
                                                              style):
  """Left 224 columns are nodata: the row must equal a run on the valid part alone, and
  tiles owning only nodata must never reach the model."""
  height, width, border = 256, 480, 224
  rgb = np.maximum(textured_image(height, width, seed=8), 1)   # no valid pixel is (0,0,0)
  valid = np.ones((height, width), bool)
  valid[:, :border] = False
  directory = tmp_path / "in"
  directory.mkdir()
  if style == "nodata_value":
    rgb[~valid] = 0
    write_geotiff(directory / "scene.tif", rgb, nodata=0)
  else:   # pixels stay (aerial imagery under an alpha mask need not be black)
    write_geotiff(directory / "scene.tif", rgb, alpha=np.where(valid, 255, 0).astype(np.uint8))
  crop_dir = tmp_path / "crop"
  crop_dir.mkdir()
  save_image(crop_dir / "valid_part.png", np.ascontiguousarray(rgb[:, border:]))
  common = ["--model", pixel_local_model, "--tile_size", TILE, "--tile_overlap", OVERLAP]
  summary = run_job("--input", directory / "*.tif", "--output", tmp_path / "o" / "rows",
                    *common)
  run_job("--input", crop_dir / "*.png", "--output", tmp_path / "c" / "rows", *common)
  row = next(iter(read_rows(tmp_path / "o" / "rows").values()))
  alone = next(iter(read_rows(tmp_path / "c" / "rows").values()))
  assert row["valid_pixels"] == height * (width - border)
  assert row["class_counts"] == alone["class_counts"]
  np.testing.assert_allclose(row["pooled_features"], alone["pooled_features"], rtol=2e-6,
                             atol=1e-6)
  assert (row["mask"][:, :border] == NODATA_CLASS).all()
  np.testing.assert_array_equal(row["mask"][:, border:], alone["mask"])
  specs = tile_grid(height, width, TILE, OVERLAP)
  nodata_only = sum(1 for s in specs if s.own_x1 <= border)
  assert nodata_only > 0
  assert summary.metrics["tiles_nodata_skipped"] == nodata_only
  assert summary.metrics["tiles_inferred"] == len(specs) - nodata_only
  metadata = pq.read_schema(glob.glob(f"{tmp_path}/o/rows-*.parquet")[0]).metadata
  assert metadata[b"hrnet_beam.nodata_class"] == str(NODATA_CLASS).encode()


def test_raster_that_is_all_nodata_gives_a_row_with_nothing_counted(pixel_local_model,
                                                                     tmp_path):
  rgb = np.zeros((100, 150, 3), np.uint8)
  path = write_geotiff(tmp_path / "empty.tif", rgb, nodata=0)
  summary = run_job("--input", path, "--output", tmp_path / "o" / "rows", "--model",
                    pixel_local_model, "--tile_size", TILE, "--tile_overlap", OVERLAP)
  row = next(iter(read_rows(tmp_path / "o" / "rows").values()))
  assert summary.errors == 0 and summary.metrics.get("tiles_inferred", 0) == 0
  assert row["valid_pixels"] == 0 and row["class_counts"] == [0] * NUM_CLASSES
  assert row["pooled_features"] is None
  assert (row["mask"] == NODATA_CLASS).all()
