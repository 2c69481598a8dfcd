"""The index on synthetic clustered vectors (no model): the plan under a budget, recall
against exact search, filters inside an inverted-file search, --append, and filters."""
import numpy as np
import pytest

from benchmarks.index_scale import write_vectors
from pipeline.cli import index as index_cli
from transforms.index.build import IndexFiles, build_index, parse_bytes, plan_index
from transforms.index.filters import FilterError, evaluate, parse_where
from transforms.index.search import Searcher
from transforms.index.vectors import (LEVEL_PATCH, describe_files, fit_transform,
                                      iter_batches, normalize, output_files)

NAMES = ["clutter", "impervious_surfaces", "building", "low_vegetation", "tree", "car"]


def test_plan_follows_size_and_budget():
  assert plan_index(5_000, 720, 4 << 30).factory == "Flat"
  big = plan_index(1_000_000, 128, 4 << 30)
  assert big.factory == "IVF4096,SQ8" and big.estimated_bytes < 200 << 20
  tight = plan_index(1_000_000, 720, 400 << 20)
  assert tight.factory.startswith("IVF4096,PQ") and tight.estimated_bytes <= 400 << 20
  with pytest.raises(ValueError, match="raise --max_memory"):
    plan_index(1_000_000, 720, 10 << 20)
  assert parse_bytes("4GB") == 4 << 30 and parse_bytes("512MB") == 512 << 20
  with pytest.raises(ValueError, match="not a size"):
    parse_bytes("lots")


def test_filters_read_class_names_loosely_and_fail_clearly():
  clauses = parse_where("Low Vegetation >= 0.2 and building<0.5", NAMES)
  assert clauses == ((3, ">=", 0.2), (2, "<", 0.5))
  fractions = np.array([[0, 0, 0.4, 0.3, 0, 0], [0, 0, 0.6, 0.3, 0, 0],
                        [np.nan] * 6], np.float32)
  assert evaluate(clauses, fractions).tolist() == [True, False, False]
  with pytest.raises(FilterError, match="no class 'roads'"):
    parse_where("roads > 0.1", NAMES)
  with pytest.raises(FilterError, match="cannot read"):
    parse_where("building >> 0.1", NAMES)
  with pytest.raises(FilterError, match=r"\[0, 1\]"):
    parse_where("building > 3", NAMES)


def test_whitening_transform_whitens_the_sample():
  rng = np.random.default_rng(0)
  sample = rng.normal(size=(2000, 40)) @ rng.normal(size=(40, 40)) + 3
  transform = fit_transform(sample.astype(np.float32), "whitened")
  whitened = (sample - transform.mean) @ transform.projection / transform.scale
  np.testing.assert_allclose(np.cov(whitened.T), np.eye(40), atol=1e-3)
  unit = normalize(sample[:5], transform)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-5)


@pytest.fixture(scope="module")
def ivf(tmp_path_factory):
  directory = tmp_path_factory.mktemp("vectors")
  write_vectors(str(directory), 6000, seed=1, name="a", rows_per_file=3000)
  files = describe_files(output_files(f"{directory}/", LEVEL_PATCH), LEVEL_PATCH)
  built = build_index(files, 1 << 30, exact_below=1000)
  IndexFiles(str(directory / "index")).write(*built[:4])
  return directory, built[4]


def test_inverted_file_meets_recall_against_exact_search(ivf):
  directory, report = ivf
  assert report.index_type.startswith("IVF") and report.vectors == 6000
  assert report.recall_at_10 >= 0.95 and report.nprobe >= 1
  assert report.latency_ms_p50 > 0 and report.index_bytes > 0
  assert "PCA-whitened" in report.normalization


def test_filters_apply_inside_the_inverted_file_search(ivf):
  directory, _ = ivf
  searcher = Searcher(str(directory / "index"))
  table = searcher.ids
  fractions = np.array([[f[n] for n in NAMES] for f in
                        table.column("class_fractions").to_pylist()], np.float32)
  where = "building >= 0.45"
  keep = evaluate(parse_where(where, NAMES), fractions)
  assert 0.02 < keep.mean() < 0.2   # a selective filter
  vectors = np.concatenate([v for _, v, _, _ in iter_batches(searcher.vector_files())])
  unit = normalize(vectors, searcher.transform)
  recalls = []
  for query in range(0, 6000, 300):
    hits = searcher.search(vectors[query], k=10, where=where, exclude=query)
    assert len(hits) == 10 and all(keep[h.id] for h in hits)
    scores = unit @ unit[query]
    scores[~keep] = -np.inf
    scores[query] = -np.inf
    truth = set(np.argsort(-scores)[:10])
    recalls.append(len(truth & {h.id for h in hits}) / 10)
  assert np.mean(recalls) >= 0.9, recalls


