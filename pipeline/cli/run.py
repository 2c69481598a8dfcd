"""`hrnet-beam run`: the segmentation job from the command line (also `python -m pipeline`).

Exit status: 0 done, 1 the job failed, 2 a flag, input pattern or model is wrong (nothing
was launched), 3 more inputs failed than --max_error_fraction allows.
"""
from __future__ import annotations

import sys

from pipeline.job import EXIT_CONFIG, ConfigError, run
from pipeline.job.options import run_parser


def main(argv=None, prog: str = "hrnet-beam run") -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "-h" in argv or "--help" in argv:
    parser = run_parser(prog)
    parser.usage = f"{prog} --input PATTERN [--input ...] --output PREFIX [flags]"
    parser.print_help()
    return 0
  try:
    return run(argv).exit_status
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG
