"""hrnet-beam evaluate and import on a real job's rows: truth as masks and as each
labeling tool's file, edited with that tool's own library the way a reviewer edits it;
the report checked against scikit-learn on the same pixels."""
import copy
import io
import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, jaccard_score

from conftest import (REPO_ROOT, duckdb_with, hrnet_beam, read_rows, run_job, save_image,
                      textured_image)
from inputs import write_geotiff
from pipeline.cli.evaluate import evaluate
from pipeline.cli.export import export
from pipeline.job.config import ConfigError
from transforms.evaluation.importing import import_labels
from transforms.types import NODATA_CLASS

TILE, OVERLAP = 64, 32
SIZES = {"a": (70, 90), "b": (64, 64), "d": (40, 56), "e": (48, 48), "f": (32, 48),
         "h": (40, 40)}


@pytest.fixture(scope="module")
def job(pixel_local_model, tmp_path_factory):
  """Seven images (c a GeoTIFF with nodata rows), with confidence maps."""
  tmp = tmp_path_factory.mktemp("evaluate")
  (tmp / "in").mkdir()
  for seed, (name, (h, w)) in enumerate(SIZES.items()):
    save_image(tmp / "in" / f"{name}.png", textured_image(h, w, seed=40 + seed))
  alpha = np.full((80, 60), 255, np.uint8)
  alpha[:20] = 0
  write_geotiff(tmp / "in" / "c.tif", textured_image(80, 60, seed=49), alpha=alpha)
  out = tmp / "out" / "rows"
  summary = run_job("--input", tmp / "in" / "*", "--output", out, "--model",
                    pixel_local_model, "--tile_size", TILE, "--tile_overlap", OVERLAP,
                    "--outputs", "masks,confidence")
  assert summary.rows == 7 and summary.errors == 0
  rows = {os.path.basename(r["source"]).split(".")[0]: r for r in read_rows(out).values()}
  for row in rows.values():
    row["confidence"] = np.asarray(Image.open(io.BytesIO(row["confidence_png"])))
  return tmp, out, rows


def _expected(pairs, num_classes=7):
  """sklearn's confusion matrix over the pixels valid in both (truth 255: unlabelled)."""
  truth = np.concatenate([t[(t != 255) & (p != NODATA_CLASS)] for p, t in pairs])
  predicted = np.concatenate([p[(t != 255) & (p != NODATA_CLASS)] for p, t in pairs])
  return truth, predicted, confusion_matrix(truth, predicted, labels=range(num_classes))


def _save_mask(path, mask):
  Image.fromarray(mask.astype(np.uint8)).save(path)


