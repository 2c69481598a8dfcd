"""Serves a local web page over a job's output: images with their masks and class
fractions, filters, and nearest neighbours from an index.

    hrnet-beam serve OUTPUT_PREFIX [--index DIR] [--port 8765] [--host 127.0.0.1]

It reads only the job's own rows, source images and index: URLs name rows by number,
never paths. It listens on 127.0.0.1 unless --host says otherwise.
"""
import argparse
import sys

from transforms.exports.rows import ExportError, row_files
from transforms.index.search import Searcher
from transforms.serving import JobOutput, make_server


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("output", help="The job's --output prefix or output directory.")
  parser.add_argument("--index", default=None,
                      help="An index built by hrnet-beam index (image or patch level).")
  parser.add_argument("--host", default="127.0.0.1",
                      help="Address to listen on (default 127.0.0.1: this machine only).")
  parser.add_argument("--port", type=int, default=8765, help="Port (0: any free one).")
  args = parser.parse_args(argv)
  name = prog or "hrnet-beam serve"
  try:
    searcher = Searcher(args.index) if args.index else None
    output = JobOutput(row_files(args.output), searcher)
  except (ExportError, FileNotFoundError) as e:
    print(f"{name}: {e}", file=sys.stderr)
    return 2
  server = make_server(output, args.host, args.port)
  host, port = server.server_address[:2]
  print(f"{name}: http://{host}:{port}/  ({len(output.rows)} images"
        + (f", index of {searcher.index.ntotal} {searcher.level} vectors" if searcher else "")
        + "; Ctrl-C stops)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0
