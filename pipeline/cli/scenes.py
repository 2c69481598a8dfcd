"""Synthetic aerial scenes with their ground truth, or the demo's sample set.

    hrnet-beam scenes --output scenes/ --count 20 --height 1100 --width 1500
    hrnet-beam scenes --demo --output demo-output/images

Scenes: scene_NNN.png and scene_NNN.labels.png (pixel value = label id of
pipeline/standin/scene_labels.json). --demo writes the four scenes `make demo` segments
and one truncated PNG, which shows what the errors output looks like.
"""
from __future__ import annotations

import argparse

from pipeline.standin.samples import write_samples
from pipeline.standin.scenes import KINDS, write_scenes


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="Directory to write the PNGs to.")
  parser.add_argument("--demo", action="store_true",
                      help="Write the demo's sample set instead (the flags below are unused).")
  parser.add_argument("--count", type=int, default=10)
  parser.add_argument("--height", type=int, default=512)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kind", choices=("mixed",) + KINDS, default="mixed")
  parser.add_argument("--pools", action="store_true",
                      help="Add swimming pools, a class the demo model never saw (label 6, "
                           "'pool'; labels.json beside the scenes names it).")
  args = parser.parse_args(argv)
  if args.demo:
    paths = write_samples(args.output, args.seed)
  else:
    paths = write_scenes(args.output, args.count, args.height, args.width, args.seed,
                         args.kind, args.pools)
  for path in paths:
    print(path)
  return 0
