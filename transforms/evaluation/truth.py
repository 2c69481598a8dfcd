"""Reviewed labels ("truth") as class-id masks: mask images (PNG or GeoTIFF) and labeling
tools' files (COCO, Label Studio, CVAT), each decoded with its ecosystem's library where
one exists, and the class map relating truth classes to the model's.

A decoded truth mask holds ids into its source's class list; UNLABELLED marks pixels no
annotation covers. Where annotations overlap, the later one (CVAT: the higher z_order)
wins, as the tools draw them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import re
import xml.etree.ElementTree as ElementTree
from typing import Iterator, Optional

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.evaluation.metrics import IGNORED, Taxonomy

UNLABELLED = 255
FORMATS = ("coco", "labelstudio", "cvat")
MASK_EXTENSIONS = (".png", ".tif", ".tiff")


class TruthError(ValueError):
  """Truth or a class map that cannot be used; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class DecodedTruth:
  """One image's truth from a labeling tool's file (mask None with an error)."""
  name: str                    # the image's file name as the tool knows it
  image_id: Optional[str]      # the job's image id, where the file carried it
  mask: Optional[np.ndarray]   # (H, W) uint8 ids into the file's classes, UNLABELLED
  error: Optional[str] = None


def match_key(path: str, suffix: str = "") -> str:
  """The key rows and truth meet on: the file's stem (a shard record: its key)."""
  path = path.split("?", 1)[-1] if "?d=" in path else path    # Label Studio local files
  if "#" in path:
    path = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.split("#", 1)[1]).strip("._") or "record"
  stem = posixpath.basename(path.rstrip("/"))
  if suffix and stem.endswith(suffix):
    return stem[:-len(suffix)]
  stem = stem.rsplit(".", 1)[0] if "." in stem else stem
  return stem[:-len(suffix)] if suffix and stem.endswith(suffix) else stem


def _open(path: str):
  return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
  with _open(path) as f:
    return f.read()


def decode_mask_image(data: bytes) -> np.ndarray:
  """A truth mask image (PNG, or a one-band GeoTIFF) -> (H, W) uint8 class ids."""
  if data[:4] in (b"II*\x00", b"MM\x00*"):
    from rasterio.io import MemoryFile  # pylint: disable=import-outside-toplevel
    with MemoryFile(data) as memory, memory.open() as dataset:
      if dataset.count != 1 or dataset.dtypes[0] not in ("uint8", "uint16"):
        raise TruthError(f"a truth GeoTIFF needs one band of class ids; this one has "
                         f"{dataset.count} of {dataset.dtypes[0]}")
      array = dataset.read(1)
  else:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with Image.open(io.BytesIO(data)) as image:
      if image.mode not in ("L", "P", "I;16", "I"):
        raise TruthError(f"a truth mask needs one channel of class ids; this PNG is "
                         f"{image.mode} (a colour image?)")
      array = np.asarray(image)
  if array.max(initial=0) > 255:
    raise TruthError(f"class id {int(array.max())} does not fit 8 bits")
  return array.astype(np.uint8)


def _polygon_mask(polygons: list, height: int, width: int) -> np.ndarray:
  """Flat [x0, y0, x1, y1, ...] pixel-coordinate polygons, rasterized by pycocotools."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  polygons = [p for p in polygons if len(p) >= 6]
  if not polygons:
    return np.zeros((height, width), bool)
  rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  return mask_utils.decode(rle).astype(bool)


# ---- COCO --------------------------------------------------------------------------


def coco_classes(data: dict) -> tuple:
  return tuple(str(c["name"]) for c in data.get("categories", []))


def decode_coco(data: dict) -> Iterator[DecodedTruth]:
  """Each image of a COCO file, its annotations (RLE, compressed or not, or polygons)
  painted in file order."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  index = {c["id"]: i for i, c in enumerate(data.get("categories", []))}
  by_image = {}
  for annotation in data.get("annotations", []):
    by_image.setdefault(annotation["image_id"], []).append(annotation)
  for image in data.get("images", []):
    name, image_id = image.get("file_name", str(image["id"])), image.get("hrnet_beam_image_id")
    try:
      height, width = int(image["height"]), int(image["width"])
      mask = np.full((height, width), UNLABELLED, np.uint8)
      for annotation in by_image.get(image["id"], []):
        if annotation["category_id"] not in index:
          raise TruthError(f"annotation {annotation.get('id')} has category "
                           f"{annotation['category_id']}, not among the file's categories")
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):
          pixels = _polygon_mask(segmentation, height, width)
        else:
          if isinstance(segmentation.get("counts"), list):
            segmentation = mask_utils.frPyObjects(segmentation, height, width)
          pixels = mask_utils.decode(segmentation).astype(bool)
        if pixels.shape != (height, width):
          raise TruthError(f"annotation {annotation.get('id')} is {pixels.shape[1]}x"
                           f"{pixels.shape[0]}, its image {width}x{height}")
        mask[pixels] = index[annotation["category_id"]]
      yield DecodedTruth(name, image_id, mask)
    except Exception as e:  # pylint: disable=broad-except  # one image's bad truth
      yield DecodedTruth(name, image_id, None, f"does not decode: {e}")


# ---- Label Studio ------------------------------------------------------------------

_LS_TYPES = {"brushlabels": "brushlabels", "polygonlabels": "polygonlabels"}


def _ls_annotation(item: dict) -> Optional[dict]:
  """The task's reviewed annotation: the last one not cancelled."""
  kept = [a for a in item.get("annotations", []) or [] if not a.get("was_cancelled")]
  return kept[-1] if kept else None


def labelstudio_classes(tasks: list) -> tuple:
  names = []
  for item in tasks:
    annotation = _ls_annotation(item)
    for result in (annotation or {}).get("result", []):
      for name in result.get("value", {}).get(result.get("type", ""), []):
        if name not in names:
          names.append(name)
  return tuple(names)


def decode_labelstudio(tasks: list, class_names: tuple) -> Iterator[DecodedTruth]:
  """Each task's last annotation not cancelled: brushes (Label Studio's RLE, decoded by
  its converter) and polygons (points in percent of the image), in result order."""
  from label_studio_converter.brush import decode_rle  # pylint: disable=import-outside-toplevel
  for item in tasks:
    data = item.get("data", {})
    image_id = data.get("hrnet_beam_image_id")
    name = str(data.get("image", image_id or item.get("id")))
    annotation = _ls_annotation(item)
    if annotation is None:
      yield DecodedTruth(name, image_id, None,
                         "task has no annotation (only predictions): not reviewed yet")
      continue
    try:
      mask = None
      for result in annotation.get("result", []):
        kind = result.get("type")
        if kind not in _LS_TYPES:
          continue
        height, width = int(result["original_height"]), int(result["original_width"])
        if mask is None:
          mask = np.full((height, width), UNLABELLED, np.uint8)
        if mask.shape != (height, width):
          raise TruthError(f"results of sizes {mask.shape[::-1]} and {(width, height)}")
        label = result["value"][kind][0]
        if label not in class_names:
          raise TruthError(f"label {label!r} is not among the truth classes")
        if kind == "brushlabels":
          alpha = np.reshape(decode_rle(result["value"]["rle"]), (height, width, 4))[..., 3]
          pixels = alpha >= 128
        else:
          points = np.asarray(result["value"]["points"], np.float64)
          points = points * [width / 100.0, height / 100.0]
          pixels = _polygon_mask([points.ravel().tolist()], height, width)
        mask[pixels] = class_names.index(label)
      if mask is None:
        raise TruthError("its annotation has no brush or polygon")
      yield DecodedTruth(name, image_id, mask)
    except Exception as e:  # pylint: disable=broad-except
      yield DecodedTruth(name, image_id, None, f"does not decode: {e}")


# ---- CVAT --------------------------------------------------------------------------


def cvat_classes(path: str) -> tuple:
  """Label names (and colours, where given) of a CVAT for images 1.1 XML, or of a
  Segmentation mask 1.1 directory's labelmap.txt (its 'background' left out: CVAT
  reads it as unlabelled)."""
  return tuple(name for name, _ in cvat_labels(path))


