"""GeoTIFFs: georeferencing kept in rows and mask COGs, nodata left out of everything."""
import glob

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.crs import CRS

from conftest import NUM_CLASSES, TINY_WIDTH, read_rows, run_job, save_image, textured_image
from inputs import TRANSFORM, write_geotiff
from transforms.types import NODATA_CLASS
from transforms.labels import read_labels
from transforms.tiling.grid import cell_weight_map, pooled_feature_sum, tile_grid

TILE, OVERLAP = 128, 32


def test_masked_cell_weights_pool_exactly_the_valid_pixels():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(8, 8, 5))
  box = (3, 29, 0, 22)
  full = np.ones((32, 32), bool)
  np.testing.assert_allclose(
      np.einsum("ij,ijf->f", cell_weight_map(box, 4, 8, full), features),
      pooled_feature_sum(features, box, 4), rtol=1e-12)
  valid = rng.random((32, 32)) > 0.4
  per_pixel = np.repeat(np.repeat(features, 4, axis=0), 4, axis=1)
  inside = np.zeros((32, 32), bool)
  inside[3:29, 0:22] = True
  expected = per_pixel[valid & inside].sum(axis=0)
  np.testing.assert_allclose(
      np.einsum("ij,ijf->f", cell_weight_map(box, 4, 8, valid), features), expected,
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
  # A vector column holds no nulls (pyarrow cannot read them back): NaN says 'no mean'.
  assert len(row["pooled_features"]) == 15 * TINY_WIDTH and np.isnan(row["pooled_features"]).all()
  assert row["class_fractions"] is None
  assert (row["mask"] == NODATA_CLASS).all()


def _tiled_geotiff(path, rgb, valid=None):
  """A tiled GeoTIFF (256 px blocks) with nodata 0 where `valid` is False."""
  rgb = np.maximum(rgb, 1)
  if valid is not None:
    rgb[~valid] = 0
  return write_geotiff(path, rgb, nodata=0, tiled=True)


def test_huge_raster_is_read_by_blocks_equal_to_blocks_cut_by_hand(tiny_model, tmp_path):
  height, width, block = 700, 900, 320
  rgb = textured_image(height, width, seed=12)
  valid = np.ones((height, width), bool)
  valid[:, :40] = False                        # a nodata border crossing two blocks' edges
  source = _tiled_geotiff(tmp_path / "big.tif", rgb.copy(), valid)
  with rasterio.open(source) as dataset:       # what the windowed run must reproduce
    pixels = np.moveaxis(dataset.read(), 0, -1)
  by_hand = tmp_path / "by_hand"
  by_hand.mkdir()
  expected_transforms = {}
  for y in range(0, height, block):
    for x in range(0, width, block):
      part = pixels[y:y + block, x:x + block]
      path = by_hand / f"block_{y}_{x}.tif"
      part_transform = TRANSFORM * rasterio.Affine.translation(x, y)
      with rasterio.open(path, "w", driver="GTiff", width=part.shape[1],
                         height=part.shape[0], count=3, dtype="uint8", nodata=0,
                         crs=CRS.from_epsg(32632), transform=part_transform) as f:
        f.write(np.moveaxis(part, -1, 0))
      expected_transforms[(y, x)] = tuple(part_transform)[:6]
  common = ["--model", tiny_model, "--tile_size", TILE, "--tile_overlap", OVERLAP]
  summary = run_job("--input", source, "--output", tmp_path / "w" / "rows",
                    "--window_threshold", 100_000, "--block_size", block, *common)
  run_job("--input", by_hand / "*.tif", "--output", tmp_path / "h" / "rows", *common)
  windowed = read_rows(tmp_path / "w" / "rows")
  cut = {(r["crs_epsg"], tuple(r["transform"])): r
         for r in read_rows(tmp_path / "h" / "rows").values()}
  assert summary.rows == len(windowed) == len(cut) == 9
  assert summary.metrics["windowed_rasters"] == 1
  for image_id, row in windowed.items():
    y, x = row["block_y"], row["block_x"]
    assert image_id == f"{source}#block={y},{x}" and row["source"] == source
    assert tuple(row["transform"]) == expected_transforms[(y, x)]
    twin = cut[(32632, expected_transforms[(y, x)])]
    assert (row["height"], row["width"]) == (twin["height"], twin["width"])
    assert row["mask_png"] == twin["mask_png"]
    assert row["class_counts"] == twin["class_counts"]
    assert row["pooled_features"] == twin["pooled_features"]
    assert row["valid_pixels"] == int(valid[y:y + block, x:x + block].sum())
  full = np.zeros((height, width), np.uint8)   # the blocks put together cover the raster
  for row in windowed.values():
    full[row["block_y"]:row["block_y"] + row["height"],
         row["block_x"]:row["block_x"] + row["width"]] = row["mask"]
  assert (full[:, :40] == NODATA_CLASS).all() and (full[:, 40:] != NODATA_CLASS).all()


PEAK_SCRIPT = """
import sys
from pipeline.job import run
summary = run(sys.argv[1:])
assert summary.errors == 0, summary
print("ROWS", summary.rows)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK", int(line.split()[1]) * 1024)
"""


def _peak_run(*args):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, args)],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  values = dict(line.split() for line in done.stdout.splitlines()
                if line.startswith(("ROWS", "PEAK")))
  return int(values["ROWS"]), int(values["PEAK"])


