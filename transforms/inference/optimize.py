"""Optimizing a model for the OpenVINO engine: conversion of its one-pass function to
OpenVINO IR with dynamic batch and spatial shape, NNCF int8 post-training quantization
(the head left in float), and the manifest the job reads. Pure library: no Beam.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os

import numpy as np

from transforms.inference.openvino_engine import (DYNAMIC_SHAPES, FEATURES, INT8, IR_FILE,
                                                  MANIFEST, SCORES, STATIC_SHAPES)

logger = logging.getLogger(__name__)


def content_hash(local_dir: str) -> str:
  """sha256 over a model directory's files (relative names and bytes, in name order)."""
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(local_dir)):
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, local_dir).encode() + b"\0")
      with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
          digest.update(chunk)
  return digest.hexdigest()


def convert(model):
  """A LoadedHRNet's one-pass function -> openvino.Model with inputs (B, H, W, 3) of
  any batch and size, outputs 'scores' and 'features'."""
  import openvino as ov  # pylint: disable=import-outside-toplevel
  function = model.one_pass_function()
  converted = ov.convert_model(function.get_concrete_function())
  names = {name for output in converted.outputs for name in output.get_names()}
  if not {SCORES, FEATURES} <= names:
    raise RuntimeError(f"converted model outputs {sorted(names)}, expected {SCORES} and "
                       f"{FEATURES}")
  return converted


def head_operations(ov_model) -> list[str]:
  """The convolutions nearest the scores output: the classifier head, which int8 hurts
  most (a wrong class flips a pixel) and which costs little to keep in float."""
  result = next(o for o in ov_model.outputs if SCORES in o.get_names())
  heads, seen = [], set()
  frontier = [result.get_node()]
  while frontier:
    node = frontier.pop()
    if node.get_friendly_name() in seen:
      continue
    seen.add(node.get_friendly_name())
    if node.get_type_name() == "Convolution":
      heads.append(node.get_friendly_name())
      continue
    frontier.extend(value.get_node() for value in node.input_values()
                    if value.get_node().get_type_name() not in ("Constant", "Parameter"))
  return sorted(heads)


def quantize(ov_model, tiles: np.ndarray, keep_head: bool = True,
             fast_bias_correction: bool = False):
  """NNCF post-training int8 quantization calibrated on (N, H, W, 3) float32 tiles.

  NNCF's full bias correction is the default here: on the demo model it took 17 s
  instead of 4 and brought the pooled-feature cosine to TensorFlow float32 from 0.9996
  to 0.99998 (PERFORMANCE.md); fast_bias_correction trades that back for time."""
  import nncf  # pylint: disable=import-outside-toplevel
  ignored = nncf.IgnoredScope(names=head_operations(ov_model)) if keep_head else None
  dataset = nncf.Dataset(list(tiles), lambda tile: tile[None].astype(np.float32))
  return nncf.quantize(ov_model, dataset, preset=nncf.QuantizationPreset.MIXED,
                       subset_size=len(tiles), ignored_scope=ignored,
                       fast_bias_correction=fast_bias_correction)


def manifest(source: str, source_hash: str, precision: str, model_info: dict,
             calibration: dict | None, head_kept: list | None,
             static_shapes: bool = False) -> dict:
  import openvino as ov  # pylint: disable=import-outside-toplevel
  versions = {"openvino": ov.__version__}
  if precision == INT8:
    import nncf  # pylint: disable=import-outside-toplevel
    versions["nncf"] = nncf.__version__
  return {
      "format": "hrnet-beam openvino 1",
      "source_model": source, "source_sha256": source_hash,
      "precision": precision, "input": "(batch, height, width, 3) float32 in [0, 1], "
      "any batch and size (multiples of 32: the job's tiles); outputs 'scores' as the "
      "source's predict, 'features' at 1/4",
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "versions": versions, "calibration": calibration, "kept_in_float": head_kept,
      "shapes": STATIC_SHAPES if static_shapes else DYNAMIC_SHAPES,
      **model_info,
  }


def save(ov_model, directory: str, manifest_data: dict) -> None:
  import openvino as ov  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  # Float weights stay float32: bfloat16 and int8 are chosen at compile time or by NNCF.
  ov.save_model(ov_model, os.path.join(directory, IR_FILE), compress_to_fp16=False)
  with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest_data, f, indent=2)