def cvat_labels(path: str) -> list:
  if path.rstrip("/").endswith(".xml"):
    labels = []
    with _open(path) as f:
      for _, element in ElementTree.iterparse(f, events=("end",)):
        if element.tag == "label" and element.find("name") is not None:
          colour = (element.findtext("color") or "").lstrip("#")
          labels.append((element.findtext("name"),
                         tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))
                         if len(colour) == 6 else None))
        elif element.tag == "image":
          break
    return labels
  labels = []
  for line in read_bytes(f"{path.rstrip('/')}/labelmap.txt").decode().splitlines():
    if line.strip() and not line.startswith("#"):
      name, colour = line.split(":")[:2]
      if name != "background":
        labels.append((name, tuple(int(v) for v in colour.split(","))))
  return labels


def _cvat_mask(element, height: int, width: int) -> np.ndarray:
  """A CVAT <mask>: runs alternating 0 and 1 (starting with 0) over its box, row-major."""
  left, top = int(element.get("left")), int(element.get("top"))
  box_width, box_height = int(element.get("width")), int(element.get("height"))
  runs = np.array([int(v) for v in element.get("rle").split(",")], np.int64)
  values = np.arange(runs.size) % 2 == 1
  flat = np.repeat(values, runs)
  if flat.size != box_width * box_height:
    raise TruthError(f"a mask's runs cover {flat.size} pixels, its box "
                     f"{box_width * box_height}")
  pixels = np.zeros((height, width), bool)
  pixels[top:top + box_height, left:left + box_width] = flat.reshape(box_height, box_width)
  return pixels


def decode_cvat_xml(path: str, class_names: tuple) -> Iterator[DecodedTruth]:
  """CVAT for images 1.1: each <image>'s <mask> and <polygon> shapes by z_order."""
  with _open(path) as f:
    for _, element in ElementTree.iterparse(f, events=("end",)):
      if element.tag != "image":
        continue
      name = element.get("name")
      try:
        height, width = int(element.get("height")), int(element.get("width"))
        mask = np.full((height, width), UNLABELLED, np.uint8)
        shapes = [s for s in element if s.tag in ("mask", "polygon")]
        for shape in sorted(shapes, key=lambda s: int(s.get("z_order", 0))):
          label = shape.get("label")
          if label not in class_names:
            raise TruthError(f"label {label!r} is not among the truth classes")
          if shape.tag == "mask":
            pixels = _cvat_mask(shape, height, width)
          else:
            points = [float(v) for pair in shape.get("points").split(";")
                      for v in pair.split(",")]
            pixels = _polygon_mask([points], height, width)
          mask[pixels] = class_names.index(label)
        yield DecodedTruth(name, None, mask)
      except Exception as e:  # pylint: disable=broad-except
        yield DecodedTruth(name, None, None, f"does not decode: {e}")
      element.clear()


def decode_cvat_masks(path: str, class_names: tuple) -> Iterator[DecodedTruth]:
  """Segmentation mask 1.1: each SegmentationClass PNG's colours through labelmap.txt."""
  root = path.rstrip("/")
  colours = {colour: name for name, colour in cvat_labels(root)}
  names = [line.strip() for line in read_bytes(
      f"{root}/ImageSets/Segmentation/default.txt").decode().splitlines() if line.strip()]
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for name in names:
    try:
      with Image.open(io.BytesIO(read_bytes(f"{root}/SegmentationClass/{name}.png"))) as image:
        rgb = np.asarray(image.convert("RGB")).astype(np.int64)
      packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
      mask = np.full(packed.shape, UNLABELLED, np.uint8)
      known = packed == 0
      for colour, label in colours.items():
        if label not in class_names:
          continue
        pixels = packed == ((colour[0] << 16) | (colour[1] << 8) | colour[2])
        mask[pixels] = class_names.index(label)
        known |= pixels
      if not known.all():
        raise TruthError(f"{int((~known).sum())} pixels have colours labelmap.txt does "
                         "not declare")
      yield DecodedTruth(f"{name}.png", None, mask)
    except Exception as e:  # pylint: disable=broad-except
      yield DecodedTruth(f"{name}.png", None, None, f"does not decode: {e}")


# ---- Any tool's file ---------------------------------------------------------------


def tool_classes(fmt: str, path: str) -> tuple:
  """The class names a labeling tool's file uses, in the order its decoder numbers them."""
  if fmt == "coco":
    return coco_classes(json.loads(read_bytes(path)))
  if fmt == "labelstudio":
    return labelstudio_classes(json.loads(read_bytes(path)))
  return cvat_classes(path)