def test_append_adds_new_files_without_retraining(tmp_path):
  write_vectors(str(tmp_path), 1500, seed=2, name="first", rows_per_file=1500)
  report = index_cli.index(f"{tmp_path}/", str(tmp_path / "index"), level=LEVEL_PATCH)
  before = Searcher(str(tmp_path / "index"))
  write_vectors(str(tmp_path), 700, seed=2, name="second", rows_per_file=700)
  report = index_cli.index(f"{tmp_path}/", str(tmp_path / "index"), level=LEVEL_PATCH,
                           append=True)
  assert report.vectors == 2200 and report.appended_files == 1
  after = Searcher(str(tmp_path / "index"))
  np.testing.assert_array_equal(after.transform.projection, before.transform.projection)
  assert len(after.manifest["files"]) == 2
  new = after.row_of("gs://bucket/second-000003.tif", (1, 2))
  assert new >= 1500
  hits = after.search(after.stored_vector(new), k=1)
  assert hits[0].id == new   # the appended vector is found as itself
  assert index_cli.index(f"{tmp_path}/", str(tmp_path / "index"), level=LEVEL_PATCH,
                         append=True) is None


def test_index_from_and_to_a_bucket_then_search_it(bucket, tmp_path):
  """Vectors in gs://, the index written to gs:// and searched from there (emulator)."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  from inputs import upload  # pylint: disable=import-outside-toplevel
  paths = write_vectors(str(tmp_path), 1200, seed=3, name="bucketed", rows_per_file=600)
  for path in paths:
    with open(path, "rb") as f:
      upload(f"{bucket}/out/{path.rsplit('/', 1)[-1]}", f.read())
  report = index_cli.index(f"{bucket}/out/", f"{bucket}/index", level=LEVEL_PATCH)
  assert report.vectors == 1200
  assert FileSystems.exists(f"{bucket}/index/index.faiss")
  searcher = Searcher(f"{bucket}/index")
  row = searcher.row_of("gs://bucket/bucketed-000004.tif", (0, 5))
  hits = searcher.search(searcher.stored_vector(row), k=3, exclude=row)
  assert len(hits) == 3 and row not in {h.id for h in hits}


def test_rows_written_before_vector_columns_are_indexed(tmp_path):
  """An output directory with rows of an earlier version (pooled_features list<float>,
  null for an image without valid pixels) beside new ones: all are indexed."""
  import json  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  vectors = rng.normal(size=(30, 16)).astype(np.float32)
  metadata = {"hrnet_beam.model": "m", "hrnet_beam.feature_dim": "16",
              "hrnet_beam.outputs": "masks,features",
              "hrnet_beam.class_names": json.dumps(NAMES[:2])}
  old = pa.table({"image_id": [f"old{i}" for i in range(10)],
                  "source": [f"old{i}" for i in range(10)],
                  "pooled_features": pa.array([None] + vectors[1:10].tolist(),
                                              pa.list_(pa.float32()))})
  pq.write_table(old.replace_schema_metadata(metadata),
                 tmp_path / "segmentations-r0-00000-of-00001.parquet")
  new = pa.table({"image_id": [f"new{i}" for i in range(20)],
                  "source": [f"new{i}" for i in range(20)],
                  "pooled_features": pa.FixedSizeListArray.from_arrays(
                      pa.array(vectors[10:].ravel()), 16)})
  pq.write_table(new.replace_schema_metadata(metadata),
                 tmp_path / "segmentations-r1-00000-of-00001.parquet")
  report = index_cli.index(f"{tmp_path}/", str(tmp_path / "index"), normalization="plain")
  assert report.vectors == 29 and report.skipped_no_valid_pixels == 1
  searcher = Searcher(str(tmp_path / "index"))
  row = searcher.row_of("old3")
  np.testing.assert_array_equal(searcher.stored_vector(row), vectors[3])
  assert searcher.search(vectors[3], k=1)[0].image_id == "old3"
