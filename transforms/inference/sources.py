"""Where a model comes from: a TF Hub handle, a gs:// directory copied once per machine,
or a local SavedModel directory."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hrnet_beam", "models")

STAGING_HELP = (
    "To run without reaching tfhub.dev, stage the model once and point --model at the copy: "
    "download https://tfhub.dev/google/HRNet/<name>-hrnetv2-w48/1?tf-hub-format=compressed, "
    "extract the .tar.gz into a directory (it holds saved_model.pb and variables/), then "
    "pass that directory, or copy it to gs://BUCKET/models/NAME and pass that.")


class ModelLoadError(RuntimeError):
  """The model could not be loaded or is not an HRNet SavedModel; the message says why."""


def is_hub_handle(handle: str) -> bool:
  return handle.startswith(("http://", "https://"))


def _is_remote(handle: str) -> bool:
  return "://" in handle and not handle.startswith("file://")


def _copy_remote_model(uri: str, cache_dir: str) -> str:
  """Copies a SavedModel directory from gs:// (any Beam filesystem) to local disk.

  Once per machine: processes on the same machine wait on a file lock, and a finished
  copy is marked complete, so a thousand workers read the bucket once each, not per process.
  """
  prefix = uri.rstrip("/") + "/"
  dest = os.path.join(cache_dir, hashlib.sha1(prefix.encode()).hexdigest()[:20])
  marker = os.path.join(dest, ".hrnet_beam_complete")
  if os.path.exists(marker):
    return dest
  os.makedirs(cache_dir, exist_ok=True)
  with open(dest + ".lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(marker):
      return dest
    files = FileSystems.match([prefix + "**"])[0].metadata_list
    if not files:
      raise ModelLoadError(f"no files under {prefix}")
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for meta in files:
      relative = meta.path[len(prefix):]
      target = os.path.join(tmp, relative)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with FileSystems.open(meta.path, compression_type=CompressionTypes.UNCOMPRESSED
                            ) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    with open(marker, "w", encoding="utf-8") as f:
      f.write(uri)
  logger.info("Copied model %s to %s", uri, dest)
  return dest


OPTIMIZED_MANIFEST = "hrnet_beam_openvino.json"   # an optimized model (openvino_engine.py)


def resolve_model_dir(handle: str, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
  """A local SavedModel directory for a TF Hub handle, a gs:// directory or a local one."""
  if is_hub_handle(handle):
    import tensorflow_hub as hub  # pylint: disable=import-outside-toplevel
    return hub.resolve(handle)
  if handle.startswith("file://"):
    handle = handle[len("file://"):]
  if _is_remote(handle):
    return _copy_remote_model(handle, cache_dir)
  if not os.path.isdir(handle):
    raise ModelLoadError(f"{handle} is not a directory")
  if not os.path.exists(os.path.join(handle, "saved_model.pb")) and not os.path.exists(
      os.path.join(handle, OPTIMIZED_MANIFEST)):
    raise ModelLoadError(f"{handle} has no saved_model.pb: not a SavedModel directory "
                         f"(nor an optimized model: no {OPTIMIZED_MANIFEST})")
  return handle
