"""The typed elements that cross transform boundaries, defined once."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

NODATA_CLASS = 255   # mask value of nodata pixels; never a class id (at most 255 classes)


@dataclasses.dataclass(frozen=True)
class GeoReference:
  """Where a raster lies on the map: its CRS and affine transform.

  transform is (a, b, c, d, e, f) as in rasterio/affine: x = a*col + b*row + c,
  y = d*col + e*row + f, for pixel corners (GDAL's geotransform is (c, a, b, f, d, e)).
  """
  crs_wkt: Optional[str]
  crs_epsg: Optional[int]
  transform: tuple


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """A decoded image: RGB pixels as uint8 or uint16 (H, W, 3), scaled to [0, 1] later.

  valid is (H, W) bool where nodata is known (GeoTIFF nodata, mask or alpha), else None.
  """
  image_id: str
  source: str
  pixels: np.ndarray
  geo: Optional[GeoReference] = None
  valid: Optional[np.ndarray] = None
  block: Optional[tuple] = None        # (y, x) offset in the source raster for a block


@dataclasses.dataclass(frozen=True)
class EncodedImage:
  """Undecoded image bytes from a shard record; image_id is '<shard URI>#<key>'."""
  image_id: str
  source: str
  data: bytes


@dataclasses.dataclass(frozen=True)
class RasterBlock:
  """A fixed block of a raster too big to decode whole; read as a window when decoded.

  image_id is '<raster URI>#block=<y>,<x>'.
  """
  image_id: str
  source: str
  y: int
  x: int
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What every tile of an image carries so results can be stitched without a lookup."""
  image_id: str
  source: str
  height: int
  width: int
  num_tiles: int
  geo: Optional[GeoReference] = None
  block: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class TileSpec:
  """A tile's place: its origin and size in the image and the box it owns in image
  coordinates.

  Owned boxes of an image's tiles partition the image, so every pixel is counted once.
  height and width are the tile's (the model's input) side along y and x: multiples of
  32, at most --tile_size, the same for every tile of an image.
  """
  index: int
  y: int
  x: int
  own_y0: int
  own_y1: int
  own_x0: int
  own_x1: int
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class Tile:
  """A tile (spec.height, spec.width, 3), padded past the image's bottom/right."""
  image: ImageInfo
  spec: TileSpec
  pixels: np.ndarray
  valid: Optional[np.ndarray] = None   # (spec.height, spec.width) bool; None: all valid


@dataclasses.dataclass(frozen=True)
class TileResult:
  """The model's answer for a tile's owned box; `error` set when inference failed."""
  image: ImageInfo
  spec: TileSpec
  class_ids: Optional[np.ndarray] = None      # (own_h, own_w) uint8
  feature_sum: Optional[np.ndarray] = None    # (feature_dim,) float64, summed over own pixels
  error: Optional[str] = None
  precision: str = "float32"                   # what the model really ran at
  counted_pixels: Optional[int] = None         # valid pixels of the owned box; None: all
  qa_sums: Optional[np.ndarray] = None         # (4,) float64 over own valid pixels
  class_confidence_sums: Optional[np.ndarray] = None   # (classes,) float64
  confidence: Optional[np.ndarray] = None      # (own_h, own_w) uint8, when asked for
  pseudo_labels: Optional[np.ndarray] = None   # (own_h, own_w) uint8, when asked for
  patch_keys: Optional[tuple] = None           # (row, col) of the patches the box meets
  patch_counts: Optional[np.ndarray] = None    # (slots,) valid owned pixels per patch
  patch_sums: Optional[np.ndarray] = None      # (slots, feature_dim) float64 feature sums


@dataclasses.dataclass(frozen=True)
class Segmentation:
  """One output row: the stitched mask (PNG) and pooled features of one image."""
  image_id: str
  source: str
  height: int
  width: int
  mask_png: Optional[bytes]
  class_counts: Optional[list]
  pooled_features: Optional[list]
  model: str
  precision: str
  valid_pixels: int = 0                 # pixels counted (not nodata)
  crs_wkt: Optional[str] = None
  crs_epsg: Optional[int] = None
  transform: Optional[list] = None      # GeoReference.transform
  mask_geotiff: Optional[str] = None    # URI of the mask as a COG (--mask_geotiff_dir)
  block_y: Optional[int] = None         # a block's offset in its raster (huge rasters)
  block_x: Optional[int] = None
  mean_confidence: Optional[float] = None       # QA over the valid pixels (with masks)
  mean_margin: Optional[float] = None
  mean_entropy: Optional[float] = None
  low_confidence_fraction: Optional[float] = None
  class_mean_confidence: Optional[list] = None  # per class; None where a class is absent
  confidence_png: Optional[bytes] = None        # max probability x 255 (--outputs confidence)
  pseudo_label_png: Optional[bytes] = None      # mask with IGNORE_VALUE (--ignore_below)
  augmentation: str = "none"                    # test-time augmentation (Augmentation.describe)
  engine: str = "tensorflow"                    # or openvino (an optimized model)
  class_fractions: Optional[dict] = None        # class name -> share of valid pixels
  patches: Optional[tuple] = None               # PatchParts (--patch_output); not a column


@dataclasses.dataclass(frozen=True)
class PatchPart:
  """A patch of the grid aligned to the raster, as far as one row saw it: its box
  (y0, y1, x0, x1) in raster pixels, its valid pixels and their feature sum. complete is
  False where the patch crosses a raster block's edge and other blocks hold the rest."""
  row: int
  column: int
  box: tuple
  valid_pixels: int
  feature_sum: np.ndarray             # (feature_dim,) float64
  class_counts: Optional[tuple]       # valid pixels per class, from the mask
  complete: bool = True


@dataclasses.dataclass(frozen=True)
class PatchEmbedding:
  """One output row of --patch_output: a patch's mean feature over its valid pixels,
  its box in raster pixels (half-open) and its footprint (pixel coordinates for
  plain images)."""
  image_id: str                     # the row's image_id; a raster's URI for its blocks
  source: str
  patch_row: int
  patch_col: int
  y0: int
  x0: int
  y1: int
  x1: int
  valid_pixels: int
  embedding: list                   # (feature_dim,) float32
  class_fractions: Optional[dict]
  class_counts: Optional[list]
  model: str
  geometry: bytes                   # WKB footprint polygon
  bbox: dict
  crs_key: str
  crs_wkt: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
  """An input that produced no row, with the stage that failed and why."""
  image_id: str
  source: str
  stage: str
  reason: str


@dataclasses.dataclass(frozen=True)
class PolygonPart:
  """A 4-connected region of one class, traced in whole-raster pixel coordinates
  (x = column, y = row); on_seam when it touches a block edge and may continue there."""
  class_id: int
  geometry_wkb: bytes
  pixels: int                       # its pixels: the area in pixels, exactly
  confidence_sum: Optional[float]   # sum of its pixels' max probability, when known
  on_seam: bool = False


@dataclasses.dataclass(frozen=True)
class PolygonFeature:
  """One output polygon, in its raster's CRS (pixel coordinates for plain images)."""
  image_id: str                     # the row's image_id; a raster's URI for its blocks
  source: str
  class_id: int
  class_name: str
  area_px: int                      # pixels of the region (before simplification)
  area_m2: Optional[float]          # for projected CRSs
  mean_confidence: Optional[float]
  geometry: bytes                   # WKB
  bbox: dict                        # xmin, ymin, xmax, ymax of the geometry
  crs_key: str                      # which file set it goes to: one CRS per file
  crs_wkt: Optional[str] = None     # that CRS (None: pixel coordinates or unknown CRS)


@dataclasses.dataclass(frozen=True)
class PolygonBatch:
  """The polygons of one row (or of one merged raster class), in one CRS: one Beam
  element for all of them instead of one each."""
  crs_key: str
  crs_wkt: Optional[str]
  features: tuple                   # PolygonFeature, in output order


@dataclasses.dataclass(frozen=True)
class TruthRef:
  """Where one image's reviewed labels are: a mask file to read, or the mask decoded
  from a labeling tool's file (PNG of ids into the tool's classes, 255 unlabelled)."""
  origin: str                       # the mask file, or '<tool file>#<image name>'
  image_id: Optional[str] = None    # the job's image id, where the truth carries it
  path: Optional[str] = None
  mask_png: Optional[bytes] = None
  error: Optional[str] = None       # why it could not be decoded
