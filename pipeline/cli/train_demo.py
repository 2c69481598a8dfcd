"""Trains the demo model (a small HRNetV2 on synthetic scenes, on the CPU) and exports it.

    hrnet-beam train-demo --output models/demo --seconds 600
"""
from __future__ import annotations

import argparse
import json

from pipeline.standin.train import train


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="models/demo")
  parser.add_argument("--seconds", type=float, default=600,
                      help="Training time; the held-out mIoU is measured after it.")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  report = train(args.output, args.seconds, args.seed)
  print(json.dumps(report, indent=2))
  print(f"Exported the demo model to {args.output}")
  return 0
