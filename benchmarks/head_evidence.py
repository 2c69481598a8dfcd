"""A new class from 20 labeled scenes: the fit-head and rank-models evidence in docs/labeling.

    python -m benchmarks.head_evidence [--side 1024] [--count 20] [--out DIR] [--head logistic]

Writes 20 training and 20 test scenes with pools (a class the demo model never saw,
seeds never trained on), fits a head on the demo model's features (timed), runs the new
model and the demo model over the test scenes with the job, evaluates both with
`hrnet-beam evaluate` (the demo model with pools ignored: it has no such class), then
ranks the demo model against a random-weight stand-in with rank-models. Prints a JSON
summary.
"""
import argparse
import json
import os
import sys
import tempfile
import time

from benchmarks.commands import hrnet_beam

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "models", "demo")


def _evaluate(out: str, model_rows: str, name: str, test: str, class_map=None) -> dict:
  args = ["evaluate", model_rows, "--truth", f"{test}/*.labels.png", "--truth_suffix",
          ".labels", "--truth_labels", f"{test}/labels.json", "--report", f"{out}/{name}"]
  if class_map:
    with open(f"{out}/{name}_map.json", "w", encoding="utf-8") as f:
      json.dump(class_map, f)
    args += ["--class_map", f"{out}/{name}_map.json"]
  print(hrnet_beam(*args))
  with open(f"{out}/{name}/report.json", encoding="utf-8") as f:
    return json.load(f)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--side", type=int, default=1024)
  parser.add_argument("--count", type=int, default=20)
  parser.add_argument("--head", default="logistic")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  out = args.out or tempfile.mkdtemp(prefix="hrnet-beam-heads-")
  train, test = f"{out}/train", f"{out}/test"
  for directory, seed in ((train, 300), (test, 400)):
    hrnet_beam("scenes", "--pools", "--output", directory, "--count", args.count,
                "--height", args.side, "--width", args.side, "--seed", seed)
  started = time.monotonic()
  print(hrnet_beam("fit-head", "--model", DEMO, "--images", f"{train}/scene_???.png",
                    "--truth", f"{train}/*.labels.png", "--truth_suffix", ".labels",
                    "--truth_labels", f"{train}/labels.json", "--head", args.head,
                    "--to", f"{out}/pool_model"))
  fit_seconds = time.monotonic() - started
  reports = {}
  for name, model in (("new", f"{out}/pool_model"), ("demo", DEMO)):
    hrnet_beam("run", "--input", f"{test}/scene_???.png", "--model", model, "--output",
                f"{out}/rows_{name}/segmentations", "--tile_size", 512, "--tile_overlap", 64,
                "--polygons_output", f"{out}/rows_{name}/polygons", "--progress", "off")
    reports[name] = _evaluate(out, f"{out}/rows_{name}/segmentations", f"eval_{name}", test,
                              None if name == "new" else {"pool": None})
  hrnet_beam("export", "--format", "coco", f"{out}/rows_new/segmentations", "--to",
              f"{out}/coco_new")
  hrnet_beam("export-model", "--output", f"{out}/random", "--width", 8, "--depth",
              "reduced", "--num_classes", 7)
  print(hrnet_beam("rank-models", "--models", f"{DEMO},{out}/random", "--images",
                    f"{train}/scene_???.png", "--truth", f"{train}/*.labels.png",
                    "--truth_suffix", ".labels", "--truth_labels", f"{train}/labels.json",
                    "--report", f"{out}/rank"))
  with open(f"{out}/pool_model/fit_report.json", encoding="utf-8") as f:
    fit_report = json.load(f)
  with open(f"{out}/rank/ranking.json", encoding="utf-8") as f:
    ranking = json.load(f)
  shared = [n for n in reports["demo"]["classes"] if n != "unused"
            and reports["demo"]["per_class"][n]["iou"] is not None]
  summary = {
      "fit_seconds": round(fit_seconds, 1), "fit_timings": fit_report["timings"],
      "test_scenes": args.count, "side": args.side, "head": args.head,
      "pool_iou": reports["new"]["per_class"]["pool"]["iou"],
      "per_class": {n: {"new": reports["new"]["per_class"][n]["iou"],
                        "demo": reports["demo"]["per_class"].get(n, {}).get("iou")}
                    for n in reports["new"]["classes"]},
      "shared_classes": shared,
      "new_miou_shared": sum(reports["new"]["per_class"][n]["iou"] for n in shared) / len(shared),
      "demo_miou_shared": sum(reports["demo"]["per_class"][n]["iou"] for n in shared) / len(shared),
      "learning_curve": fit_report["learning_curve"],
      "ranking": [(s["model"], round(s["logme"], 4), round(s["held_out_head_miou"], 4))
                  for s in ranking["ranked_by_logme"]],
      "orders_agree": ranking["orders_agree"]}
  print(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
