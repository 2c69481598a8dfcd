"""The web page behind `hrnet-beam serve`: a grid of a job's images with their masks and
class fractions, filters, and nearest neighbours from an index, over JSON endpoints.

Everything is addressed by row number in the tables loaded at start: a URL never names
a path, so the server reads only the job's own source images and output files.

    GET /                                the page
    GET /api/info                        level, classes, palette, counts
    GET /api/images?where=&offset=&limit=   rows with fractions and QA columns
    GET /api/patches?image=N             the indexed patches of image row N
    GET /api/neighbours?id=N&k=&where=   nearest rows of index id N
    GET /media/image/N?size=S            source image of row N (PNG, longest side S)
    GET /media/mask/N?size=S             its mask in the palette's colours (PNG, alpha)
    GET /media/hit/N?size=S              what index id N shows: its image, or its patch
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from transforms.index.filters import FilterError, evaluate, fraction_matrix, parse_where
from transforms.pngs import decode_png
from transforms.types import NODATA_CLASS

__all__ = ["JobOutput", "make_server"]

logger = logging.getLogger(__name__)

STATIC = os.path.join(os.path.dirname(__file__), "static")
_LIGHT_COLUMNS = ["image_id", "source", "height", "width", "valid_pixels", "block_y",
                  "class_fractions", "mean_confidence", "mean_margin", "mean_entropy",
                  "low_confidence_fraction", "model", "engine", "precision"]
QA_COLUMNS = ("mean_confidence", "mean_margin", "mean_entropy", "low_confidence_fraction")
MAX_SIDE = 1024
MAX_SOURCE_PIXELS = 64_000_000


class NotFound(Exception):
  """A URL the server does not serve."""


class JobOutput:
  """A job's rows (without their masks) and, optionally, its index, loaded once."""

  def __init__(self, files: list, searcher=None):
    if not files:
      raise FileNotFoundError("no segmentation rows found")
    tables, self._where = [], []
    for path in files:
      handle = pq.ParquetFile(pa.PythonFile(FileSystems.open(path), mode="r"))
      names = handle.schema_arrow.names
      metadata = handle.schema_arrow.metadata or {}
      for group in range(handle.num_row_groups):
        table = handle.read_row_group(group, columns=[c for c in _LIGHT_COLUMNS
                                                      if c in names])
        tables.append(table)
        self._where.extend((path, group, i) for i in range(table.num_rows))
    self.rows = pa.concat_tables(tables, promote_options="default")
    self.class_names = json.loads(metadata.get(b"hrnet_beam.class_names", b"[]"))
    self.palette = json.loads(metadata.get(b"hrnet_beam.palette", b"[]"))
    self.model = metadata.get(b"hrnet_beam.model", b"").decode()
    self.searcher = searcher
    self._records = self.rows.to_pylist()
    self._by_image_id = {r["image_id"]: i for i, r in enumerate(self._records)}
    self._fractions = fraction_matrix(self.rows, self.class_names)
    self._lock = threading.Lock()

  # ---- JSON ----
  def info(self) -> dict:
    searcher = self.searcher
    return {"images": len(self._records), "class_names": self.class_names,
            "palette": self.palette, "model": self.model,
            "index": None if searcher is None else {
                "level": searcher.level, "vectors": int(searcher.index.ntotal),
                "type": searcher.manifest["factory"],
                "normalization": searcher.manifest["normalization"],
                "patch_size": searcher.manifest.get("patch_size")},
            "qa_columns": [c for c in QA_COLUMNS if c in self.rows.column_names]}

  def images(self, where: str, offset: int, limit: int) -> dict:
    keep = np.ones(len(self._records), bool)
    clauses = parse_where(where, self.class_names)
    if clauses:
      keep = evaluate(clauses, self._fractions)
    positions = np.flatnonzero(keep)
    chosen = positions[offset:offset + min(limit, 500)]
    return {"total": int(len(positions)),
            "images": [self._image_json(int(i)) for i in chosen]}

  def _image_json(self, row: int) -> dict:
    record = self._records[row]
    out = {"row": row, "image_id": record["image_id"],
           "name": record["image_id"].rsplit("/", 1)[-1],
           "height": record["height"], "width": record["width"],
           "class_fractions": record.get("class_fractions"),
           "qa": {c: record.get(c) for c in QA_COLUMNS if record.get(c) is not None},
           "index_id": None}
    if self.searcher is not None and self.searcher.level == "image":
      try:
        out["index_id"] = self.searcher.row_of(record["image_id"])
      except KeyError:
        pass
    return out

  def patches(self, row: int) -> dict:
    record = self._record(row)
    searcher = self._need_index("patch")
    ids = searcher.ids
    image_ids = searcher._columns["image_id"]  # pylint: disable=protected-access
    found = np.flatnonzero(image_ids == record["image_id"])
    patches = ids.take(pa.array(found, pa.int64())).to_pylist()
    return {"row": row, "patch_size": searcher.manifest.get("patch_size"),
            "patches": [{"index_id": int(p["id"]), "patch": [p["patch_row"], p["patch_col"]],
                         "box": [p["y0"], p["x0"], p["y1"], p["x1"]],
                         "class_fractions": p.get("class_fractions")} for p in patches]}

  def neighbours(self, index_id: int, k: int, where: str) -> dict:
    searcher = self._need_index()
    if not 0 <= index_id < searcher.index.ntotal:
      raise NotFound(f"no index id {index_id}")
    vector = searcher.stored_vector(index_id)
    with self._lock:
      hits = searcher.search(vector, min(max(k, 1), 100), where, exclude=index_id)
    query = searcher._hit(0, index_id, 1.0)  # pylint: disable=protected-access
    return {"query": self._hit_json(query), "hits": [self._hit_json(h) for h in hits]}

  def _hit_json(self, hit) -> dict:
    out = hit.as_json()
    out["row"] = self._by_image_id.get(hit.image_id)
    out["name"] = hit.image_id.rsplit("/", 1)[-1]
    return out

  def _need_index(self, level: Optional[str] = None):
    if self.searcher is None:
      raise NotFound("no index: start serve with --index DIR")
    if level and self.searcher.level != level:
      raise NotFound(f"the index holds {self.searcher.level}s")
    return self.searcher

  def _record(self, row: int) -> dict:
    if not 0 <= row < len(self._records):
      raise NotFound(f"no row {row}")
    return self._records[row]

  # ---- pictures ----
  def source_pixels(self, row: int) -> np.ndarray:
    """The row's source image as RGB uint8, decoded by the job's own decoder."""
    from transforms.reading.decode import decode_image  # pylint: disable=import-outside-toplevel
    record = self._record(row)
    if record.get("block_y") is not None or "#" in record["image_id"]:
      raise NotFound("blocks of huge rasters and shard records have no picture here")
    try:
      with FileSystems.open(record["source"]) as f:
        data = f.read()
    except (OSError, IOError) as e:   # moved, deleted, or a relative path from elsewhere
      raise NotFound(f"source image {record['source']} cannot be read from here: {e}") from e
    pixels = decode_image(data, MAX_SOURCE_PIXELS)
    if pixels.dtype != np.uint8:
      pixels = (pixels.astype(np.float32) / np.iinfo(pixels.dtype).max * 255).astype(np.uint8)
    return pixels

  def mask_rgba(self, row: int) -> np.ndarray:
    """The row's mask in the palette's colours; nodata transparent."""
    self._record(row)
    path, group, offset = self._where[row]
    handle = pq.ParquetFile(pa.PythonFile(FileSystems.open(path), mode="r"))
    data = handle.read_row_group(group, columns=["mask_png"]).column(0)[offset].as_py()
    if data is None:
      raise NotFound("this row has no mask (the job ran without masks)")
    mask = decode_png(data)
    colours = np.zeros((256, 4), np.uint8)
    for i, colour in enumerate(self.palette[:NODATA_CLASS]):
      colours[i] = (*colour[:3], 255)
    return colours[mask]

  def hit_pixels(self, index_id: int) -> np.ndarray:
    searcher = self._need_index()
    if not 0 <= index_id < searcher.index.ntotal:
      raise NotFound(f"no index id {index_id}")
    hit = searcher._hit(0, index_id, 0.0)  # pylint: disable=protected-access
    row = self._by_image_id.get(hit.image_id)
    if row is None:
      raise NotFound(f"{hit.image_id} is not among this output's rows")
    pixels = self.source_pixels(row)
    if hit.box is not None:
      y0, x0, y1, x1 = hit.box
      pixels = pixels[y0:y1, x0:x1]
    return pixels


def png(pixels: np.ndarray, size: Optional[int]) -> bytes:
  image = Image.fromarray(pixels)
  if size:
    image.thumbnail((size, size), Image.Resampling.NEAREST if pixels.ndim == 3 and
                    pixels.shape[2] == 4 else Image.Resampling.BILINEAR)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


_MEDIA = re.compile(r"^/media/(image|mask|hit)/(\d{1,12})$")


def _int(query: dict, name: str, default: int, low: int = 0, high: int = 10**9) -> int:
  try:
    value = int(query.get(name, [default])[0])
  except ValueError as e:
    raise ValueError(f"{name} must be a whole number") from e
  return min(max(value, low), high)


def make_server(output: JobOutput, host: str = "127.0.0.1", port: int = 8765):
  """A ThreadingHTTPServer over the job's output (call serve_forever, or shutdown)."""

  class Handler(BaseHTTPRequestHandler):
    server_version = "hrnet-beam"

    def log_message(self, fmt, *args):  # pylint: disable=arguments-differ
      logger.info("%s " + fmt, self.address_string(), *args)

    def _send(self, status, body: bytes, kind: str):
      self.send_response(status)
      self.send_header("Content-Type", kind)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store" if kind.startswith("application/json")
                       else "max-age=300")
      self.send_header("X-Content-Type-Options", "nosniff")
      self.end_headers()
      self.wfile.write(body)

    def _json(self, payload, status=HTTPStatus.OK):
      self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def do_GET(self):  # pylint: disable=invalid-name
      url = urlparse(self.path)
      query = parse_qs(url.query)
      try:
        if url.path in ("/", "/index.html"):
          with open(os.path.join(STATIC, "index.html"), "rb") as f:
            self._send(HTTPStatus.OK, f.read(), "text/html; charset=utf-8")
        elif url.path == "/api/info":
          self._json(output.info())
        elif url.path == "/api/images":
          self._json(output.images(query.get("where", [""])[0], _int(query, "offset", 0),
                                   _int(query, "limit", 60, 1, 500)))
        elif url.path == "/api/patches":
          self._json(output.patches(_int(query, "image", -1, -1)))
        elif url.path == "/api/neighbours":
          self._json(output.neighbours(_int(query, "id", -1, -1), _int(query, "k", 12, 1, 100),
                                       query.get("where", [""])[0]))
        elif _MEDIA.match(url.path):
          kind, number = _MEDIA.match(url.path).groups()
          size = _int(query, "size", 256, 16, MAX_SIDE)
          pixels = {"image": output.source_pixels, "mask": output.mask_rgba,
                    "hit": output.hit_pixels}[kind](int(number))
          self._send(HTTPStatus.OK, png(pixels, size), "image/png")
        else:
          raise NotFound(url.path)
      except NotFound as e:
        self._json({"error": f"not found: {e}"}, HTTPStatus.NOT_FOUND)
      except (FilterError, ValueError) as e:
        self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
      except Exception as e:  # pylint: disable=broad-except
        logger.warning("%s failed: %s: %s", self.path, type(e).__name__, e)
        self._json({"error": f"{type(e).__name__}: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

  return ThreadingHTTPServer((host, port), Handler)
