"""The demo model evaluated on held-out scenes, as a user runs it: the evidence in
docs/labeling/evaluate.md.

    python -m benchmarks.evaluation_evidence [--count 16] [--side 1024] [--out DIR]
        [--plots docs/]

Writes COUNT held-out synthetic scenes with their truth (seeds never trained on), runs
the job with confidence maps, then `hrnet-beam evaluate` on the truth masks, and joins
the per-image metrics to the rows' QA columns in DuckDB. Prints the report's table and
the join; --plots copies the report's PNGs there (as evaluation-*.png).
"""
import argparse
import os
import shutil
import sys
import tempfile

from benchmarks.commands import hrnet_beam

SEED_START = 100  # held out: below the training seeds (pipeline.standin.train)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", type=int, default=16)
  parser.add_argument("--side", type=int, default=1024)
  parser.add_argument("--out", default=None)
  parser.add_argument("--plots", default=None)
  args = parser.parse_args(argv)
  out = args.out or tempfile.mkdtemp(prefix="hrnet-beam-evaluation-")
  scenes, rows, report = (os.path.join(out, n) for n in ("scenes", "rows", "report"))
  hrnet_beam("scenes", "--output", scenes, "--count", args.count, "--height", args.side,
              "--width", args.side, "--seed", SEED_START)
  hrnet_beam("run", "--input", f"{scenes}/scene_???.png", "--model",
              os.path.join(REPO, "models", "demo"), "--output", f"{rows}/segmentations",
              "--tile_size", 512, "--tile_overlap", 64, "--outputs", "masks,confidence",
              "--progress", "off")
  print(hrnet_beam("evaluate", f"{rows}/segmentations", "--truth",
                    f"{scenes}/*.labels.png", "--truth_suffix", ".labels", "--truth_labels",
                    os.path.join(REPO, "pipeline", "standin", "scene_labels.json"),
                    "--report", report))
  import duckdb  # pylint: disable=import-outside-toplevel
  query = (f"SELECT regexp_extract(p.image_id, '[^/]+$') AS image, round(p.miou, 3) AS miou, "
           f"round(p.class_iou.car, 3) AS car_iou, round(r.mean_confidence, 4) AS "
           f"mean_confidence, round(r.low_confidence_fraction, 4) AS low_conf "
           f"FROM '{report}/per_image-*.parquet' p "
           f"JOIN '{rows}/segmentations-*.parquet' r USING (image_id) "
           f"ORDER BY p.miou LIMIT 5")
  print(query.replace(out, "OUT"))
  print(duckdb.sql(query))
  if args.plots:
    for name in ("confusion", "class_iou", "reliability", "review"):
      shutil.copy(os.path.join(report, f"{name}.png"),
                  os.path.join(args.plots, f"evaluation-{name}.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
