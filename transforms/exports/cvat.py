"""CVAT's "Segmentation mask 1.1" (Pascal VOC layout): labelmap.txt, one colour PNG per
image in SegmentationClass/, and the image list in ImageSets/Segmentation/default.txt.

Nodata and ignored pixels are painted as the declared `background` (0, 0, 0): CVAT
rejects a mask colour its labelmap does not declare. Class colours come from the
labels file, made unique and kept off black where they collide.
"""
from __future__ import annotations

import io

import numpy as np

from transforms.exports.rows import ExportRow, OutputInfo, create
from transforms.types import NODATA_CLASS

BACKGROUND = "background"
SUBSET = "default"


def cvat_colours(class_names, palette) -> list[tuple]:
  """One distinct colour per class; black is the background's alone (or that of a
  class named 'background', which then is CVAT's background)."""
  taken = {(0, 0, 0)}
  colours = []
  for name, colour in zip(class_names, palette):
    colour = tuple(int(v) for v in colour)
    if name == BACKGROUND:
      colours.append((0, 0, 0))
      continue
    while colour in taken:   # step the blue channel until the colour is free
      colour = (colour[0], colour[1], (colour[2] + 1) % 256)
    taken.add(colour)
    colours.append(colour)
  return colours


def labelmap(class_names, colours) -> str:
  lines = ["# label:color_rgb:parts:actions"]
  if BACKGROUND not in class_names:
    lines.append(f"{BACKGROUND}:0,0,0::")
  lines += [f"{name}:{','.join(map(str, colour))}::"
            for name, colour in zip(class_names, colours)]
  return "\n".join(lines) + "\n"


def paint(mask: np.ndarray, colours) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) colours; nodata and ignore become background."""
  table = np.zeros((256, 3), np.uint8)
  table[:len(colours)] = colours
  table[len(colours):] = 0
  table[NODATA_CLASS] = 0
  return table[mask]


class CvatMaskWriter:
  """Writes the layout under `to` (a directory; zip it to import into CVAT)."""

  def __init__(self, to: str):
    self._to = to.rstrip("/")
    self._colours = None
    self._names = None

  def start(self, info: OutputInfo) -> None:
    self._colours = cvat_colours(info.class_names, info.palette)
    with create(f"{self._to}/labelmap.txt", "text/plain") as f:
      f.write(labelmap(info.class_names, self._colours).encode())
    self._names = create(f"{self._to}/ImageSets/Segmentation/{SUBSET}.txt", "text/plain")

  def add(self, row: ExportRow) -> None:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    buffer = io.BytesIO()
    Image.fromarray(paint(row.mask, self._colours), mode="RGB").save(buffer, format="PNG")
    with create(f"{self._to}/SegmentationClass/{row.name}.png", "image/png") as f:
      f.write(buffer.getvalue())
    self._names.write(f"{row.name}\n".encode())

  def finish(self) -> list[str]:
    self._names.close()
    return [f"{self._to}/labelmap.txt", f"{self._to}/ImageSets/Segmentation/{SUBSET}.txt",
            f"{self._to}/SegmentationClass/"]
