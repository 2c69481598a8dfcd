"""Synthetic aerial scenes with pixel labels (ISPRS classes, own order), deterministic by seed.

    hrnet-beam scenes --output scenes/ --count 20 --height 1100 --width 1500

Label ids are those of pipeline/standin/scene_labels.json (ISPRS classes, clutter first): 0 clutter,
1 impervious surfaces, 2 building, 3 low vegetation, 4 tree, 5 car. Scene kinds: "urban"
(dense blocks, many roads and cars), "suburban" (houses in gardens, trees), "park"
(grass, trees, paths, little else), and "mixed" (drawn at random per scene).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

SCENE_LABELS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scene_labels.json")


def scene_labels() -> dict:
  """The scenes' labels file: class i names label id i of the generated ground truth."""
  with open(SCENE_LABELS_FILE, encoding="utf-8") as f:
    return json.load(f)


_IDS = {c["name"]: i for i, c in enumerate(scene_labels()["classes"])}
CLUTTER, IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR = (
    _IDS[n] for n in ("clutter", "impervious_surfaces", "building", "low_vegetation", "tree",
                      "car"))
SCENE_CLASSES = 6  # ids 0..5 occur in the ground truth
KINDS = ("urban", "suburban", "park")

_DENSITY = {  # per megapixel
    "urban": dict(road_spacing=(110, 170), buildings=260, trees=60, cars=160, lots=40,
                  clutter=25, curves=1),
    "suburban": dict(road_spacing=(200, 300), buildings=90, trees=220, cars=40, lots=10,
                     clutter=20, curves=1),
    "park": dict(road_spacing=(420, 600), buildings=8, trees=300, cars=4, lots=3,
                 clutter=15, curves=2),
}


def _smooth_noise(rng, height, width, cell):
  coarse = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
  ys = np.linspace(0, coarse.shape[0] - 1.001, height)
  xs = np.linspace(0, coarse.shape[1] - 1.001, width)
  y0, x0 = ys.astype(int), xs.astype(int)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
  bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


class _Canvas:
  def __init__(self, height, width, rng):
    self.rng = rng
    self.height, self.width = height, width
    self.image = np.zeros((height, width, 3), np.float32)
    self.labels = np.full((height, width), LOW_VEGETATION, np.uint8)

  def paint(self, mask, colour, label, texture=12.0):
    count = int(mask.sum())
    if count == 0:
      return
    noise = self.rng.normal(0, texture, (count, 1)) + self.rng.normal(0, texture / 3, (count, 3))
    self.image[mask] = np.asarray(colour, np.float32) + noise
    if label is not None:
      self.labels[mask] = label

  def window(self, y0, x0, y1, x1):
    """A box clipped to the canvas as (y0, y1, x0, x1), or None when empty.

    Painting a window instead of a full-size mask keeps generation linear in the
    number of pixels (a 3000^2 scene: minutes before, seconds after), with the same
    random draws in the same order, so scenes are unchanged.
    """
    y0, y1 = max(0, int(y0)), min(self.height, int(y1))
    x0, x1 = max(0, int(x0)), min(self.width, int(x1))
    return (y0, y1, x0, x1) if y1 > y0 and x1 > x0 else None

  def disc_window(self, cy, cx, radius):
    """(window, mask within it) of a disc, or (None, None) when it misses the canvas."""
    window = self.window(cy - radius, cx - radius, int(cy + radius) + 1,
                         int(cx + radius) + 1)
    if window is None:
      return None, None
    return window, self.disc_in(window, cy, cx, radius)

  @staticmethod
  def disc_in(window, cy, cx, radius):
    y0, y1, x0, x1 = window
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2

  def paint_window(self, window, local, colour, label, texture=12.0):
    """paint() restricted to a window; local is a mask within it, None for all of it."""
    if window is None:
      return
    y0, y1, x0, x1 = window
    count = (y1 - y0) * (x1 - x0) if local is None else int(local.sum())
    if count == 0:
      return
    noise = self.rng.normal(0, texture, (count, 1)) + self.rng.normal(0, texture / 3, (count, 3))
    image, labels = self.image[y0:y1, x0:x1], self.labels[y0:y1, x0:x1]
    if local is None:
      image[...] = (np.asarray(colour, np.float32) + noise).reshape(y1 - y0, x1 - x0, 3)
      if label is not None:
        labels[...] = label
    else:
      image[local] = np.asarray(colour, np.float32) + noise
      if label is not None:
        labels[local] = label


