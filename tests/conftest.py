"""Shared fixtures: real SavedModels exported once per session, image writers, job runner."""
import glob
import io
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.standin import hrnet  # noqa: E402
from pipeline.standin.hrnet import stand_in_labels  # noqa: E402

NUM_CLASSES = 7
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_WIDTH = 8


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """Reduced-depth HRNetV2-W8 with the fused function: the real topology, loads in ~1 s."""
  path = str(tmp_path_factory.mktemp("models") / "tiny")
  hrnet.export_hrnet(hrnet.HRNetSpec.reduced(TINY_WIDTH, NUM_CLASSES), path,
                     labels=stand_in_labels(NUM_CLASSES))
  return path


@pytest.fixture(scope="session")
def tiny_model_unfused(tmp_path_factory):
  """The same network exported like the TF Hub models: predict and get_features only."""
  path = str(tmp_path_factory.mktemp("models") / "tiny_unfused")
  hrnet.export_hrnet(hrnet.HRNetSpec.reduced(TINY_WIDTH, NUM_CLASSES), path, fused=False,
                     labels=stand_in_labels(NUM_CLASSES))
  return path


@pytest.fixture(scope="session")
def pixel_local_model(tmp_path_factory):
  """Outputs depend on single pixels only: tiled and untiled runs must agree exactly."""
  path = str(tmp_path_factory.mktemp("models") / "pixel_local")
  hrnet.export_pixel_local(NUM_CLASSES, 15 * TINY_WIDTH, path,
                           labels=stand_in_labels(NUM_CLASSES))
  return path


def textured_image(height, width, seed=0, channels=3):
  """Smooth colour blobs plus noise, uint8: varied enough that masks are not constant."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, channels))
  image = np.repeat(np.repeat(coarse, 16, 0), 16, 1)[:height, :width]
  image = image + rng.integers(-20, 21, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def save_image(path, array, **kwargs):
  Image.fromarray(array).save(path, **kwargs)
  return str(path)


def hrnet_beam(*args):
  """The installed `hrnet-beam` command line with these arguments (for subprocess.run)."""
  return [os.path.join(os.path.dirname(sys.executable), "hrnet-beam"), *map(str, args)]


def duckdb_with(*extensions):
  """DuckDB with extensions (spatial, vss) from their PyPI packages: no download."""
  import importlib  # pylint: disable=import-outside-toplevel
  import duckdb  # pylint: disable=import-outside-toplevel
  con = duckdb.connect()
  for name in extensions:
    package = importlib.import_module(f"duckdb_extension_{name}")
    path = os.path.join(os.path.dirname(package.__file__), "extensions",
                        f"v{duckdb.__version__}", f"{name}.duckdb_extension")
    con.execute(f"INSTALL '{path}'")
    con.execute(f"LOAD {name}")
  return con


def run_job(*args):
  """Runs the job in this process on the local runner; returns its RunSummary."""
  from pipeline.job import run  # pylint: disable=import-outside-toplevel
  return run([str(a) for a in args])


def read_rows(prefix):
  """All rows written under an output prefix, with masks decoded, keyed by image_id."""
  files = sorted(glob.glob(f"{prefix}-*-of-*.parquet"))
  assert files, f"no Parquet files at {prefix}"
  rows = {}
  for file in files:
    for row in pq.read_table(file).to_pylist():
      assert row["image_id"] not in rows, f"{row['image_id']} written twice"
      if row["mask_png"] is not None:
        row["mask"] = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
      rows[row["image_id"]] = row
  return rows


def read_errors(prefix):
  errors = []
  for file in sorted(glob.glob(f"{prefix}-*.jsonl")):
    with open(file, encoding="utf-8") as f:
      errors.extend(json.loads(line) for line in f if line.strip())
  return errors


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS emulator behind a fault proxy (no faults until asked), for the whole session.

  The environment points every Google client of this process (and of worker processes
  it starts) at the proxy, as a user would point the pipeline at an emulator.
  """
  import gcs as gcs_lib  # pylint: disable=import-outside-toplevel
  emulator = gcs_lib.Emulator()
  proxy = gcs_lib.FaultProxy(emulator.port, fraction=0.0, max_faults=0, lifetime_s=3600)
  environment = gcs_lib.client_environment(
      proxy.endpoint, str(tmp_path_factory.mktemp("gcs") / "credentials.json"))
  with pytest.MonkeyPatch.context() as patch:
    for key, value in environment.items():
      patch.setenv(key, value)
    yield type("Gcs", (), {"emulator": emulator, "proxy": proxy})
  proxy.stop()
  emulator.stop()


@pytest.fixture()
def bucket(gcs):
  """A new, empty bucket in the emulator: gs://b-<random>."""
  import uuid  # pylint: disable=import-outside-toplevel
  name = f"b-{uuid.uuid4().hex[:10]}"
  gcs.emulator.create_bucket(name)
  return f"gs://{name}"
