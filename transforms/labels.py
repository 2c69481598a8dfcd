"""Class names and palettes of a model, read from a labels file (never from code).

A labels file is JSON: {"name": ..., "classes": [{"name": ..., "color": [r, g, b]}, ...],
"note": ...}; entry i describes the model's output channel i.
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
import os
from typing import Optional

from apache_beam.io.filesystems import FileSystems

LABELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_labels")
MODEL_LABELS_FILE = "labels.json"


@dataclasses.dataclass(frozen=True)
class LabelSet:
  name: str
  class_names: tuple
  palette: tuple  # ((r, g, b), ...), one per class
  note: str = ""
  channel_mapping: Optional[str] = None  # the model's preprocessing, when the file says

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def to_json(self) -> dict:
    data = {"name": self.name, "note": self.note,
            "classes": [{"name": n, "color": list(c)}
                        for n, c in zip(self.class_names, self.palette)]}
    if self.channel_mapping is not None:
      data["channel_mapping"] = self.channel_mapping
    return data


def parse_labels(data: dict, source: str) -> LabelSet:
  try:
    classes = data["classes"]
    names = tuple(str(c["name"]) for c in classes)
    palette = tuple(tuple(int(v) for v in c["color"]) for c in classes)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"labels file {source} is malformed ({e!r}); expected "
                     '{"classes": [{"name": ..., "color": [r, g, b]}, ...]}') from e
  if not names or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
    raise ValueError(f"labels file {source}: needs classes with [r, g, b] colours in 0..255")
  if "added_class" in data:
    raise ValueError(f"labels file {source}: added_class is not supported; list one class "
                     "per model output instead")
  mapping = data.get("channel_mapping")
  return LabelSet(str(data.get("name", os.path.basename(source))), names, palette,
                  str(data.get("note", "")), None if mapping is None else str(mapping))


def fits_model(labels: LabelSet, num_classes: int) -> bool:
  """Whether the labels describe a model with num_classes outputs: one entry per output.

  No near miss is accepted: a file one class short could be off by one at either end, and
  names shifted by one would label a whole dataset wrongly without any error.
  """
  return labels.num_classes == num_classes


def read_labels(path: str) -> LabelSet:
  """Reads a labels file from a local path or any filesystem Beam knows (gs://)."""
  with FileSystems.open(path) as f:
    return parse_labels(json.loads(f.read().decode("utf-8")), path)


def packaged_labels(name: str) -> Optional[LabelSet]:
  path = os.path.join(LABELS_DIR, f"{name}.json")
  return read_labels(path) if os.path.exists(path) else None


def generic_labels(num_classes: int) -> LabelSet:
  """class_0..class_{C-1} with evenly spaced hues, for models that ship no labels."""
  palette = tuple(
      tuple(int(round(v * 255)) for v in colorsys.hsv_to_rgb(i / num_classes, 0.8, 0.95))
      for i in range(num_classes))
  return LabelSet("generic", tuple(f"class_{i}" for i in range(num_classes)), palette,
                  "no labels file: generic names")


def model_suite() -> dict:
  """The HRNet suite's short names and handle template (model_labels/suite.json)."""
  with open(os.path.join(LABELS_DIR, "suite.json"), encoding="utf-8") as f:
    return json.load(f)


def resolve_model_name(model: str) -> str:
  """A short name of the suite ('isprs') -> its TF Hub handle; anything else unchanged."""
  suite = model_suite()
  if model in suite["names"]:
    return suite["handle_template"].format(name=model)
  return model


def labels_for_handle(handle: str) -> Optional[LabelSet]:
  """The packaged labels file whose "handle" is this TF Hub handle, if any."""
  for entry in sorted(os.listdir(LABELS_DIR)):
    if not entry.endswith(".json"):
      continue
    path = os.path.join(LABELS_DIR, entry)
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if data.get("handle", "").rstrip("/") == handle.rstrip("/"):
      return parse_labels(data, path)
  return None


def model_labels(handle: str, model_dir: str,
                 labels_file: Optional[str] = None) -> Optional[LabelSet]:
  """The labels a model runs with, in the job's order: a labels file given by the user,
  else the labels.json beside the model, else the packaged labels for its handle; None
  when none applies. Raises OSError or ValueError for a labels file that cannot be read."""
  if labels_file:
    return read_labels(labels_file)
  beside = os.path.join(model_dir, MODEL_LABELS_FILE)
  if os.path.exists(beside):
    return read_labels(beside)
  return labels_for_handle(handle)


def labels_for_model(handle: str, model_dir: str, num_classes: int,
                     labels_file: Optional[str] = None) -> tuple[LabelSet, bool]:
  """(the labels a model runs with, whether they fit its num_classes outputs): model_labels,
  else generic names. Raises OSError or ValueError as model_labels does."""
  labels = model_labels(handle, model_dir, labels_file) or generic_labels(num_classes)
  return labels, fits_model(labels, num_classes)
