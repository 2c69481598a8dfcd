"""Does confidence mean something? Measured with the demo model on held-out scenes.

    python -m benchmarks.confidence_evidence [--count 40] [--report r.json]

Writes COUNT held-out synthetic scenes with their ground truth (seeds never trained on),
runs the job over them once per test-time augmentation setting, and reports:
- the pixel accuracy of the most confident half of all pixels against the least
  confident half (split at the median confidence);
- how many of the worst fifth of images by mean_confidence are also among the worst
  fifth by true mIoU (chance: a fifth of them);
- per --tta setting: mIoU over all scenes and seconds, beside no augmentation.
"""
import argparse
import glob
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

SETTINGS = ("none", "flip", "flip,scales=0.75,1.0,1.25")
SIDE = 640        # 4 tiles of 512 px with 64 px overlap per scene
SEED_START = 100  # held out: below the training seeds (pipeline.standin.train)


def _rows(prefix: str) -> dict:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = {}
  for path in glob.glob(f"{prefix}-*-of-*.parquet"):
    for row in pq.read_table(path).to_pylist():
      rows[row["image_id"]] = row
  return rows


def _png(data: bytes) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.asarray(Image.open(io.BytesIO(data)))


def _miou(pairs) -> float:
  from pipeline.standin.train import NUM_LABELS, confusion, iou_per_class  # pylint: disable=import-outside-toplevel
  matrix = sum(confusion(np.minimum(p, NUM_LABELS - 1).astype(np.int64), t)
               for p, t in pairs)
  return float(np.nanmean(iou_per_class(matrix)))


def measure(count: int, workdir: str, model: str, settings=SETTINGS) -> dict:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from pipeline.job import run  # pylint: disable=import-outside-toplevel
  from pipeline.standin import scenes  # pylint: disable=import-outside-toplevel
  truth = {}
  os.makedirs(os.path.join(workdir, "scenes"), exist_ok=True)
  for i in range(count):
    image, labels = scenes.generate_scene(SIDE, SIDE, SEED_START + i)
    path = os.path.join(workdir, "scenes", f"scene_{i:03d}.png")
    Image.fromarray(image).save(path)
    truth[path] = labels
  report = {"scenes": count, "side": SIDE, "model": model, "settings": {}}
  for setting in settings:
    prefix = os.path.join(workdir, setting.replace(",", "_").replace("=", ""), "rows")
    started = time.monotonic()
    run(["--input", os.path.join(workdir, "scenes", "*.png"), "--output", prefix, "--model",
         model, "--outputs", "masks,confidence", "--tta", setting, "--progress", "off"])
    seconds = time.monotonic() - started
    rows = _rows(prefix)
    masks = {path: _png(row["mask_png"]) for path, row in rows.items()}
    report["settings"][setting] = {
        "seconds": round(seconds, 1),
        "miou": round(_miou((masks[p], truth[p]) for p in truth), 4)}
    if setting != "none":
      continue
    confidence = np.concatenate([_png(rows[p]["confidence_png"]).ravel() for p in truth])
    correct = np.concatenate([(np.minimum(masks[p], 5) == truth[p]).ravel() for p in truth])
    order = np.argsort(confidence, kind="stable")
    low, high = order[:len(order) // 2], order[len(order) // 2:]
    report["pixel_accuracy_most_confident_half"] = round(float(correct[high].mean()), 6)
    report["pixel_accuracy_least_confident_half"] = round(float(correct[low].mean()), 4)
    tail = order[:len(order) // 20]
    report["pixel_accuracy_least_confident_5_percent"] = round(float(correct[tail].mean()), 4)
    report["errors_in_least_confident_5_percent"] = round(
        float((~correct[tail]).sum() / max((~correct).sum(), 1)), 4)
    per_image = {p: _miou([(masks[p], truth[p])]) for p in truth}
    worst = max(1, count // 5)
    by_confidence = sorted(truth, key=lambda p: rows[p]["mean_confidence"])[:worst]
    by_iou = sorted(truth, key=lambda p: per_image[p])[:worst]
    report["worst_fifth"] = worst
    report["worst_by_confidence_also_worst_by_iou"] = len(set(by_confidence) & set(by_iou))
    report["confidence_iou_correlation"] = round(float(np.corrcoef(
        [rows[p]["mean_confidence"] for p in truth], [per_image[p] for p in truth])[0, 1]), 3)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", type=int, default=40)
  parser.add_argument("--model", default=os.path.join("models", "demo"))
  parser.add_argument("--report", default=None)
  parser.add_argument("--settings", default=";".join(SETTINGS),
                      help="--tta settings to compare, ';'-separated; 'none' must be first")
  args = parser.parse_args(argv)
  from pipeline.cli import console  # pylint: disable=import-outside-toplevel
  console.setup("warning")
  report = measure(args.count, tempfile.mkdtemp(prefix="hrnet-beam-confidence-"), args.model,
                   tuple(args.settings.split(";")))
  print(json.dumps(report, indent=2))
  if args.report:
    with open(args.report, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