def test_mask_truth_report_equals_scikit_learn_and_names_every_problem(job, tmp_path):
  _, out, rows = job
  truth_dir = tmp_path / "truth"
  truth_dir.mkdir()
  truths = {}
  a = rows["a"]["mask"].copy()
  a[10:30, 20:50] = (a[10:30, 20:50] + 1) % 7        # a reviewer's corrections
  a[:5] = 255                                         # left unlabelled
  truths["a"] = a
  b = rows["b"]["mask"].copy()
  b[b == 2] = 4
  truths["b"] = b
  c = np.where(rows["c"]["mask"] == NODATA_CLASS, 255, rows["c"]["mask"])
  c[40:] = 6
  truths["c"] = c
  for name in ("a", "b"):
    _save_mask(truth_dir / f"{name}.labels.png", truths[name])
  write_geotiff_mask(truth_dir / "c.labels.tif", truths["c"])
  _save_mask(truth_dir / "d.labels.png", np.zeros((10, 10)))         # another size
  bad = rows["e"]["mask"].copy()
  bad[0, 0] = 9                                                      # no such class
  _save_mask(truth_dir / "e.labels.png", bad)
  (truth_dir / "h.labels.png").write_bytes(b"\x89PNG not really")    # does not decode
  _save_mask(truth_dir / "zz.labels.png", np.zeros((5, 5)))          # no such row
  report_dir = tmp_path / "report"
  report = evaluate([str(out), "--truth", str(truth_dir / "*"), "--truth_suffix", ".labels",
                     "--report", str(report_dir)])
  pairs = [(rows[n]["mask"], truths[n]) for n in ("a", "b", "c")]
  y_true, y_pred, confusion = _expected(pairs)
  assert report["confusion"] == confusion.tolist()
  assert report["images_evaluated"] == 3
  iou = jaccard_score(y_true, y_pred, labels=range(7), average=None, zero_division=0)
  names = report["classes"]
  for i, name in enumerate(names):
    got = report["per_class"][name]["iou"]
    absent = not ((y_true == i) | (y_pred == i)).any()
    assert (got is None) == absent and (absent or got == pytest.approx(iou[i])), name
  assert report["pixel_accuracy"] == pytest.approx((y_true == y_pred).mean())
  # Calibration from the rows' confidence maps, pixel by pixel.
  conf = np.concatenate([rows[n]["confidence"][(truths[n] != 255) &
                                               (rows[n]["mask"] != NODATA_CLASS)]
                         for n in ("a", "b", "c")]) / 255.0
  right = y_true == y_pred
  bins = np.minimum((conf * 15).astype(int), 14)
  ece = sum(abs(right[bins == k].mean() - conf[bins == k].mean()) * (bins == k).mean()
            for k in range(15) if (bins == k).any())
  assert report["calibration"]["ece"] == pytest.approx(ece, abs=1e-9)
  # Review: images by mean_confidence, lowest first.
  wrong = {n: int(((truths[n] != rows[n]["mask"]) & (truths[n] != 255) &
                   (rows[n]["mask"] != NODATA_CLASS)).sum()) for n in ("a", "b", "c")}
  first = min(("a", "b", "c"), key=lambda n: rows[n]["mean_confidence"])
  assert report["review"]["by_mean_confidence"]["caught"][33] == pytest.approx(
      wrong[first] / sum(wrong.values()))
  counts = report["problems"]["counts"]
  assert counts == {"size_mismatch": 1, "unknown_class_ids": 1, "truth_does_not_decode": 1,
                    "truth_without_row": 1, "row_without_truth": 1}, counts
  named = {p["kind"]: p for kind in report["problems"]["examples"].values() for p in kind}
  assert named["row_without_truth"]["image_id"].endswith("/f.png")
  assert named["truth_without_row"]["truth"].endswith("zz.labels.png")
  assert "9" in named["unknown_class_ids"]["reason"]
  assert "56x40" in named["size_mismatch"]["reason"]
  for plot in ("confusion.png", "class_iou.png", "reliability.png", "review.png"):
    assert Image.open(report_dir / plot).size[0] > 200
  assert json.loads((report_dir / "report.json").read_text())["miou"] == report["miou"]
  # Per-image metrics join the rows' QA columns in DuckDB.
  con = duckdb_with()
  joined = con.execute(
      f"SELECT p.image_id, p.pixel_accuracy, p.class_iou.building, r.mean_confidence "
      f"FROM '{report_dir}/per_image-*.parquet' p JOIN '{out}-*.parquet' r "
      f"USING (image_id) ORDER BY p.image_id").fetchall()
  assert [os.path.basename(j[0]) for j in joined] == ["a.png", "b.png", "c.tif"]
  for image_id, accuracy, _, mean_confidence in joined:
    name = os.path.basename(image_id)[0]
    counted = (truths[name] != 255) & (rows[name]["mask"] != NODATA_CLASS)
    assert accuracy == pytest.approx((truths[name] == rows[name]["mask"])[counted].mean())
    assert mean_confidence == pytest.approx(rows[name]["mean_confidence"])


def write_geotiff_mask(path, mask):
  import rasterio  # pylint: disable=import-outside-toplevel
  from inputs import TRANSFORM  # pylint: disable=import-outside-toplevel
  with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0],
                     count=1, dtype="uint8", crs="EPSG:32632", transform=TRANSFORM) as d:
    d.write(mask.astype(np.uint8), 1)


def test_a_class_map_naming_unknown_classes_fails_before_anything_runs(job, tmp_path):
  _, out, _ = job
  (tmp_path / "map.json").write_text(json.dumps({"roofs": "building"}))
  (tmp_path / "t").mkdir()
  _save_mask(tmp_path / "t" / "a.png", np.zeros((70, 90)))
  with pytest.raises(ConfigError, match="'roofs' is not one of the truth's classes"):
    evaluate([str(out), "--truth", str(tmp_path / "t" / "*"), "--class_map",
              str(tmp_path / "map.json"), "--report", str(tmp_path / "r")])
  assert not (tmp_path / "r").exists()
  done = subprocess.run(hrnet_beam("evaluate", out, "--truth", tmp_path / "none*",
                                   "--report", tmp_path / "r", "--tile_size", "3"),
                        capture_output=True, text=True, check=False)
  assert done.returncode == 2 and "unknown flag --tile_size" in done.stderr
  done = subprocess.run(hrnet_beam("evaluate", out, "--truth", tmp_path / "none*",
                                   "--report", tmp_path / "r"),
                        capture_output=True, text=True, check=False)
  assert done.returncode == 2 and "matches no file" in done.stderr


