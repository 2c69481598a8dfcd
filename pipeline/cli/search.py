"""Finds the nearest images or patches in an index built by `hrnet-beam index`.

    hrnet-beam search INDEX --image PATH [--k 10] [--where "building >= 0.3"]
    hrnet-beam search INDEX --id IMAGE_ID [--patch ROW,COL] [--k 10] [--where ...]

A query image is embedded by the job itself (same model, tiles and pooling as the
indexed rows): its pooled features, compared with images or with patches. A query by
id uses the vector the job stored for it, and leaves that row out of the results.
Filters on class fractions are applied inside the search: --k 10 returns 10 results
when at least 10 rows match.
"""
import argparse
import contextlib
import glob
import json
import os
import sys
import tempfile

import numpy as np

from transforms.index.filters import FilterError
from transforms.index.search import Searcher


def job_flags(manifest: dict) -> list:
  """The job's flags that shape a vector, from the indexed files' metadata."""
  meta = manifest.get("job_metadata", {})
  flags = ["--model", manifest["model"]]
  for flag, key in (("--tile_size", "tile_size"), ("--tile_overlap", "tile_overlap"),
                    ("--tile_grid", "tile_grid"), ("--channel_mapping", "channel_mapping"),
                    ("--precision", "precision_requested")):
    value = meta.get(f"hrnet_beam.{key}")
    if value:
      flags += [flag, value]
  return flags


def embed_image(path: str, manifest: dict) -> np.ndarray:
  """The query image's pooled features, computed by running the job on it."""
  from pipeline.job import run  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  # The job's own lines go to stderr: stdout holds the results (--json).
  with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
    summary = run(["--input", path, "--output", os.path.join(scratch, "query"),
                   "--outputs", "features", "--progress", "off", *job_flags(manifest)])
    if summary.rows != 1:
      errors = [line for f in glob.glob(os.path.join(scratch, "errors-*.jsonl"))
                for line in open(f, encoding="utf-8")]
      raise ValueError(f"{path} could not be embedded: "
                       f"{json.loads(errors[0])['reason'] if errors else summary.failure}")
    table = pq.read_table(glob.glob(os.path.join(scratch, "query-*.parquet")))
    vector = np.asarray(table.column("pooled_features")[0].as_py(), np.float32)
  if not np.isfinite(vector).all():
    raise ValueError(f"{path} has no valid pixel: nothing to compare")
  return vector


def _format(hit) -> str:
  where = hit.image_id + (f"  patch {hit.patch[0]},{hit.patch[1]} (y {hit.box[0]}-"
                          f"{hit.box[2]}, x {hit.box[1]}-{hit.box[3]})" if hit.patch else "")
  fractions = ""
  if hit.class_fractions:
    top = sorted(hit.class_fractions.items(), key=lambda kv: -(kv[1] or 0))[:3]
    fractions = "  " + ", ".join(f"{name} {value:.2f}" for name, value in top if value)
  return f"{hit.rank:>3}  {hit.score:7.4f}  {where}{fractions}"


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("index", help="Index directory written by hrnet-beam index.")
  query = parser.add_mutually_exclusive_group(required=True)
  query.add_argument("--image", help="A query image (local or gs://), embedded by the job.")
  query.add_argument("--id", help="An indexed image_id.")
  parser.add_argument("--patch", default=None,
                      help="With --id on a patch index: the patch ROW,COL.")
  parser.add_argument("--k", type=int, default=10, help="How many results (default 10).")
  parser.add_argument("--where", default="",
                      help="Filter on class fractions, e.g. \"building >= 0.3 and tree < "
                           "0.1\"; names as in the labels (case, spaces and _ alike).")
  parser.add_argument("--json", action="store_true", help="Print results as JSON lines.")
  args = parser.parse_args(argv)
  name = prog or "hrnet-beam search"
  if args.k < 1:
    parser.error(f"--k {args.k}: ask for at least 1 result")
  try:
    searcher = Searcher(args.index)
    exclude = None
    if args.image:
      vector = embed_image(args.image, searcher.manifest)
    else:
      patch = None
      if searcher.level == "patch":
        if not args.patch:
          raise ValueError("this index holds patches: add --patch ROW,COL to --id")
        patch = tuple(int(v) for v in args.patch.split(","))
      exclude = searcher.row_of(args.id, patch)
      vector = searcher.stored_vector(exclude)
    hits = searcher.search(vector, args.k, args.where, exclude=exclude)
  except (FilterError, KeyError, ValueError, FileNotFoundError) as e:
    print(f"{name}: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 2
  if not hits and args.where:
    print(f"{name}: no indexed row matches --where {args.where!r}", file=sys.stderr)
  if args.json:
    for hit in hits:
      print(json.dumps(hit.as_json()))
  else:
    kind = "patches" if searcher.level == "patch" else "images"
    print(f"{len(hits)} nearest {kind} (score: cosine similarity of "
          f"{searcher.manifest['normalization']} vectors)")
    for hit in hits:
      print(_format(hit))
  return 0
