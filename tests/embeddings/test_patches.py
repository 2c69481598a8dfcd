"""Patch embeddings (--patch_output) and the vector columns: exact across tile seams and
raster blocks, GeoParquet read by DuckDB spatial, vectors read by DuckDB vss and LanceDB."""
import glob

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st
from shapely import wkb

from conftest import (NUM_CLASSES, TINY_WIDTH, duckdb_with, read_rows, run_job, save_image,
                      textured_image)
from inputs import TRANSFORM, write_geotiff
from pipeline.job.config import ConfigError
from transforms.embeddings.patches import patch_slots, patches_in_box
from transforms.types import NODATA_CLASS

FEATURES = 15 * TINY_WIDTH
PATCH = 48


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.integers(1, 300), st.integers(0, 500), st.integers(1, 300),
       st.integers(32, 200))
def test_patches_in_box_partition_the_box_within_the_slot_bound(y0, h, x0, w, size):
  found = list(patches_in_box(y0, y0 + h, x0, x0 + w, size))
  assert len(found) <= patch_slots(h, w, size)
  assert sum((b[1] - b[0]) * (b[3] - b[2]) for _, _, b in found) == h * w
  for row, column, (py0, py1, px0, px1) in found:
    assert row * size <= py0 < py1 <= (row + 1) * size
    assert column * size <= px0 < px1 <= (column + 1) * size


def _pixel_features(model_dir, image):
  """The pixel-local model's feature of each pixel, for the whole image in one call."""
  module = tf.saved_model.load(model_dir)
  cells = module.get_features(image.astype(np.float32)[None] / 255).numpy()[0]
  return np.repeat(np.repeat(cells.astype(np.float64), 4, 0), 4, 1)[:image.shape[0],
                                                                    :image.shape[1]]


def _patches(prefix):
  files = sorted(glob.glob(f"{prefix}-*.parquet"))
  assert files, f"no patch files at {prefix}"
  return pq.read_table(files).to_pylist()


@pytest.fixture(scope="module")
def patch_run(pixel_local_model, tmp_path_factory):
  """A georeferenced scene with nodata on the left and a plain image, tiled at 64 px."""
  tmp = tmp_path_factory.mktemp("patches")
  (tmp / "in").mkdir()
  rgb = np.maximum(textured_image(150, 170, seed=31), 1)
  valid = np.ones((150, 170), bool)
  valid[:, :40] = False
  rgb[~valid] = 0
  write_geotiff(tmp / "in" / "scene.tif", rgb, nodata=0)
  plain = textured_image(90, 110, seed=32)
  save_image(tmp / "in" / "plain.png", plain)
  summary = run_job("--input", tmp / "in" / "*", "--output", tmp / "out" / "rows",
                    "--model", pixel_local_model, "--tile_size", 64, "--tile_overlap", 32,
                    "--patch_output", tmp / "out" / "patches", "--patch_size", PATCH,
                    "--run_id", "r1")
  assert summary.rows == 2 and summary.errors == 0
  rows = {r["source"].rsplit("/", 1)[-1]: r for r in read_rows(tmp / "out" / "rows").values()}
  return dict(tmp=tmp, summary=summary, rows=rows, scene=(rgb, valid), plain=plain,
              prefix=tmp / "out" / "patches")