def _reviewed_truth(rows, deleted, relabelled, painted):
  """The truth a reviewer's three edits make of the pre-labels: a region deleted (now
  unlabelled), a region relabelled, a new region painted on top."""
  truths = {n: np.where(r["mask"] == NODATA_CLASS, 255, r["mask"]).astype(np.uint8)
            for n, r in rows.items()}
  name, class_id = deleted
  truths[name][rows[name]["mask"] == class_id] = 255
  name, old, new = relabelled
  truths[name][rows[name]["mask"] == old] = new
  name, (y0, y1, x0, x1), class_id = painted
  truths[name][y0:y1, x0:x1] = class_id
  return truths


def _check_round_trip(report, rows, truths):
  _, _, confusion = _expected([(rows[n]["mask"], truths[n]) for n in sorted(rows)])
  assert report["confusion"] == confusion.tolist()
  assert report["problems"]["counts"] == {}
  assert report["images_evaluated"] == len(rows)


def _evaluate_both_ways(out, tmp_path, fmt, tool_file):
  """Straight from the tool's file, and through `import` then mask truth."""
  direct = evaluate([str(out), "--truth", str(tool_file), "--truth_format", fmt,
                     "--report", str(tmp_path / "direct")])
  result = import_labels(fmt, str(tool_file), str(tmp_path / "imported"), rows=str(out))
  assert not result.problems and result.images == 7 and result.geotiffs == 1
  imported = evaluate([str(out), "--truth", str(tmp_path / "imported" / "masks" / "*"),
                       "--truth_labels", str(tmp_path / "imported" / "labels.json"),
                       "--report", str(tmp_path / "via_import")])
  return direct, imported


def test_coco_round_trip_edited_with_pycocotools(job, tmp_path):
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  _, out, rows = job
  export(str(out), "coco", str(tmp_path / "coco"))
  data = json.loads((tmp_path / "coco" / "annotations.json").read_text())
  images = {i["file_name"]: i["id"] for i in data["images"]}
  a_classes = [ann for ann in data["annotations"] if ann["image_id"] == images["a.png"]]
  b_classes = [ann for ann in data["annotations"] if ann["image_id"] == images["b.png"]]
  deleted, relabelled = a_classes[0], b_classes[0]
  data["annotations"].remove(deleted)
  relabelled["category_id"] = relabelled["category_id"] % 7 + 1
  painted = np.zeros((64, 64), np.uint8)
  painted[5:25, 30:60] = 1
  rle = mask_utils.encode(np.asfortranarray(painted))
  data["annotations"].append({"id": 10 ** 6, "image_id": images["b.png"], "category_id": 6,
                              "segmentation": {"size": rle["size"],
                                               "counts": rle["counts"].decode()},
                              "area": int(painted.sum()), "bbox": [30, 5, 30, 20],
                              "iscrowd": 0})
  # A polygon, as annotation tools save hand-drawn regions, on the GeoTIFF.
  data["annotations"].append({"id": 10 ** 6 + 1, "image_id": images["c.tif"],
                              "category_id": 4, "segmentation": [[10, 30, 40, 30, 40, 50,
                                                                  10, 50]],
                              "area": 600, "bbox": [10, 30, 30, 20], "iscrowd": 0})
  (tmp_path / "reviewed.json").write_text(json.dumps(data))
  truths = _reviewed_truth(rows, ("a", deleted["category_id"] - 1),
                           ("b", relabelled["category_id"] - 2 if relabelled["category_id"] > 1
                            else 6, relabelled["category_id"] - 1),
                           ("b", (5, 25, 30, 60), 5))
  truths["c"][30:50, 10:40] = 3
  direct, imported = _evaluate_both_ways(out, tmp_path, "coco", tmp_path / "reviewed.json")
  for report in (direct, imported):
    _check_round_trip(report, rows, truths)
  # The imported GeoTIFF truth keeps the source's georeferencing.
  import rasterio  # pylint: disable=import-outside-toplevel
  with rasterio.open(tmp_path / "imported" / "masks" / "c.tif") as dataset, \
      rasterio.open(str(rows["c"]["source"])) as source:
    assert dataset.crs == source.crs and dataset.transform == source.transform
    np.testing.assert_array_equal(dataset.read(1), truths["c"])


