"""Test-time augmentation: which passes a tile gets, parsed once from --tta. Pure Python.

`flip` adds the horizontal mirror of each pass; `scales=0.75,1.0,1.25` adds passes on the
tile resized by each factor (sides rounded to a multiple of 32), their probabilities
resized back to the tile before all passes are averaged. The tile as it is (scale 1, not
mirrored) is always one of the passes, and the features come from it alone.
"""
from __future__ import annotations

import dataclasses

ALIGNMENT = 32
MAX_SCALE = 4.0


@dataclasses.dataclass(frozen=True)
class Augmentation:
  flip: bool = False
  scales: tuple = (1.0,)

  @property
  def passes(self) -> int:
    return len(self.scales) * (2 if self.flip else 1)

  def describe(self) -> str:
    """'none', 'flip', 'scales=0.75,1.0,1.25' or 'flip,scales=...' (parse() reads it back)."""
    parts = ["flip"] if self.flip else []
    if self.scales != (1.0,):
      parts.append("scales=" + ",".join(f"{s:g}" for s in self.scales))
    return ",".join(parts) or "none"


def parse(text: str | None, masks: bool = True) -> Augmentation:
  """--tta's value -> Augmentation; raises ValueError saying what is wrong. masks: whether
  the job computes masks, the only output augmentation changes."""
  if not text or text == "none":
    return Augmentation()
  head, _, scales_text = text.partition("scales=")
  words = [w.strip() for w in head.split(",") if w.strip()]
  if any(w != "flip" for w in words):
    raise ValueError(f"--tta {text!r}: use 'flip', 'scales=0.75,1.0,1.25' or both, as in "
                     "'flip,scales=0.75,1.0,1.25'")
  scales = {1.0}
  if scales_text:
    try:
      scales.update(float(s) for s in scales_text.split(",") if s.strip())
    except ValueError as e:
      raise ValueError(f"--tta {text!r}: scales must be numbers, e.g. scales=0.75,1.0,1.25"
                       ) from e
  if any(not 0 < s <= MAX_SCALE for s in scales):
    raise ValueError(f"--tta {text!r}: scales must be in (0, {MAX_SCALE:g}]")
  augmentation = Augmentation(flip="flip" in words, scales=tuple(sorted(scales)))
  if not masks and augmentation != Augmentation():
    raise ValueError("--tta changes masks only: add 'masks' to --outputs")
  return augmentation


def scaled_side(side: int, scale: float) -> int:
  """A side resized by `scale`, rounded to a multiple of 32 (at least 32)."""
  return max(ALIGNMENT, int(round(side * scale / ALIGNMENT)) * ALIGNMENT)