def tool_colours(fmt: str, path: str) -> list:
  """Colours the file declares per class (None where it declares none)."""
  if fmt == "coco":
    return [tuple(c["color"]) if "color" in c else None
            for c in json.loads(read_bytes(path)).get("categories", [])]
  if fmt == "cvat":
    return [colour for _, colour in cvat_labels(path)]
  return [None] * len(tool_classes(fmt, path))


def decode_tool_file(fmt: str, path: str, class_names: tuple) -> Iterator[DecodedTruth]:
  """Each image of a labeling tool's file, with ids into class_names (the file's classes,
  or a --truth_labels file's: an annotation whose label is not there is an error)."""
  if fmt == "coco":
    data = json.loads(read_bytes(path))
    own = coco_classes(data)
    remap = np.full(256, UNLABELLED, np.uint8)
    unknown = [name for name in own if name not in class_names]
    for i, name in enumerate(own):
      if name in class_names:
        remap[i] = class_names.index(name)
    for item in decode_coco(data):
      if item.mask is not None and unknown and np.isin(
          item.mask, [own.index(n) for n in unknown]).any():
        yield dataclasses.replace(item, mask=None, error=f"uses classes {unknown} that are "
                                  "not among the truth classes")
      else:
        yield item if item.mask is None else dataclasses.replace(item, mask=remap[item.mask])
  elif fmt == "labelstudio":
    yield from decode_labelstudio(json.loads(read_bytes(path)), class_names)
  elif path.rstrip("/").endswith(".xml"):
    yield from decode_cvat_xml(path, class_names)
  else:
    yield from decode_cvat_masks(path, class_names)


# ---- Class map ---------------------------------------------------------------------


def read_class_map(path: str) -> dict:
  """{"truth": {truth class: model class or null}, "model": {model class: evaluation
  class}}; a file without these keys is the "truth" part alone."""
  try:
    data = json.loads(read_bytes(path))
  except (OSError, ValueError) as e:
    raise TruthError(f"--class_map {path} cannot be read as JSON: {e}") from e
  if not isinstance(data, dict):
    raise TruthError(f"--class_map {path}: expected a JSON object")
  if set(data) <= {"truth", "model"} and data:
    return {"truth": dict(data.get("truth", {})), "model": dict(data.get("model", {}))}
  return {"truth": data, "model": {}}


def _check_known(mapped, known: tuple, side: str) -> None:
  for name in mapped:
    if name not in known:
      raise TruthError(f"--class_map: {side} class {name!r} is not one of the {side}'s "
                       f"classes {list(known)}")


def taxonomy(model_names: tuple, truth_names: tuple,
             class_map: Optional[dict] = None) -> Taxonomy:
  """The evaluation classes: the model's, merged as class_map["model"] says; each truth
  class goes to the class of its name, or where class_map["truth"] sends it (null:
  ignored). Raises TruthError, before anything runs, for a name the map does not know
  or a truth class with nowhere to go."""
  class_map = class_map or {"truth": {}, "model": {}}
  model_part, truth_part = class_map["model"], class_map["truth"]
  _check_known(model_part, model_names, "model")
  _check_known(truth_part, truth_names, "truth")
  eval_names = []
  for name in model_names:
    target = model_part.get(name, name)
    if target is None:
      raise TruthError(f"--class_map: model class {name!r} cannot map to null: each "
                       "predicted pixel needs an evaluation class")
    if target not in eval_names:
      eval_names.append(target)
  model_to_eval = tuple(eval_names.index(model_part.get(n, n)) for n in model_names)
  for name, target in truth_part.items():
    if target is not None and target not in eval_names:
      raise TruthError(f"--class_map: {name!r} maps to {target!r}, which is not a model "
                       f"class {eval_names}")
  truth_to_eval = []
  for name in truth_names:
    target = truth_part.get(name, name)
    if target is None:
      truth_to_eval.append(IGNORED)
    elif target in eval_names:
      truth_to_eval.append(eval_names.index(target))
    else:
      raise TruthError(f"truth class {name!r} is not a model class {eval_names}: map it "
                       "in --class_map (to a model class, or to null to ignore it)")
  return Taxonomy(tuple(eval_names), model_to_eval, tuple(truth_names), tuple(truth_to_eval))