def test_label_studio_round_trip_edited_with_its_converter(job, tmp_path):
  from label_studio_converter.brush import mask2rle  # pylint: disable=import-outside-toplevel
  _, out, rows = job
  export(str(out), "labelstudio", str(tmp_path / "ls"))
  tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
  names = None
  for task in tasks:       # the reviewer accepts each prediction as an annotation...
    results = copy.deepcopy(task["predictions"][0]["result"])
    for result in results:
      result["origin"] = "manual"
    task["annotations"] = [{"id": 1, "result": results, "was_cancelled": False}]
  by_name = {os.path.basename(t["data"]["hrnet_beam_image_id"])[0]: t for t in tasks}
  from transforms.labels import packaged_labels  # pylint: disable=import-outside-toplevel
  names = packaged_labels("isprs").class_names
  a_results = by_name["a"]["annotations"][0]["result"]
  deleted = a_results.pop(0)                                     # ...deletes a region,
  b_result = by_name["b"]["annotations"][0]["result"][0]
  old = names.index(b_result["value"]["brushlabels"][0])
  new = (old + 1) % 7
  b_result["value"]["brushlabels"] = [names[new]]                # relabels one,
  painted = np.zeros((64, 64), np.uint8)
  painted[5:25, 30:60] = 255
  by_name["b"]["annotations"][0]["result"].append({              # paints a new one,
      "id": "new", "from_name": "label", "to_name": "image", "type": "brushlabels",
      "original_width": 64, "original_height": 64, "image_rotation": 0,
      "value": {"format": "rle", "rle": mask2rle(painted), "brushlabels": [names[5]]}})
  by_name["c"]["annotations"][0]["result"].append({              # and draws a polygon.
      "id": "poly", "from_name": "label", "to_name": "image", "type": "polygonlabels",
      "original_width": 60, "original_height": 80, "image_rotation": 0,
      "value": {"points": [[10 / 60 * 100, 30 / 80 * 100], [40 / 60 * 100, 30 / 80 * 100],
                           [40 / 60 * 100, 50 / 80 * 100], [10 / 60 * 100, 50 / 80 * 100]],
                "polygonlabels": [names[3]]}})
  by_name["d"]["annotations"].insert(0, {"id": 0, "result": [], "was_cancelled": True})
  (tmp_path / "export.json").write_text(json.dumps(tasks))
  truths = _reviewed_truth(rows, ("a", names.index(deleted["value"]["brushlabels"][0])),
                           ("b", old, new), ("b", (5, 25, 30, 60), 5))
  truths["c"][30:50, 10:40] = 3
  direct, imported = _evaluate_both_ways(out, tmp_path, "labelstudio",
                                         tmp_path / "export.json")
  for report in (direct, imported):
    _check_round_trip(report, rows, truths)


# In .venv-datumaro: our CVAT export read by datumaro, edited as a reviewer would, and
# saved by datumaro as "CVAT for images 1.1" XML with masks and a polygon.
DATUMARO_EDIT = """
import json, sys
import numpy as np
import datumaro as dm
source, target, edits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
dataset = dm.Dataset.import_from(source, "voc_segmentation")
labels = dataset.categories()[dm.AnnotationType.label]
names = [c.name for c in labels.items]
items = []
for item in dataset:
  masks = [a for a in item.annotations if a.type == dm.AnnotationType.mask
           and names[a.label] != "background"]
  height, width = masks[0].image.shape
  annotations = []
  for order, mask in enumerate(masks):
    label = names[mask.label]
    if item.id == edits["delete"][0] and label == edits["delete"][1]:
      continue
    if item.id == edits["relabel"][0] and label == edits["relabel"][1]:
      label = edits["relabel"][2]
    annotations.append(dm.Mask(image=mask.image.astype(np.uint8), label=names.index(label),
                               z_order=0))
  if item.id == edits["polygon"][0]:
    annotations.append(dm.Polygon(edits["polygon"][1], label=names.index(edits["polygon"][2]),
                                  z_order=1))
  items.append(dm.DatasetItem(id=item.id, media=dm.Image.from_numpy(
      np.zeros((height, width, 3), np.uint8)), annotations=annotations))
out = dm.Dataset.from_iterable(items, categories=names)
out.export(target, "cvat", save_media=False)
"""
DATUMARO_PYTHON = os.path.join(REPO_ROOT, ".venv-datumaro", "bin", "python")


