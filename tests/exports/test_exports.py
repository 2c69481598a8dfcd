"""hrnet-beam export: each format decoded back by its own ecosystem's reader to the
same mask, pixel for pixel."""
import json
import os
import subprocess
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, hrnet_beam, read_rows, run_job, save_image, textured_image
from inputs import write_geotiff
from pipeline.cli.export import export
from transforms.exports.cvat import cvat_colours
from transforms.exports.labelstudio import brush_rle
from transforms.labels import packaged_labels
from transforms.types import NODATA_CLASS

TILE, OVERLAP = 64, 32
IGNORE = 254


@pytest.fixture(scope="module")
def job(pixel_local_model, tmp_path_factory):
  """Three images in two folders (one GeoTIFF with nodata), pseudo-labels too."""
  tmp = tmp_path_factory.mktemp("exports")
  (tmp / "in" / "north").mkdir(parents=True)
  save_image(tmp / "in" / "a.png", textured_image(70, 90, seed=31))
  save_image(tmp / "in" / "north" / "b.jpg", textured_image(64, 64, seed=32), quality=95)
  alpha = np.full((80, 60), 255, np.uint8)
  alpha[:20] = 0
  write_geotiff(tmp / "in" / "north" / "c.tif", textured_image(80, 60, seed=33), alpha=alpha)
  out = tmp / "out" / "rows"
  summary = run_job("--input", tmp / "in" / "*", "--input", tmp / "in" / "north" / "*",
                    "--output", out, "--model", pixel_local_model, "--tile_size", TILE,
                    "--tile_overlap", OVERLAP, "--ignore_below", 0.5)
  assert summary.rows == 3 and summary.errors == 0
  rows = {r["source"].split("/in/", 1)[1]: r for r in read_rows(out).values()}
  return tmp, out, rows


def _pseudo(row):
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  mask = np.asarray(Image.open(io.BytesIO(row["pseudo_label_png"])))
  return np.where(mask == IGNORE, NODATA_CLASS, mask)


def test_coco_decodes_with_pycocotools(job):
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
  tmp, out, rows = job
  result = export(str(out), "coco", str(tmp / "coco"))
  assert result["images"] == 3
  coco = COCO(str(tmp / "coco" / "annotations.json"))
  names = packaged_labels("isprs").class_names
  assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(names)
  images = {i["file_name"]: i for i in coco.loadImgs(coco.getImgIds())}
  assert set(images) == {"a.png", "north/b.jpg", "north/c.tif"}
  for file_name, image in images.items():
    row = rows[file_name]
    assert (image["height"], image["width"]) == row["mask"].shape
    rebuilt = np.full(row["mask"].shape, NODATA_CLASS, np.uint8)
    for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
      pixels = coco.annToMask(annotation).astype(bool)
      assert not (rebuilt[pixels] != NODATA_CLASS).any()     # classes do not overlap
      rebuilt[pixels] = annotation["category_id"] - 1
      assert annotation["area"] == pixels.sum()
      assert 0 < annotation["score"] <= 1
    np.testing.assert_array_equal(rebuilt, row["mask"])
  assert (rows["north/c.tif"]["mask"][:20] == NODATA_CLASS).all()


def test_label_studio_brushes_decode_with_its_converter(job):
  from label_studio_converter.brush import decode_rle  # pylint: disable=import-outside-toplevel
  tmp, out, rows = job
  export(str(out), "labelstudio", str(tmp / "ls"), url_prefix="/data/local-files/?d=in/")
  tasks = json.loads((tmp / "ls" / "tasks.json").read_text())
  config = (tmp / "ls" / "label_config.xml").read_text()
  assert '<BrushLabels name="label" toName="image">' in config and "building" in config
  assert len(tasks) == 3
  names = packaged_labels("isprs").class_names
  for item in tasks:
    relative = item["data"]["image"].split("?d=in/", 1)[1]
    row = rows[relative]
    prediction = item["predictions"][0]
    assert prediction["score"] == pytest.approx(row["mean_confidence"])
    assert prediction["model_version"].endswith("pixel_local")
    rebuilt = np.full(row["mask"].shape, NODATA_CLASS, np.uint8)
    for result in prediction["result"]:
      assert (result["original_height"], result["original_width"]) == row["mask"].shape
      alpha = np.reshape(decode_rle(result["value"]["rle"]),
                         [result["original_height"], result["original_width"], 4])[:, :, 3]
      rebuilt[alpha == 255] = names.index(result["value"]["brushlabels"][0])
    np.testing.assert_array_equal(rebuilt, row["mask"])


# Runs in .venv-datumaro (make test builds it): datumaro cannot share this venv.
DATUMARO_IMPORT = """
import sys
import numpy as np
import datumaro as dm
dataset = dm.Dataset.import_from(sys.argv[1], "voc_segmentation")
names = [c.name for c in dataset.categories()[dm.AnnotationType.label].items]
arrays = {"__names__": np.array(names)}
for item in dataset:
  for annotation in item.annotations:
    if annotation.type == dm.AnnotationType.mask:
      arrays[item.id + "|" + names[annotation.label]] = annotation.image.astype(bool)
np.savez(sys.argv[2], **arrays)
"""
DATUMARO_PYTHON = os.path.join(REPO_ROOT, ".venv-datumaro", "bin", "python")


