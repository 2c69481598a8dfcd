"""Writes aerial-looking sample images (and one broken file) for the demo.

    python -m pipeline.make_samples --output demo-output/images
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image


def aerial_like(height: int, width: int, seed: int) -> np.ndarray:
  """Grass-like noise with roads and roofs: varied enough to exercise the model."""
  rng = np.random.default_rng(seed)
  coarse = rng.random((height // 32 + 2, width // 32 + 2, 1)).astype(np.float32)
  field = np.repeat(np.repeat(coarse, 32, 0), 32, 1)[:height, :width]
  grass = np.array([70, 110, 50], np.float32) + 50 * field * np.array([0.6, 1.0, 0.4])
  image = grass + rng.normal(0, 12, (height, width, 3))
  for _ in range(max(1, (height + width) // 300)):  # roads
    if rng.random() < 0.5:
      y = int(rng.integers(0, height))
      image[max(0, y - 12):y + 12, :] = (120, 120, 118) + rng.normal(0, 6, 3)
    else:
      x = int(rng.integers(0, width))
      image[:, max(0, x - 12):x + 12] = (120, 120, 118) + rng.normal(0, 6, 3)
  for _ in range(max(2, height * width // 40000)):  # roofs
    h, w = rng.integers(15, 60, 2)
    y, x = int(rng.integers(0, max(1, height - h))), int(rng.integers(0, max(1, width - w)))
    image[y:y + h, x:x + w] = rng.choice([(170, 60, 50), (200, 200, 205), (90, 90, 100)])
  return np.clip(image, 0, 255).astype(np.uint8)


def write_samples(output_dir: str, seed: int = 0) -> list[str]:
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for i, (height, width, ext) in enumerate([(700, 900, "png"), (512, 512, "jpg"),
                                            (300, 400, "png"), (1100, 1500, "tif")]):
    path = os.path.join(output_dir, f"scene_{i}.{ext}")
    Image.fromarray(aerial_like(height, width, seed + i)).save(path)
    paths.append(path)
  broken = os.path.join(output_dir, "broken.png")
  with open(broken, "wb") as f:  # a PNG cut short, to show the errors output
    f.write(open(paths[0], "rb").read()[:2000])
  paths.append(broken)
  return paths


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for path in write_samples(args.output, args.seed):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
