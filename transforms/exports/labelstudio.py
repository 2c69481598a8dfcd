"""Label Studio: import-ready tasks whose predictions carry one brush (RLE) per class,
with a labeling config naming the classes in their palette colours.

The brush RLE is Label Studio's own (thi.ng rle-pack over the RGBA bytes of the mask,
as its converter's decode_rle reads it): a 32-bit value count, the word size and four
run-length field sizes, then chunks of (repeat flag, size index, count - 1, word).
"""
from __future__ import annotations

import json
from xml.sax.saxutils import quoteattr

import numpy as np

from transforms.exports.rows import ExportRow, OutputInfo, create
from transforms.types import NODATA_CLASS

WORD_BITS = 8
RUN_FIELD_BITS = (3, 4, 8, 16)        # bits of the count-1 field, chosen per chunk
FROM_NAME, TO_NAME = "label", "image"  # the labeling config's control and object tags


def brush_rle(binary: np.ndarray) -> list[int]:
  """(H, W) bool -> Label Studio brush RLE bytes: runs of the RGBA bytes (0 or 255 in
  every channel), each run one repeat chunk."""
  pixels = binary.ravel()
  starts = np.concatenate([[0], np.flatnonzero(pixels[1:] != pixels[:-1]) + 1])
  lengths = np.diff(np.concatenate([starts, [pixels.size]])) * 4   # 4 bytes a pixel
  values = pixels[starts].astype(np.int64) * 255
  total = pixels.size * 4
  longest = 1 << RUN_FIELD_BITS[-1]
  pieces = -(-lengths // longest)                  # runs longer than a chunk are split
  values = np.repeat(values, pieces)
  counts = np.full(values.size, longest, np.int64)
  last = np.cumsum(pieces) - 1
  counts[last] = lengths - (pieces - 1) * longest
  size_index = np.searchsorted(np.array([1 << b for b in RUN_FIELD_BITS]), counts)
  run_bits = np.array(RUN_FIELD_BITS)[size_index]
  # Fields in order: header, then per chunk (repeat flag 1, size index, count - 1, word).
  field_values = np.concatenate([
      [total, WORD_BITS - 1, *[b - 1 for b in RUN_FIELD_BITS]],
      np.stack([np.ones_like(counts), size_index, counts - 1, values], 1).ravel()])
  field_bits = np.concatenate([
      [32, 5, 4, 4, 4, 4],
      np.stack([np.ones_like(counts), np.full_like(counts, 2), run_bits,
                np.full_like(counts, WORD_BITS)], 1).ravel()])
  owner = np.repeat(np.arange(field_bits.size), field_bits)
  position = np.arange(owner.size) - np.repeat(np.cumsum(field_bits) - field_bits, field_bits)
  bits = (field_values[owner].astype(np.int64) >> (field_bits[owner] - 1 - position)) & 1
  return np.packbits(bits.astype(np.uint8)).tolist()


def label_config(class_names, palette) -> str:
  """The labeling config whose tag names the predictions use."""
  labels = "\n".join(
      f"    <Label value={quoteattr(name)} background="
      f"{quoteattr('#%02x%02x%02x' % tuple(colour))}/>"
      for name, colour in zip(class_names, palette))
  return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
          f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n'
          f'  </BrushLabels>\n</View>\n')


def task(row: ExportRow, class_names, model: str, url: str) -> dict:
  """One task: the image, and one prediction with a brush per class present."""
  results = []
  for class_id in (int(c) for c in np.unique(row.mask) if c != NODATA_CLASS):
    results.append({
        "id": f"c{class_id}", "from_name": FROM_NAME, "to_name": TO_NAME,
        "type": "brushlabels", "origin": "prediction",
        "original_width": row.width, "original_height": row.height, "image_rotation": 0,
        "value": {"format": "rle", "rle": brush_rle(row.mask == class_id),
                  "brushlabels": [class_names[class_id]]}})
  prediction = {"model_version": model, "result": results}
  if row.mean_confidence is not None:
    prediction["score"] = float(row.mean_confidence)
  return {"data": {TO_NAME: url, "hrnet_beam_image_id": row.image_id},
          "predictions": [prediction]}


class LabelStudioWriter:
  """Writes `<to>/tasks.json` (a JSON list, streamed) and `<to>/label_config.xml`.

  url_prefix: where Label Studio finds the images (e.g. '/data/local-files/?d=scenes/'
  or 'gs://bucket/images/'), joined to each image's path under the inputs' common
  directory; default: the source URI as it is.
  """

  def __init__(self, to: str, url_prefix: str | None = None):
    self._to = to.rstrip("/")
    self._url_prefix = url_prefix
    self._out = None
    self._info = None
    self._count = 0

  def start(self, info: OutputInfo) -> None:
    self._info = info
    with create(f"{self._to}/label_config.xml", "application/xml") as f:
      f.write(label_config(info.class_names, info.palette).encode())
    self._out = create(f"{self._to}/tasks.json", "application/json")
    self._out.write(b"[\n")

  def add(self, row: ExportRow) -> None:
    url = row.source if self._url_prefix is None else self._url_prefix + row.file_name
    item = task(row, self._info.class_names, self._info.model, url)
    self._out.write((b",\n" if self._count else b"") + json.dumps(item).encode())
    self._count += 1

  def finish(self) -> list[str]:
    self._out.write(b"\n]\n")
    self._out.close()
    return [f"{self._to}/tasks.json", f"{self._to}/label_config.xml"]