def generate_scene(height: int, width: int, seed: int, kind: str = "mixed",
                   pools: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 (H, W, 3), labels uint8 (H, W)) of one scene, the same for the same seed.

  pools: also swimming pools (label POOL), a class the demo model never saw; painted
  last from a random stream of their own, so the rest of the scene is unchanged."""
  rng = np.random.default_rng(seed)
  if kind == "mixed":
    kind = KINDS[int(rng.integers(len(KINDS)))]
  density = _DENSITY[kind]
  megapixels = height * width / 1e6
  canvas = _Canvas(height, width, rng)

  # Grass, with large-scale variation in hue and brightness.
  field = _smooth_noise(rng, height, width, 48)[..., None]
  grass = np.array([72, 112, 48], np.float32) + field * np.array([40, 45, 20], np.float32)
  canvas.image[:] = grass + rng.normal(0, 9, (height, width, 3))

  # Bare soil / clutter patches.
  for _ in range(rng.poisson(density["clutter"] * megapixels) + 1):
    h, w = rng.integers(12, 50, 2)
    y, x = rng.integers(0, height), rng.integers(0, width)
    canvas.paint_window(canvas.window(y, x, y + h, x + w), None,
                        rng.choice([(130, 100, 70), (150, 120, 90), (95, 80, 70)]), CLUTTER,
                        18)

  # Road grid with lane marks, and curved roads.
  road_colour = (118, 118, 115)
  roads = np.zeros((height, width), bool)
  low, high = density["road_spacing"]
  for axis in (0, 1):
    position = int(rng.integers(20, low))
    extent = height if axis == 0 else width
    while position < extent:
      half = int(rng.integers(7, 12))
      window = (canvas.window(position - half, 0, position + half, width) if axis == 0 else
                canvas.window(0, position - half, height, position + half))
      if window is not None:
        roads[window[0]:window[1], window[2]:window[3]] = True
      position += int(rng.integers(low, high))
  for _ in range(density["curves"]):
    yy, xx = np.mgrid[0:height, 0:width]
    amplitude, period = rng.uniform(0.1, 0.3) * height, rng.uniform(0.6, 1.5) * width
    centre = rng.uniform(0.2, 0.8) * height + amplitude * np.sin(
        2 * np.pi * xx / period + rng.uniform(0, 6))
    roads |= np.abs(yy - centre) < rng.integers(6, 10)
  canvas.paint(roads, road_colour, IMPERVIOUS, 6)
  marks = roads.copy()
  dashes = ((np.arange(width)[None, :] // 12) % 3 == 0) & ((np.arange(height)[:, None] // 12) % 3 == 0)
  canvas.paint(marks & dashes & (rng.random((height, width)) < 0.08), (235, 235, 230),
               IMPERVIOUS, 4)

  # Paved lots.
  for _ in range(rng.poisson(density["lots"] * megapixels)):
    h, w = rng.integers(30, 90, 2)
    y, x = rng.integers(0, height), rng.integers(0, width)
    canvas.paint_window(canvas.window(y, x, y + h, x + w), None, (150, 148, 140),
                        IMPERVIOUS, 8)

  # Buildings off the roads, with a lit and a shaded roof half and a shadow.
  roofs = [(170, 70, 55), (140, 60, 50), (200, 200, 205), (85, 85, 95), (110, 95, 80)]
  for _ in range(rng.poisson(density["buildings"] * megapixels)):
    h, w = rng.integers(16, 55 if kind == "urban" else 36, 2)
    y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
    footprint = canvas.window(y, x, y + h, x + w)
    if footprint is not None and roads[footprint[0]:footprint[1],
                                       footprint[2]:footprint[3]].any():
      continue
    shadow = canvas.window(y + 4, x + 4, y + h + 6, x + w + 6)
    if shadow is not None:
      sy0, sy1, sx0, sx1 = shadow
      outside = ~roads[sy0:sy1, sx0:sx1]
      if footprint is not None:   # the footprint's part of the shadow window is lit
        outside[max(footprint[0] - sy0, 0):max(footprint[1] - sy0, 0),
                max(footprint[2] - sx0, 0):max(footprint[3] - sx0, 0)] = False
      canvas.image[sy0:sy1, sx0:sx1][outside] *= 0.55
    colour = np.asarray(roofs[int(rng.integers(len(roofs)))], np.float32)
    canvas.paint_window(footprint, None, colour, BUILDING, 6)
    half = canvas.window(y, x, y + h, x + w // 2)
    if half is not None:
      canvas.image[half[0]:half[1], half[2]:half[3]] *= 0.82

  # Cars on roads.
  road_pixels = np.argwhere(roads)
  for _ in range(rng.poisson(density["cars"] * megapixels)):
    if len(road_pixels) == 0:
      break
    cy, cx = road_pixels[int(rng.integers(len(road_pixels)))]
    h, w = (5, 10) if rng.random() < 0.5 else (10, 5)
    colour = rng.choice([(200, 30, 30), (30, 30, 160), (230, 230, 230), (20, 20, 20),
                         (180, 180, 40)])
    canvas.paint_window(canvas.window(cy, cx, cy + h, cx + w), None, colour, CAR, 6)

  # Round, textured tree crowns (over grass, roads and roof edges alike).
  for _ in range(rng.poisson(density["trees"] * megapixels)):
    radius = rng.uniform(6, 18)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    window, crown = canvas.disc_window(cy, cx, radius)
    if window is None:
      continue
    canvas.paint_window(window, crown, (38, 78, 34), TREE, 14)
    lit = crown & canvas.disc_in(window, cy - radius * 0.3, cx - radius * 0.3, radius * 0.5)
    canvas.image[window[0]:window[1], window[2]:window[3]][lit] += 18

  if pools:
    _paint_pools(canvas, np.random.default_rng([seed, POOL]), _POOLS[kind] * megapixels)
  return np.clip(canvas.image, 0, 255).astype(np.uint8), canvas.labels


POOL = 6            # the id scene_labels.json leaves unused
_POOLS = {"urban": 12, "suburban": 45, "park": 6}   # per megapixel


def _paint_pools(canvas, rng, expected: float) -> None:
  """Turquoise rounded rectangles with a paved rim, on open grass only."""
  canvas.rng, main = rng, canvas.rng
  for _ in range(rng.poisson(expected)):
    h, w = int(rng.integers(10, 22)), int(rng.integers(14, 34))
    y, x = int(rng.integers(0, canvas.height - h - 4)), int(rng.integers(0, canvas.width - w - 4))
    if (canvas.labels[y:y + h + 4, x:x + w + 4] != LOW_VEGETATION).any():
      continue
    rim = np.zeros(canvas.labels.shape, bool)
    rim[y:y + h + 4, x:x + w + 4] = True
    canvas.paint(rim, (205, 200, 190), IMPERVIOUS, 6)
    water = np.zeros(canvas.labels.shape, bool)
    water[y + 2:y + h + 2, x + 2:x + w + 2] = True
    water[[y + 2, y + 2, y + h + 1, y + h + 1], [x + 2, x + w + 1, x + 2, x + w + 1]] = False
    canvas.paint(water, (70, 175, 205), POOL, 8)
  canvas.rng = main


def pool_scene_labels() -> dict:
  """The scene labels with id POOL named 'pool'."""
  labels = scene_labels()
  labels["name"] = "scenes with pools"
  labels["classes"][POOL] = {"name": "pool", "color": [0, 150, 255]}
  labels.pop("channel_mapping", None)
  labels["note"] = "synthetic scenes with swimming pools (hrnet-beam scenes --pools)"
  return labels


def relight(image: np.ndarray, rng, gamma: float = 0.8, gain: float = 1.05,
            noise: float = 0.02) -> np.ndarray:
  """The same scene under other light and sensor noise (uint8 RGB in, uint8 out)."""
  unit = image.astype(np.float32) / 255
  changed = np.clip(unit ** gamma * gain + rng.normal(0, noise, unit.shape), 0, 1)
  return (changed * 255 + 0.5).astype(np.uint8)


def write_scenes(output_dir: str, count: int, height: int, width: int, seed: int = 0,
                 kind: str = "mixed", pools: bool = False) -> list[str]:
  """Writes scene_NNN.png and scene_NNN.labels.png (label ids as pixel values); with
  pools, also labels.json naming the pool class."""
  os.makedirs(output_dir, exist_ok=True)
  if pools:
    with open(os.path.join(output_dir, "labels.json"), "w", encoding="utf-8") as f:
      json.dump(pool_scene_labels(), f, indent=1)
  paths = []
  for i in range(count):
    image, labels = generate_scene(height, width, seed + i, kind, pools)
    path = os.path.join(output_dir, f"scene_{i:03d}.png")
    Image.fromarray(image).save(path)
    Image.fromarray(labels, mode="L").save(os.path.join(output_dir,
                                                        f"scene_{i:03d}.labels.png"))
    paths.append(path)
  return paths
