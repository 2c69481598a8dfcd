"""Writes sample aerial scenes, one of them again under other light, and one broken file
for the demo.

    hrnet-beam scenes --demo --output demo-output/images

Scenes come from pipeline/standin/scenes.py (synthetic, larger than one tile); the truncated
PNG shows what the errors output looks like.
"""
import os

from PIL import Image

import numpy as np

from pipeline.standin.scenes import generate_scene, relight

SAMPLES = [("urban", 1100, 1500, "png"), ("suburban", 1100, 1500, "png"),
           ("park", 1100, 1500, "png"), ("urban", 700, 900, "jpg")]


def write_samples(output_dir: str, seed: int = 0) -> list[str]:
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for i, (kind, height, width, ext) in enumerate(SAMPLES):
    image, _ = generate_scene(height, width, seed + 500 + i, kind)
    path = os.path.join(output_dir, f"{i}_{kind}.{ext}")
    Image.fromarray(image).save(path, **({"quality": 92} if ext == "jpg" else {}))
    paths.append(path)
  # The park again under other light and noise: its patches find each other (docs/search.md).
  park, _ = generate_scene(*SAMPLES[2][1:3], seed + 502, SAMPLES[2][0])
  path = os.path.join(output_dir, "4_park_relit.png")
  Image.fromarray(relight(park, np.random.default_rng(seed))).save(path)
  paths.append(path)
  broken = os.path.join(output_dir, "broken.png")
  with open(paths[0], "rb") as f, open(broken, "wb") as out:
    out.write(f.read()[:2000])  # a PNG cut short
  paths.append(broken)
  return paths
