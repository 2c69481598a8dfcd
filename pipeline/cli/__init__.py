"""The `hrnet-beam` command: one subcommand per thing a user does, each a thin module.

    hrnet-beam --help            lists the subcommands
    hrnet-beam SUBCOMMAND --help  shows its flags

Subcommand modules are imported only when used, so listing them starts no TensorFlow.
"""
from __future__ import annotations

import importlib
import sys

from pipeline.cli import console

# name -> (module with main(argv, prog), one line for `hrnet-beam --help`)
COMMANDS = {
    "run": ("pipeline.cli.run",
            "segment images (local or gs://) and write masks and features to Parquet"),
    "show": ("pipeline.cli.show", "print what a job wrote: rows, main classes, errors"),
    "render": ("pipeline.cli.render",
               "write overlay PNGs: each source image with its mask blended over it"),
    "export": ("pipeline.cli.export",
               "export masks to a labeling tool: COCO, Label Studio or CVAT"),
    "evaluate": ("pipeline.cli.evaluate",
                 "score masks against reviewed labels: IoU, confusion, calibration, review"),
    "import": ("pipeline.cli.import_labels",
               "bring reviewed labels back from COCO, Label Studio or CVAT as truth masks"),
    "fit-head": ("pipeline.cli.fit_head",
                 "train a head for your classes on a model's frozen features, from labels"),
    "rank-models": ("pipeline.cli.rank_models",
                    "rank models for your imagery: LogME and a fitted head's held-out mIoU"),
    "index": ("pipeline.cli.index",
              "build a vector index (FAISS) over images or patches, with a recall report"),
    "search": ("pipeline.cli.search",
               "nearest images or patches to an image or an indexed id, with filters"),
    "serve": ("pipeline.cli.serve",
              "a local web page: browse images, masks and fractions, click for neighbours"),
    "optimize": ("pipeline.cli.optimize",
                 "convert a model to OpenVINO (float32, bfloat16, int8) and measure it"),
    "stage-model": ("pipeline.cli.stage_model",
                    "check a model and copy it to gs:// once, so workers never download it"),
    "compare-precision": ("pipeline.cli.compare_precision",
                          "measure speed and agreement of a lower --precision before using it"),
    "export-model": ("pipeline.cli.export_model",
                     "export a stand-in HRNetV2 SavedModel (random weights) to try the job"),
    "scenes": ("pipeline.cli.scenes",
               "write synthetic aerial scenes with ground truth, or the demo's sample set"),
    "train-demo": ("pipeline.cli.train_demo",
                   "train the demo model on synthetic scenes (about ten minutes on 2 cores)"),
}


def usage() -> str:
  width = max(len(name) for name in COMMANDS)
  lines = ["usage: hrnet-beam SUBCOMMAND [flags]   (hrnet-beam SUBCOMMAND --help for its flags)",
           "", "Run HRNetV2 segmentation models over images with Apache Beam.", "",
           "subcommands:"]
  lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"hrnet-beam: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  console.setup(console.level_from_argv(rest))
  module = importlib.import_module(COMMANDS[name][0])
  return module.main(rest, prog=f"hrnet-beam {name}")
