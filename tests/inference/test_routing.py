"""The manual's routing queries (docs/labeling/confidence.md), run by DuckDB on a real output
of the demo model."""
import os
import re

import duckdb
import pyarrow.parquet as pq

from conftest import REPO_ROOT, read_rows, run_job, save_image
from pipeline.standin import scenes


def _readme_queries() -> list:
  with open(os.path.join(REPO_ROOT, "docs", "labeling", "confidence.md"), encoding="utf-8") as f:
    page = f.read()
  block = re.search(r"<!-- routing-sql -->\s*```sql\n(.*?)```", page, re.S)
  assert block, "docs/labeling/confidence.md lost its routing queries"
  return [q.strip() for q in block.group(1).split(";") if q.strip()]


def test_readme_routing_queries_pick_the_least_confident_images(tmp_path):
  for seed in range(6):
    image, _ = scenes.generate_scene(256, 320, 300 + seed)
    save_image(tmp_path / f"s{seed}.png", image)
  out = tmp_path / "out" / "segmentations"
  run_job("--input", tmp_path / "*.png", "--output", out, "--model",
          os.path.join(REPO_ROOT, "models", "demo"), "--outputs", "masks,confidence")
  rows = read_rows(out)
  names = [n.strip('"') for n in pq.read_schema(
      f"{out}-00000-of-00001.parquet").metadata[b"hrnet_beam.class_names"].decode()
           .strip("[]").split(", ")]
  assert names[2] == "building"   # the queries' comment holds for this labels file
  building = {i: r["class_mean_confidence"][2] for i, r in rows.items()
              if r["class_mean_confidence"][2] is not None}
  # The README's cut-off, moved to the median here so that the query must choose.
  cut = sorted(building.values())[len(building) // 2]
  queries = [q.replace("out/segmentations", str(out)).replace("< 0.9", f"< {cut!r}")
             for q in _readme_queries()]
  least, buildings = (duckdb.sql(q).fetchall() for q in queries)
  assert [r[0] for r in least] == sorted(rows, key=lambda i: rows[i]["mean_confidence"])
  expected = sorted((i for i in building if building[i] < cut), key=building.get)
  assert expected and len(expected) < len(rows)
  assert [r[0] for r in buildings] == expected
