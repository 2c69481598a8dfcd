"""Builds a FAISS index over a job's vectors: images (pooled_features) or patches.

    hrnet-beam index OUTPUT_PREFIX --to DIR [--level image|patch] [--max_memory 4GB]
    hrnet-beam index OUTPUT_PREFIX --to DIR --append     # add files not yet indexed

The index type follows the number of vectors and the memory budget; the report
(printed, and kept in DIR/index.json) gives recall@10 against exact search on a
sample, query latency, size and how the vectors were normalised.
"""
import argparse
import json
import sys

from transforms.index.build import IndexFiles, append_index, build_index, parse_bytes
from transforms.index.vectors import (WHITENED, LEVEL_IMAGE, LEVELS, NORMALIZATIONS,
                                      IndexInputError, describe_files, output_files)


def index(output: str, to: str, level: str = LEVEL_IMAGE, max_memory: str = "4GB",
          normalization: str = WHITENED, append: bool = False):
  """Builds (or appends to) the index at `to`; returns its Report, or None when --append
  found no new file."""
  budget = parse_bytes(max_memory)
  paths = output_files(output, level)
  target = IndexFiles(to)
  if append:
    if not target.exists():
      raise IndexInputError(f"--append: {to} holds no index yet; build it first without "
                            "--append")
    manifest = target.read_manifest()
    if manifest["level"] != level:
      raise IndexInputError(f"--append: {to} indexes {manifest['level']}s; add "
                            f"--level {manifest['level']}")
    new = [p for p in paths if p not in set(manifest["files"])]
    if not new:
      return None
    files = describe_files(new, level)
    if (files.model, files.dim) != (manifest["model"], manifest["dim"]):
      raise IndexInputError(f"--append: the new files hold vectors of {files.model} "
                            f"({files.dim}), the index those of {manifest['model']} "
                            f"({manifest['dim']})")
    built = append_index(target, files, new)
  else:
    files = describe_files(paths, level)
    built = build_index(files, budget, normalization, source_prefix=output)
  index_object, manifest, ids, transform, report = built
  target.write(index_object, manifest, ids, transform)
  return report


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("output", help="The job's --output prefix (image level) or "
                                     "--patch_output prefix (patch level); a directory "
                                     "holding them works too. Local or gs://.")
  parser.add_argument("--to", required=True, help="Index directory (local or gs://).")
  parser.add_argument("--level", choices=LEVELS, default=LEVEL_IMAGE,
                      help="image: one vector per row (pooled_features); patch: one per "
                           "patch (the job's --patch_output).")
  parser.add_argument("--max_memory", default="4GB",
                      help="Memory the index may take (e.g. 4GB, 512MB); it picks the "
                           "index type.")
  parser.add_argument("--normalization", choices=NORMALIZATIONS, default=WHITENED,
                      help="whitened (default): PCA whitening fitted on a sample of the "
                           "vectors (at most 128 dimensions), then L2-normalise; centered: "
                           "subtract the sample's mean, then L2-normalise; plain: "
                           "L2-normalise only. Scores are cosine similarities.")
  parser.add_argument("--append", action="store_true",
                      help="Add the rows of files not yet indexed, without retraining.")
  parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
  args = parser.parse_args(argv)
  name = prog or "hrnet-beam index"
  try:
    report = index(args.output, args.to, args.level, args.max_memory, args.normalization,
                   args.append)
  except (IndexInputError, ValueError) as e:
    print(f"{name}: {e}", file=sys.stderr)
    return 2
  if report is None:
    print(f"{name}: no new file to add to {args.to}")
    return 0
  if args.json:
    import dataclasses  # pylint: disable=import-outside-toplevel
    print(json.dumps(dataclasses.asdict(report), indent=1))
  else:
    print(f"index written to {args.to}\n{report.table()}")
  return 0