def test_patch_embeddings_are_exact_means_over_valid_pixels(patch_run, pixel_local_model):
  patches = _patches(patch_run["prefix"])
  assert patch_run["summary"].metrics["patches"] == len(patches)
  for name, (image, valid) in (("scene.tif", patch_run["scene"]),
                               ("plain.png", (patch_run["plain"], None))):
    row = patch_run["rows"][name]
    mine = [p for p in patches if p["image_id"] == row["image_id"]]
    per_pixel = _pixel_features(pixel_local_model, image)
    height, width = image.shape[:2]
    valid = np.ones((height, width), bool) if valid is None else valid
    expected = {(r, c) for r in range(-(-height // PATCH)) for c in range(-(-width // PATCH))
                if valid[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].any()}
    assert {(p["patch_row"], p["patch_col"]) for p in mine} == expected   # empty ones left out
    for p in mine:
      assert (p["y0"], p["x0"]) == (p["patch_row"] * PATCH, p["patch_col"] * PATCH)
      assert (p["y1"], p["x1"]) == (min(p["y0"] + PATCH, height), min(p["x0"] + PATCH, width))
      inside = valid[p["y0"]:p["y1"], p["x0"]:p["x1"]]
      assert p["valid_pixels"] == inside.sum()
      want = per_pixel[p["y0"]:p["y1"], p["x0"]:p["x1"]][inside].mean(axis=0)
      np.testing.assert_allclose(p["embedding"], want, rtol=2e-5, atol=2e-6)
      region = row["mask"][p["y0"]:p["y1"], p["x0"]:p["x1"]]
      counts = np.bincount(region.ravel(), minlength=NODATA_CLASS + 1)[:NUM_CLASSES]
      assert p["class_counts"] == counts.tolist()
      assert sum(p["class_fractions"].values()) == pytest.approx(1, abs=1e-5)
    # Weighted by their valid pixels, the patches give the image's pooled features back.
    total = sum(np.asarray(p["embedding"], np.float64) * p["valid_pixels"] for p in mine)
    np.testing.assert_allclose(total / row["valid_pixels"], row["pooled_features"], rtol=2e-5,
                               atol=2e-6)


def test_patches_are_geoparquet_with_footprints_duckdb_reads(patch_run):
  files = sorted(glob.glob(f"{patch_run['prefix']}-epsg32632-r1-*.parquet"))
  assert files and glob.glob(f"{patch_run['prefix']}-pixels-r1-*.parquet")
  schema = pq.read_schema(files[0])
  assert schema.field("embedding").type == pa.list_(pa.float32(), FEATURES)
  assert schema.metadata[b"hrnet_beam.patch_size"] == str(PATCH).encode()
  con = duckdb_with("spatial")
  got = con.execute(f"""
      SELECT patch_row, patch_col, ST_Area(geometry), ST_XMin(geometry), ST_YMax(geometry),
             typeof(geometry), x1 - x0, y1 - y0
      FROM read_parquet({[str(f) for f in files]})""").fetchall()
  a, _, c, _, e, f = tuple(TRANSFORM)[:6]
  for row, column, area, xmin, ymax, kind, width, height in got:
    assert kind == "GEOMETRY('EPSG:32632')"   # the CRS from the geo metadata
    assert area == pytest.approx(width * height * abs(a * e))
    assert (xmin, ymax) == pytest.approx((c + column * PATCH * a, f + row * PATCH * e))
  # The bbox column filters like the geometry does.
  xmid = c + 100 * a
  by_bbox = con.execute(f"SELECT count(*) FROM read_parquet({[str(f) for f in files]}) "
                        f"WHERE bbox.xmin > {xmid}").fetchone()[0]
  by_geometry = con.execute(f"SELECT count(*) FROM read_parquet({[str(f) for f in files]}) "
                            f"WHERE ST_XMin(geometry) > {xmid}").fetchone()[0]
  assert by_bbox == by_geometry > 0


def test_vector_columns_are_vectors_for_duckdb_vss_and_lancedb(patch_run, tmp_path):
  rows_files = sorted(glob.glob(f"{patch_run['tmp']}/out/rows-*.parquet"))
  patch_files = sorted(glob.glob(f"{patch_run['prefix']}-*.parquet"))
  con = duckdb_with("vss")
  kind, = con.execute(f"SELECT typeof(pooled_features::FLOAT[{FEATURES}]) FROM "
                      f"read_parquet({rows_files}) LIMIT 1").fetchone()
  assert kind == f"FLOAT[{FEATURES}]"
  con.execute(f"CREATE TABLE patches AS SELECT image_id, patch_row, patch_col, "
              f"embedding::FLOAT[{FEATURES}] AS embedding, class_fractions "
              f"FROM read_parquet({patch_files})")
  con.execute("CREATE INDEX patches_hnsw ON patches USING HNSW (embedding) "
              "WITH (metric = 'cosine')")
  query = pq.read_table(patch_files).to_pylist()[5]
  nearest = con.execute(f"""
      SELECT image_id, patch_row, patch_col FROM patches
      ORDER BY array_cosine_distance(embedding, {query['embedding']}::FLOAT[{FEATURES}])
      LIMIT 1""").fetchone()
  assert nearest == (query["image_id"], query["patch_row"], query["patch_col"])
  # Class fractions are columns a filter can use.
  names = list(query["class_fractions"])
  share = con.execute(f'SELECT count(*) FROM patches WHERE class_fractions."{names[1]}" '
                      '>= 0.3').fetchone()[0]
  table = pq.read_table(patch_files)
  assert share == sum(1 for f in table.column("class_fractions").to_pylist()
                      if f[names[1]] >= 0.3)
  import lancedb  # pylint: disable=import-outside-toplevel
  db = lancedb.connect(str(tmp_path / "lance"))
  lance_table = db.create_table("patches", table.select(
      ["image_id", "patch_row", "patch_col", "embedding"]))
  hits = lance_table.search(np.asarray(query["embedding"]), vector_column_name="embedding") \
      .limit(1).to_list()
  assert (hits[0]["image_id"], hits[0]["patch_row"], hits[0]["patch_col"]) == (
      query["image_id"], query["patch_row"], query["patch_col"])


def test_blocks_give_the_patches_of_the_whole_raster(pixel_local_model, tmp_path):
  """Blocks of 64 px and patches of 48 px: patches cross block edges and are added up."""
  (tmp_path / "in").mkdir()
  rgb = np.maximum(textured_image(150, 170, seed=33), 1)
  rgb[:20, :] = 0
  write_geotiff(tmp_path / "in" / "scene.tif", rgb, nodata=0)
  common = ["--input", tmp_path / "in" / "scene.tif", "--model", pixel_local_model,
            "--tile_size", 64, "--tile_overlap", 32, "--patch_size", PATCH]
  run_job(*common, "--output", tmp_path / "whole" / "rows", "--patch_output",
          tmp_path / "whole" / "patches")
  summary = run_job(*common, "--output", tmp_path / "blocks" / "rows", "--window_threshold",
                    1000, "--block_size", 64, "--patch_output", tmp_path / "blocks" / "patches")
  assert summary.rows == 9
  key = lambda p: (p["patch_row"], p["patch_col"])
  whole = sorted(_patches(tmp_path / "whole" / "patches"), key=key)
  blocks = sorted(_patches(tmp_path / "blocks" / "patches"), key=key)
  assert [key(p) for p in blocks] == [key(p) for p in whole]
  for got, want in zip(blocks, whole):
    assert got["image_id"] == str(tmp_path / "in" / "scene.tif")
    for column in ("y0", "x0", "y1", "x1", "valid_pixels", "class_counts"):
      assert got[column] == want[column], column
    np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=2e-5, atol=2e-6)
    assert wkb.loads(got["geometry"]).equals(wkb.loads(want["geometry"]))


@pytest.mark.parametrize("flags, message", [
    (["--patch_output", "P", "--outputs", "masks"], "needs features"),
    (["--patch_output", "P", "--patch_size", "8"], "--patch_size 8"),
])
def test_bad_patch_flags_fail_before_launch(pixel_local_model, tmp_path, flags, message):
  save_image(tmp_path / "a.png", textured_image(40, 40))
  flags = [str(tmp_path / f) if f == "P" else f for f in flags]
  with pytest.raises(ConfigError, match=message):
    run_job("--input", tmp_path / "a.png", "--output", tmp_path / "o" / "rows", "--model",
            pixel_local_model, *flags)


def test_patch_embeddings_are_identical_across_runs_and_batch_sizes(tiny_model, tmp_path):
  (tmp_path / "in").mkdir()
  for seed in range(3):
    save_image(tmp_path / "in" / f"im{seed}.png", textured_image(130, 150, seed=40 + seed))
  runs = []
  for name, batch in (("a", 1), ("b", 4)):
    run_job("--input", tmp_path / "in" / "*.png", "--output", tmp_path / name / "rows",
            "--model", tiny_model, "--tile_size", 64, "--tile_overlap", 32,
            "--batch_size", batch, "--patch_output", tmp_path / name / "patches",
            "--patch_size", 40)
    runs.append({(p["image_id"], p["patch_row"], p["patch_col"]): p
                 for p in _patches(tmp_path / name / "patches")})
  assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 3 * 4 * 4
  for key, patch in runs[0].items():
    assert patch["embedding"] == runs[1][key]["embedding"]   # byte for byte
    assert patch["class_counts"] == runs[1][key]["class_counts"]
