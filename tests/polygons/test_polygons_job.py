"""--polygons_output: GeoParquet 1.1 read back by DuckDB spatial and GeoPandas."""
import glob
import json
import os

import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from rasterio.features import rasterize
from shapely import wkb

from conftest import duckdb_with, read_rows, run_job, save_image, textured_image
from inputs import TRANSFORM, write_geotiff
from pipeline.job.config import ConfigError
from transforms.types import NODATA_CLASS

TILE, OVERLAP = 64, 32
PIXEL_M = 0.25   # TRANSFORM's pixel size in metres


def _duckdb():
  return duckdb_with("spatial")


def _inputs(directory):
  directory.mkdir()
  rgb = textured_image(150, 170, seed=21)
  alpha = np.full((150, 170), 255, np.uint8)
  alpha[:, :30] = 0                               # nodata: never a polygon
  write_geotiff(directory / "scene.tif", rgb, alpha=alpha)
  save_image(directory / "plain.png", textured_image(90, 110, seed=22))
  return alpha != 0


def _polygon_files(prefix, key):
  return sorted(glob.glob(f"{prefix}-{key}-*.parquet"))


@pytest.fixture(scope="module")
def polygons_run(pixel_local_model, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("polygons")
  valid = _inputs(tmp / "in")
  summary = run_job("--input", tmp / "in" / "*", "--output", tmp / "out" / "rows",
                    "--model", pixel_local_model, "--tile_size", TILE,
                    "--tile_overlap", OVERLAP, "--polygons_output", tmp / "out" / "polygons",
                    "--run_id", "r1")
  assert summary.rows == 2 and summary.errors == 0
  assert summary.metrics["polygons"] == sum(
      pq.read_metadata(f).num_rows for f in glob.glob(f"{tmp}/out/polygons-*.parquet"))
  rows = {r["source"].rsplit("/", 1)[-1]: r for r in read_rows(tmp / "out" / "rows").values()}
  return tmp / "out" / "polygons", rows, valid


def test_one_geoparquet_file_set_per_crs_with_geo_metadata(polygons_run):
  prefix, rows, _ = polygons_run
  geo_files, pixel_files = _polygon_files(prefix, "epsg32632"), _polygon_files(prefix, "pixels")
  assert geo_files and pixel_files
  assert all("-r1-" in os.path.basename(f) for f in geo_files + pixel_files)
  geo = json.loads(pq.read_schema(geo_files[0]).metadata[b"geo"])
  assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
  column = geo["columns"]["geometry"]
  assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
  assert column["crs"]["id"] == {"authority": "EPSG", "code": 32632}
  assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
  pixel_geo = json.loads(pq.read_schema(pixel_files[0]).metadata[b"geo"])
  assert pixel_geo["columns"]["geometry"]["crs"] is None     # 'undefined' in the spec
  assert b"pixels of the source image" in pq.read_schema(pixel_files[0]).metadata[
      b"hrnet_beam.coordinates"]
  # Confidence maps were computed for the polygons but not asked for in the rows.
  assert all(r["confidence_png"] is None for r in rows.values())


def test_polygons_redraw_the_stitched_mask_and_areas_add_up(polygons_run):
  prefix, rows, valid = polygons_run
  for key, name in (("epsg32632", "scene.tif"), ("pixels", "plain.png")):
    table = pq.read_table(_polygon_files(prefix, key)).to_pylist()
    row = rows[name]
    mine = [p for p in table if p["source"] == row["source"]]
    assert mine and all(p["image_id"] == row["image_id"] for p in mine)
    per_class = np.zeros(len(row["class_counts"]), np.int64)
    for polygon in mine:
      per_class[polygon["class_id"]] += polygon["area_px"]
    assert per_class.tolist() == row["class_counts"]
    # Drawn back on the raster's grid, the polygons are the mask, pixel for pixel.
    transform = None
    if key == "epsg32632":
      from affine import Affine  # pylint: disable=import-outside-toplevel
      transform = Affine(*row["transform"])
    drawn = rasterize(((wkb.loads(p["geometry"]), p["class_id"]) for p in mine),
                      out_shape=row["mask"].shape, fill=NODATA_CLASS, dtype="uint8",
                      **({"transform": transform} if transform else {}))
    np.testing.assert_array_equal(drawn, row["mask"])
    for polygon in mine:
      geometry = wkb.loads(polygon["geometry"])
      assert geometry.is_valid
      assert polygon["class_name"] == json.loads(pq.read_schema(
          _polygon_files(prefix, key)[0]).metadata[b"hrnet_beam.class_names"])[
              polygon["class_id"]]
      assert 0 <= polygon["mean_confidence"] <= 1
      box = polygon["bbox"]
      assert (box["xmin"], box["ymin"], box["xmax"], box["ymax"]) == geometry.bounds
      if key == "epsg32632":
        assert polygon["area_m2"] == polygon["area_px"] * PIXEL_M ** 2
      else:
        assert polygon["area_m2"] is None
  assert (rows["scene.tif"]["mask"][~valid] == NODATA_CLASS).all()


def test_duckdb_spatial_reads_geometry_filters_by_bbox_and_sees_the_footprint(polygons_run):
  prefix, rows, _ = polygons_run
  con = _duckdb()
  files = _polygon_files(prefix, "epsg32632")
  scene = rows["scene.tif"]
  x0, y1 = TRANSFORM.c, TRANSFORM.f
  x1, y0 = x0 + 170 * PIXEL_M, y1 - 150 * PIXEL_M
  footprint = f"ST_MakeEnvelope({x0}, {y0}, {x1}, {y1})"
  nodata = f"ST_MakeEnvelope({x0}, {y0}, {x0 + 30 * PIXEL_M}, {y1})"
  count, invalid, outside, on_nodata, area, typename = con.execute(f"""
      SELECT count(*), count(*) FILTER (WHERE NOT ST_IsValid(geometry)),
             count(*) FILTER (WHERE NOT ST_Within(geometry, {footprint})),
             sum(ST_Area(ST_Intersection(geometry, {nodata}))),
             sum(ST_Area(geometry)), any_value(typeof(geometry))
      FROM read_parquet({files!r})""").fetchone()
  assert typename.startswith("GEOMETRY")             # the geo metadata was understood
  assert count > 10 and invalid == 0 and outside == 0 and on_nodata == 0
  assert area == pytest.approx(scene["valid_pixels"] * PIXEL_M ** 2)
  # The covering column filters like the geometry does.
  quarter = (x0, y0, (x0 + x1) / 2, (y0 + y1) / 2)
  by_bbox, by_geometry = con.execute(f"""
      SELECT count(*) FILTER (WHERE bbox.xmin <= {quarter[2]} AND bbox.xmax >= {quarter[0]}
                                AND bbox.ymin <= {quarter[3]} AND bbox.ymax >= {quarter[1]}),
             count(*) FILTER (WHERE ST_Intersects(ST_Envelope(geometry),
                                                  ST_MakeEnvelope({', '.join(map(str, quarter))})))
      FROM read_parquet({files!r})""").fetchone()
  assert 0 < by_bbox == by_geometry < count


def test_geopandas_reads_crs_and_areas(polygons_run):
  prefix, _, _ = polygons_run
  frame = geopandas.read_parquet(_polygon_files(prefix, "epsg32632"))
  assert frame.crs.to_epsg() == 32632
  assert frame.geometry.is_valid.all()
  np.testing.assert_allclose(frame.geometry.area, frame["area_m2"], rtol=1e-9)
  per_class = frame.groupby("class_name")["area_m2"].sum()
  assert per_class.sum() == pytest.approx(frame.geometry.area.sum())


def test_blocks_merge_into_the_polygons_of_the_whole_raster(pixel_local_model, tmp_path):
  source = tmp_path / "in"
  _inputs(source)
  common = ["--input", source / "scene.tif", "--model", pixel_local_model, "--tile_size", TILE,
            "--tile_overlap", OVERLAP, "--outputs", "masks,confidence"]
  run_job(*common, "--output", tmp_path / "whole" / "rows", "--polygons_output",
          tmp_path / "whole" / "polygons")
  summary = run_job(*common, "--output", tmp_path / "blocks" / "rows", "--window_threshold",
                    1000, "--block_size", 64, "--polygons_output",
                    tmp_path / "blocks" / "polygons")
  assert summary.rows == 9
  whole = pq.read_table(_polygon_files(tmp_path / "whole" / "polygons", "epsg32632")).to_pylist()
  blocks = pq.read_table(_polygon_files(tmp_path / "blocks" / "polygons", "epsg32632")).to_pylist()
  assert {p["image_id"] for p in blocks} == {str(source / "scene.tif")}
  key = lambda p: (p["class_id"], p["area_px"], wkb.loads(p["geometry"]).bounds)
  assert len(blocks) == len(whole)
  for got, want in zip(sorted(blocks, key=key), sorted(whole, key=key)):
    assert key(got) == key(want)
    assert shapely.equals(wkb.loads(got["geometry"]), wkb.loads(want["geometry"]))
    assert got["mean_confidence"] == pytest.approx(want["mean_confidence"], abs=1e-6)
  # With the confidence asked for, each polygon's mean is its pixels' mean.
  row = next(iter(read_rows(tmp_path / "whole" / "rows").values()))
  from affine import Affine  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  confidence = np.asarray(Image.open(io.BytesIO(row["confidence_png"]))) / 255.0
  for polygon in whole[:20]:
    region = rasterize([(wkb.loads(polygon["geometry"]), 1)], out_shape=row["mask"].shape,
                       transform=Affine(*row["transform"])) == 1
    assert polygon["mean_confidence"] == pytest.approx(confidence[region].mean(), abs=1e-6)


def test_options_shape_polygons(pixel_local_model, tmp_path):
  _inputs(tmp_path / "in")
  common = ["--input", tmp_path / "in" / "plain.png", "--model", pixel_local_model,
            "--tile_size", TILE, "--tile_overlap", OVERLAP]
  run_job(*common, "--output", tmp_path / "a" / "rows", "--polygons_output",
          tmp_path / "a" / "polygons")
  run_job(*common, "--output", tmp_path / "b" / "rows", "--polygons_output",
          tmp_path / "b" / "polygons", "--min_polygon_area", 20, "--simplify_tolerance", 1.5,
          "--polygon_denoise", 8)
  exact = pq.read_table(_polygon_files(tmp_path / "a" / "polygons", "pixels")).to_pylist()
  shaped = pq.read_table(_polygon_files(tmp_path / "b" / "polygons", "pixels")).to_pylist()
  assert len(shaped) < len(exact)
  assert min(p["area_px"] for p in shaped) >= 20 > min(p["area_px"] for p in exact)
  metadata = pq.read_schema(_polygon_files(tmp_path / "b" / "polygons", "pixels")[0]).metadata
  assert metadata[b"hrnet_beam.simplify_tolerance_px"] == b"1.5"
  for polygon in shaped:
    geometry = wkb.loads(polygon["geometry"])
    assert geometry.is_valid
    assert abs(geometry.area - polygon["area_px"]) <= 1.5 * geometry.length + 1e-9


@pytest.mark.parametrize("flags, message", [
    (["--outputs", "features"], "needs masks"),
    (["--min_polygon_area", "-1"], "--min_polygon_area"),
])
def test_bad_polygon_flags_fail_before_launch(pixel_local_model, tmp_path, flags, message):
  save_image(tmp_path / "a.png", textured_image(40, 40))
  with pytest.raises(ConfigError, match=message):
    run_job("--input", tmp_path / "a.png", "--output", tmp_path / "o", "--model",
            pixel_local_model, "--polygons_output", tmp_path / "p", *flags)
  with pytest.raises(ConfigError, match="add --polygons_output"):
    run_job("--input", tmp_path / "a.png", "--output", tmp_path / "o", "--model",
            pixel_local_model, "--simplify_tolerance", "2")
