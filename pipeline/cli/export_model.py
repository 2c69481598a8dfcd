"""Exports a stand-in HRNetV2 SavedModel with the TF Hub models' interface.

    hrnet-beam export-model --width 48 --num_classes 7 --output models/w48

Weights are random (batch-norm statistics recalibrated so outputs vary): masks from a
stand-in are meaningless; it exists to run and test the pipeline without the download.
"""
import argparse

from pipeline.standin import hrnet

def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="Directory to write the SavedModel to.")
  parser.add_argument("--width", type=int, default=48, help="HRNet width W (48 for W48).")
  parser.add_argument("--num_classes", type=int, default=7)
  parser.add_argument("--depth", choices=("full", "reduced"), default="full",
                      help="full: the paper's blocks and modules; reduced: one block and "
                           "one module per stage (fast to build and load, for tests).")
  parser.add_argument("--architecture", choices=("hrnet", "pixel_local"), default="hrnet",
                      help="pixel_local: outputs depend on single pixels (a tiling oracle).")
  parser.add_argument("--no_fused", action="store_true",
                      help="Export only predict and get_features, like the TF Hub models.")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  labels = hrnet.stand_in_labels(args.num_classes)
  if args.architecture == "pixel_local":
    hrnet.export_pixel_local(args.num_classes, 15 * args.width, args.output, seed=args.seed,
                             labels=labels)
    print(f"Exported pixel-local model to {args.output}")
    return 0
  spec = (hrnet.HRNetSpec(width=args.width, num_classes=args.num_classes)
          if args.depth == "full" else hrnet.HRNetSpec.reduced(args.width, args.num_classes))
  params = hrnet.export_hrnet(spec, args.output, seed=args.seed, fused=not args.no_fused,
                              labels=labels)
  print(f"Exported HRNetV2-W{args.width} ({args.depth}, {params:,} parameters, "
        f"{spec.feature_dim} feature channels) to {args.output}")
  return 0