def test_cvat_round_trip_edited_with_datumaro(job, tmp_path):
  assert os.path.exists(DATUMARO_PYTHON), "no .venv-datumaro: run the tests with make test"
  _, out, rows = job
  export(str(out), "cvat", str(tmp_path / "cvat"))
  from transforms.labels import packaged_labels  # pylint: disable=import-outside-toplevel
  names = packaged_labels("isprs").class_names
  present = lambda n: [names[c] for c in np.unique(rows[n]["mask"])   # noqa: E731
                       if c != NODATA_CLASS and names[c] != "background"]
  deleted, (old, new) = present("a")[0], (present("b")[0], "clutter")
  edits = {"delete": ["a", deleted], "relabel": ["b", old, new],
           "polygon": ["c", [10, 30, 40, 30, 40, 50, 10, 50], "low_vegetation"]}
  done = subprocess.run([DATUMARO_PYTHON, "-c", DATUMARO_EDIT, tmp_path / "cvat",
                         tmp_path / "xml", json.dumps(edits)],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  xml = tmp_path / "xml" / "default.xml"
  assert xml.exists(), os.listdir(tmp_path / "xml")
  assert "<mask " in xml.read_text() and "<polygon " in xml.read_text()
  truths = _reviewed_truth(rows, ("a", names.index(deleted)),
                           ("b", names.index(old), names.index(new)), ("c", (30, 50, 10, 40), 3))
  for truth in truths.values():          # CVAT's background is unlabelled
    truth[truth == names.index("background")] = 255
  direct, imported = _evaluate_both_ways(out, tmp_path, "cvat", xml)
  for report in (direct, imported):
    _check_round_trip(report, rows, truths)
  # The Segmentation mask 1.1 layout that `export` writes is truth as it is.
  plain = evaluate([str(out), "--truth", str(tmp_path / "cvat"), "--truth_format", "cvat",
                    "--report", str(tmp_path / "plain")])
  assert plain["pixel_accuracy"] == 1.0 and plain["problems"]["counts"] == {}


def test_evaluate_reads_rows_and_truth_from_gcs_and_writes_the_report_there(job, bucket,
                                                                           tmp_path):
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  _, out, rows = job
  export(str(out), "coco", f"{bucket}/review")
  for path in sorted(os.listdir(os.path.dirname(out))):
    with open(os.path.join(os.path.dirname(out), path), "rb") as f, \
        FileSystems.create(f"{bucket}/job/{path}") as target:
      target.write(f.read())
  done = subprocess.run(hrnet_beam("evaluate", f"{bucket}/job/rows", "--truth",
                                   f"{bucket}/review/annotations.json", "--truth_format",
                                   "coco", "--report", f"{bucket}/report"),
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "pixel accuracy 1.000" in done.stdout and "problems: none" in done.stdout
  with FileSystems.open(f"{bucket}/report/report.json") as f:
    assert json.loads(f.read())["images_evaluated"] == 7
  parquet = FileSystems.match([f"{bucket}/report/per_image-*.parquet"])[0].metadata_list
  with FileSystems.open(parquet[0].path) as f:
    assert pq.read_table(f).num_rows == 7


def test_evaluate_translates_for_dataflow_with_the_same_flags_as_run(job, bucket, tmp_path):
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  _, out, _ = job
  for path in sorted(os.listdir(os.path.dirname(out))):
    with open(os.path.join(os.path.dirname(out), path), "rb") as f, \
        FileSystems.create(f"{bucket}/job/{path}") as target:
      target.write(f.read())
  export(str(out), "coco", f"{bucket}/review")
  result = evaluate([f"{bucket}/job/rows", "--truth", f"{bucket}/review/annotations.json",
                     "--truth_format", "coco", "--report", f"{bucket}/report",
                     "--runner", "DataflowRunner", "--project", "test-project",
                     "--region", "us-central1", "--temp_location", f"{bucket}/tmp",
                     "--setup_file", os.path.join(REPO_ROOT, "setup.py"),
                     "--dry_run", "True"])
  assert result["dry_run"]
  names = {t.unique_name for t in result["job"].proto_pipeline.components.transforms.values()}
  for step in ("ReadRows", "ReadTruth", "Evaluate/JoinOnStem", "Evaluate/AddUp",
               "WritePerImage", "WriteProblems"):
    assert step in names, sorted(names)[:30]
