"""Overlay pictures of what a job produced: each image with its mask blended over it.

    hrnet-beam render OUTPUT_PREFIX [--out DIR] [--alpha 0.45]

Reads the Parquet rows written under OUTPUT_PREFIX (local or gs://), re-reads each
source image, and writes DIR/<name>.overlay.png with the palette-coloured mask blended
over the image and a legend of the classes present. Colours and names come from the
files' metadata. Rows from shards (image ids with '#') have no file to re-read and are
skipped.
"""
import argparse
import io
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw

from transforms.exports.rows import row_files
from transforms.pngs import decode_png
from transforms.reading.decode import decode_image


def _open(path: str):
  return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def overlay(image: np.ndarray, mask: np.ndarray, palette: list, names: list,
            alpha: float = 0.45) -> Image.Image:
  """The image with the mask's class colours blended in, and a legend on the right."""
  if image.dtype == np.uint16:
    image = (image // 257).astype(np.uint8)
  colours = np.asarray(palette, np.float32)
  blended = image.astype(np.float32) * (1 - alpha) + colours[mask] * alpha
  picture = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
  present = [i for i in np.unique(mask) if i < len(names)]
  counts = np.bincount(mask.ravel(), minlength=len(names))
  legend_width, row = 230, 22
  canvas = Image.new("RGB", (picture.width + legend_width,
                             max(picture.height, row * (len(present) + 1) + 10)), "white")
  canvas.paste(picture, (0, 0))
  draw = ImageDraw.Draw(canvas)
  x = picture.width + 10
  draw.text((x, 6), "class (share of pixels)", fill="black")
  for k, i in enumerate(sorted(present, key=lambda c: -counts[c])):
    y = 6 + row * (k + 1)
    draw.rectangle([x, y, x + 16, y + 16], fill=tuple(int(v) for v in palette[i]),
                   outline="black")
    draw.text((x + 24, y + 2), f"{names[i]} ({counts[i] / mask.size:.0%})", fill="black")
  return canvas


def confidence_overlay(image: np.ndarray, confidence: np.ndarray) -> Image.Image:
  """The image with its unsure pixels in red: the lower the confidence, the redder."""
  if image.dtype == np.uint16:
    image = (image // 257).astype(np.uint8)
  doubt = (1.0 - confidence.astype(np.float32) / 255.0)[..., None]
  red = np.array([255, 0, 0], np.float32)
  grey = image.astype(np.float32).mean(-1, keepdims=True).repeat(3, -1) * 0.6
  return Image.fromarray(np.clip(grey * (1 - doubt) + red * doubt, 0, 255).astype(np.uint8))


def render(prefix: str, out_dir: str, alpha: float = 0.45, confidence: bool = False) -> list:
  files = row_files(prefix)
  if not files:
    raise FileNotFoundError(f"no Parquet files at {prefix}-*-of-*.parquet")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for file in sorted(files):
    with _open(file) as f:
      table = pq.read_table(io.BytesIO(f.read()))
    metadata = table.schema.metadata
    palette = json.loads(metadata[b"hrnet_beam.palette"])
    names = json.loads(metadata[b"hrnet_beam.class_names"])
    for row in table.to_pylist():
      if row["mask_png"] is None or "#" in row["image_id"]:
        continue
      with _open(row["source"]) as f:
        image = decode_image(f.read(), 10**9)
      mask = decode_png(row["mask_png"])
      name = os.path.splitext(os.path.basename(row["source"]))[0]
      path = os.path.join(out_dir, f"{name}.overlay.png")
      overlay(image, mask, palette, names, alpha).save(path)
      written.append(path)
      if confidence:
        if row.get("confidence_png") is None:
          raise ValueError(f"{file} has no confidence_png: run the job with --outputs "
                           "masks,confidence")
        path = os.path.join(out_dir, f"{name}.confidence.png")
        confidence_overlay(image, decode_png(row["confidence_png"])).save(path)
        written.append(path)
  return written


def main(argv=None, prog: str | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument("output", help="The job's --output prefix (local or gs://).")
  parser.add_argument("--out", default=None, help="Directory for the overlays; default "
                                                  "<dirname of OUTPUT>/overlays.")
  parser.add_argument("--alpha", type=float, default=0.45)
  parser.add_argument("--confidence", action="store_true",
                      help="Also write <name>.confidence.png: the image in grey with unsure "
                           "pixels in red (needs a job run with --outputs masks,confidence).")
  args = parser.parse_args(argv)
  out_dir = args.out or os.path.join(os.path.dirname(args.output) or ".", "overlays")
  try:
    paths = render(args.output, out_dir, args.alpha, args.confidence)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {len(paths)} overlays to {out_dir}:")
  for path in paths:
    print(f"  {path}")
  return 0

