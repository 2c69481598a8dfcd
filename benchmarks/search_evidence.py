"""Evidence for the index's default normalisation: with the trained demo model, does a
patch find the same patch of the same scene under other light and noise?

    python -m benchmarks.search_evidence [--scenes 8] [--size 384] [--patch 128]

Writes each synthetic scene and its twin (gamma 0.8, x1.05, Gaussian noise 0.02), runs
the job with --patch_output, builds a patch index per normalisation and, for every
patch of an original scene, finds the rank of its twin among all other patches
(0 = nearest). Prints the median rank, the share found first and in the top 5.
"""
import argparse
import json
import os
import tempfile

import numpy as np
from PIL import Image

from pipeline.cli import index as index_cli
from pipeline.job import run
from pipeline.standin import scenes
from transforms.index.search import Searcher
from transforms.index.vectors import NORMALIZATIONS

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "models", "demo")
TWIN = "_light"


def write_twins(directory: str, count: int, size: int, seed: int = 300) -> list:
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    image, _ = scenes.generate_scene(size, size, seed + i, scenes.KINDS[i % len(scenes.KINDS)])
    for suffix, pixels in (("", image), (TWIN, scenes.relight(image, rng))):
      path = os.path.join(directory, f"scene{i:02d}{suffix}.png")
      Image.fromarray(pixels).save(path)
      paths.append(path)
  return paths


def twin_ranks(index_dir: str) -> np.ndarray:
  """For each patch of an original scene: how many other patches rank above its twin."""
  searcher = Searcher(index_dir)
  ranks = []
  for record in searcher.ids.to_pylist():
    if TWIN in record["image_id"]:
      continue
    twin = (record["image_id"].replace(".png", f"{TWIN}.png"),
            (record["patch_row"], record["patch_col"]))
    hits = searcher.search(searcher.stored_vector(record["id"]), k=searcher.index.ntotal - 1,
                           exclude=record["id"])
    ranks.append(next(h.rank - 1 for h in hits if (h.image_id, h.patch) == twin))
  return np.array(ranks)


def measure(workdir: str, count: int, size: int, patch: int, model: str = DEMO_MODEL) -> dict:
  images = os.path.join(workdir, "images")
  os.makedirs(images, exist_ok=True)
  write_twins(images, count, size)
  out = os.path.join(workdir, "out") + "/"
  summary = run(["--input", os.path.join(images, "*.png"), "--output", out, "--model", model,
                 "--patch_output", out, "--patch_size", str(patch), "--progress", "off"])
  if summary.errors:
    raise RuntimeError(f"{summary.errors} images failed")
  results = {}
  for normalization in NORMALIZATIONS:
    index_dir = os.path.join(workdir, f"index-{normalization}")
    index_cli.index(out, index_dir, level="patch", normalization=normalization)
    ranks = twin_ranks(index_dir)
    results[normalization] = {"patches": int(len(ranks) * 2),
                              "median_rank": float(np.median(ranks)),
                              "first": float(np.mean(ranks == 0)),
                              "top5": float(np.mean(ranks < 5))}
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scenes", type=int, default=8)
  parser.add_argument("--size", type=int, default=384)
  parser.add_argument("--patch", type=int, default=128)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as workdir:
    results = measure(workdir, args.scenes, args.size, args.patch)
  print(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
