"""COCO: one annotation per class present in an image, its pixels as compressed RLE
(pycocotools), categories from the labels file; streamed, so images and annotations
are never all in memory."""
from __future__ import annotations

import datetime
import json
import tempfile

import numpy as np

from transforms.exports.rows import ExportRow, OutputInfo, create
from transforms.types import NODATA_CLASS


def category_id(class_id: int) -> int:
  """COCO ids start at 1 (0 is commonly read as 'no category')."""
  return class_id + 1


def coco_annotations(row: ExportRow, image_id: int, first_id: int) -> list[dict]:
  """One annotation per class present in the row's mask (nodata and ignore left out)."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  annotations = []
  classes = [int(c) for c in np.unique(row.mask) if c != NODATA_CLASS]
  for offset, class_id in enumerate(classes):
    rle = mask_utils.encode(np.asfortranarray(row.mask == class_id, dtype=np.uint8))
    annotation = {
        "id": first_id + offset, "image_id": image_id, "category_id": category_id(class_id),
        "segmentation": {"size": [int(v) for v in rle["size"]],
                         "counts": rle["counts"].decode("ascii")},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }
    if row.class_mean_confidence and row.class_mean_confidence[class_id] is not None:
      annotation["score"] = float(row.class_mean_confidence[class_id])
    annotations.append(annotation)
  return annotations


class CocoWriter:
  """Writes `<to>/annotations.json`. Usage: start(info); add(row)...; finish()."""

  def __init__(self, to: str):
    self._path = f"{to.rstrip('/')}/annotations.json"
    self._images = tempfile.TemporaryFile("w+", encoding="utf-8")
    self._annotations = tempfile.TemporaryFile("w+", encoding="utf-8")
    self._info = None
    self._image_count = self._annotation_count = 0

  def start(self, info: OutputInfo) -> None:
    self._info = info

  def add(self, row: ExportRow) -> None:
    self._image_count += 1
    image = {"id": self._image_count, "file_name": row.file_name, "width": row.width,
             "height": row.height, "hrnet_beam_image_id": row.image_id}
    if row.mean_confidence is not None:
      image["hrnet_beam_mean_confidence"] = row.mean_confidence
    _append(self._images, image, self._image_count == 1)
    for annotation in coco_annotations(row, self._image_count, self._annotation_count + 1):
      self._annotation_count += 1
      _append(self._annotations, annotation, self._annotation_count == 1)

  def finish(self) -> list[str]:
    info = self._info
    head = {
        "info": {"description": f"hrnet-beam predictions of {info.model}",
                 "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat()},
        "licenses": [],
        "categories": [{"id": category_id(i), "name": name, "supercategory": "",
                        "color": list(info.palette[i])}
                       for i, name in enumerate(info.class_names)],
    }
    with create(self._path, "application/json") as out:
      out.write(json.dumps(head)[:-1].encode() + b', "images": [')
      _copy(self._images, out)
      out.write(b'], "annotations": [')
      _copy(self._annotations, out)
      out.write(b"]}\n")
    return [self._path]


def _append(spool, item: dict, first: bool) -> None:
  spool.write(("" if first else ",\n") + json.dumps(item))


def _copy(spool, out) -> None:
  spool.seek(0)
  while chunk := spool.read(1 << 20):
    out.write(chunk.encode())
  spool.close()