def test_cvat_masks_import_with_datumaro_and_pseudo_labels_leave_ignored_unlabelled(job):
  assert os.path.exists(DATUMARO_PYTHON), "no .venv-datumaro: run the tests with make test"
  tmp, out, rows = job
  export(str(out), "cvat", str(tmp / "cvat"), which="pseudo")
  labels = packaged_labels("isprs")
  names = labels.class_names
  colours = cvat_colours(names, labels.palette)
  assert len(set(colours)) == len(colours)
  # ISPRS's labels name a 'background' class (black): it is CVAT's background, which
  # CVAT reads as unlabelled, like nodata and ignored pixels.
  assert colours[names.index("background")] == (0, 0, 0)
  labelmap = (tmp / "cvat" / "labelmap.txt").read_text().splitlines()
  assert labelmap[1] == "background:0,0,0::" and len(labelmap) == 1 + len(names)
  done = subprocess.run([DATUMARO_PYTHON, "-c", DATUMARO_IMPORT, tmp / "cvat",
                         tmp / "datumaro.npz"], capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  imported = np.load(tmp / "datumaro.npz")
  assert imported["__names__"].tolist() == list(names)
  masks = {}
  for key in imported.files:
    if key != "__names__":
      item_id, label = key.split("|")
      masks.setdefault(item_id, []).append((label, imported[key]))
  assert set(masks) == {"a", "north/b", "north/c"}
  ignored = 0
  for item_id, layers in masks.items():
    row = rows[next(k for k in rows if k.rsplit(".", 1)[0] == item_id)]
    expected = _pseudo(row)
    expected[expected == names.index("background")] = NODATA_CLASS
    ignored += int((expected == NODATA_CLASS).sum())
    rebuilt = np.full(expected.shape, NODATA_CLASS, np.uint8)
    for label, pixels in layers:
      if label != "background":
        assert not (rebuilt[pixels] != NODATA_CLASS).any()
        rebuilt[pixels] = names.index(label)
    np.testing.assert_array_equal(rebuilt, expected)
  assert ignored > 20 * 60    # the nodata rows, and some low-confidence pixels
  assert sum(int((_pseudo(r) != r["mask"]).sum()) for r in rows.values()) > 0   # ignored ones


def test_export_to_gcs_and_through_the_command(job, bucket):
  tmp, out, rows = job
  result = export(str(out), "coco", f"{bucket}/exports/coco")
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  with FileSystems.open(result["files"][0]) as f:
    assert len(json.loads(f.read())["images"]) == 3
  done = subprocess.run(hrnet_beam("export", "--format", "cvat", out, "--to", tmp / "cli"),
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert "cvat: 3 images" in done.stdout
  assert len(os.listdir(tmp / "cli" / "SegmentationClass" / "north")) == 2
  done = subprocess.run(hrnet_beam("export", "--format", "coco", tmp / "nothing", "--to",
                                   tmp / "x"), capture_output=True, text=True, check=False)
  assert done.returncode == 2 and "no Parquet rows" in done.stderr


def test_export_streams_rows_with_bounded_memory(tmp_path):
  """1000 rows of 256 x 256 masks (65 MB decoded) exported with far less held."""
  from transforms.pngs import encode_png  # pylint: disable=import-outside-toplevel
  from transforms.writing.parquet import _FIELDS  # pylint: disable=import-outside-toplevel
  labels = packaged_labels("isprs")
  schema = pa.schema(_FIELDS, metadata={
      "hrnet_beam.class_names": json.dumps(list(labels.class_names)),
      "hrnet_beam.palette": json.dumps([list(c) for c in labels.palette]),
      "hrnet_beam.model": "synthetic"})
  rng = np.random.default_rng(0)
  masks = [encode_png(np.repeat(np.repeat(rng.integers(0, 7, (16, 16)), 16, 0), 16, 1)
                      .astype(np.uint8)) for _ in range(8)]
  with pq.ParquetWriter(str(tmp_path / "rows-00000-of-00001.parquet"), schema) as writer:
    for start in range(0, 1000, 200):
      batch = [{"image_id": f"/data/img{i:05d}.png", "source": f"/data/img{i:05d}.png",
                "height": 256, "width": 256, "mask_png": masks[i % 8], "model": "synthetic",
                "precision": "float32", "valid_pixels": 65536, "augmentation": "none",
                "engine": "tensorflow"}
               for i in range(start, start + 200)]
      writer.write_table(pa.Table.from_pylist(batch, schema=schema))
  tracemalloc.start()
  result = export(str(tmp_path / "rows"), "coco", str(tmp_path / "coco"))
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert result["images"] == 1000
  assert peak < 16 << 20, peak
  coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
  assert len(coco["images"]) == 1000 and coco["images"][-1]["file_name"] == "img00999.png"
  assert len(coco["annotations"]) == 7000


def test_cvat_colours_are_unique_and_black_only_for_background():
  colours = cvat_colours(["road", "car", "tree", "background"],
                         [(0, 0, 0), (9, 9, 9), (9, 9, 9), (5, 5, 5)])
  assert colours == [(0, 0, 1), (9, 9, 9), (9, 9, 10), (0, 0, 0)]


def test_brush_rle_round_trips_long_runs():
  from label_studio_converter.brush import decode_rle  # pylint: disable=import-outside-toplevel
  mask = np.zeros((300, 500), bool)      # runs far longer than one 16-bit chunk
  mask[120:121, 7:400] = True
  decoded = np.reshape(decode_rle(brush_rle(mask)), [300, 500, 4])
  assert (decoded == (mask * 255)[:, :, None]).all()