def test_20000_pixel_raster_runs_in_bounded_memory(pixel_local_model, tmp_path):
  """20000 x 20000 RGB is 1.2 GB of pixels (4.8 GB as float32): read by 4096-pixel
  blocks, the run's peak stays far below holding the raster even once."""
  side, step = 20000, 2000
  path = str(tmp_path / "huge.tif")
  with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3,
                     dtype="uint8", crs=CRS.from_epsg(32632), transform=TRANSFORM,
                     tiled=True, blockxsize=512, blockysize=512, compress="deflate") as f:
    stripe = np.moveaxis(textured_image(step, side, seed=3), -1, 0)
    for y in range(0, side, step):
      f.write(stripe, window=rasterio.windows.Window(0, y, side, step))
  small = save_image(tmp_path / "small.png", textured_image(512, 512, seed=4))
  common = ["--model", pixel_local_model, "--tile_size", 512, "--tile_overlap", 64]
  rows, baseline = _peak_run("--input", small, "--output", tmp_path / "s" / "rows", *common)
  assert rows == 1
  rows, peak = _peak_run("--input", path, "--output", tmp_path / "b" / "rows",
                         "--block_size", 4096, *common)
  assert rows == 25                                    # 5 x 5 blocks
  raster_bytes = side * side * 3
  print(f"peak RSS {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB, "
        f"raster {raster_bytes / 2**20:.0f} MiB")
  assert peak - baseline < 0.75 * raster_bytes


def test_rgbn_geotiff_bands_are_chosen_by_channel_mapping(pixel_local_model, tmp_path):
  """A 4-band RGBN GeoTIFF keeps its NIR band: '3,0,1' feeds NIR, R, G to the model and
  must equal an NRG image run as RGB; rgb takes the first three; a band the raster lacks
  is an error for that input, not for the job."""
  rgbn = textured_image(150, 170, seed=21, channels=4)
  path = tmp_path / "in" / "rgbn.tif"
  path.parent.mkdir()
  with rasterio.open(path, "w", driver="GTiff", width=170, height=150, count=4,
                     dtype="uint8", crs=CRS.from_epsg(32632), transform=TRANSFORM,
                     photometric="RGB", alpha="UNSPECIFIED") as f:
    # As RGBN products (e.g. NAIP) declare it: the 4th band is data, not alpha.
    f.write(np.moveaxis(rgbn, -1, 0))
  nrg = save_image(tmp_path / "nrg.png", np.ascontiguousarray(rgbn[:, :, [3, 0, 1]]))
  rgb = save_image(tmp_path / "rgb.png", np.ascontiguousarray(rgbn[:, :, :3]))
  common = ["--model", pixel_local_model, "--tile_size", TILE, "--tile_overlap", OVERLAP]

  def row(source, out, *flags):
    run_job("--input", source, "--output", tmp_path / out / "rows", *common, *flags)
    return next(iter(read_rows(tmp_path / out / "rows").values()))
  mapped = row(path, "mapped", "--channel_mapping", "3,0,1")
  assert mapped["mask_png"] == row(nrg, "nrg")["mask_png"]
  assert mapped["class_counts"] == row(nrg, "nrg2")["class_counts"]
  assert row(path, "first3")["mask_png"] == row(rgb, "rgb")["mask_png"]
  summary = run_job("--input", path, "--output", tmp_path / "bad" / "rows", *common,
                    "--channel_mapping", "5,0,1")
  assert (summary.rows, summary.errors) == (0, 1)
  from conftest import read_errors  # pylint: disable=import-outside-toplevel
  assert "asks for band 5 but the image has 4 bands" in read_errors(
      tmp_path / "bad" / "rows-errors")[0]["reason"]
