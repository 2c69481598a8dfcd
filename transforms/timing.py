"""Where a job's time goes, per stage: each stage adds its wall time to a Beam counter
(`stage_us_<stage>`, microseconds, summed over every worker process), so Dataflow's UI
shows them, and the launcher turns them into one line and a --stats_output JSON."""
from __future__ import annotations

import time

import apache_beam as beam

from transforms.metrics import METRICS_NAMESPACE

# (stage, what it covers), in the order a tile meets them.
STAGES = (
    ("read", "read and decode (files, shard records, raster windows)"),
    ("tiling", "cutting images into tiles"),
    ("model", "the model's calls (the engine, post-processing on the device included)"),
    ("tile_outputs", "per-tile work around the model calls (batching, nodata, QA sums)"),
    ("stitch", "stitching tiles into masks and features, PNG encoding, QA per image"),
    ("polygons", "tracing polygons and merging them across raster blocks"),
    ("patches", "patch embeddings and their merge across blocks"),
    ("write", "rows, polygons and patches turned into Arrow records and GeoParquet rows"),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)
PREFIX = "stage_us_"


def counter_name(stage: str) -> str:
  if stage not in STAGE_NAMES:
    raise ValueError(f"unknown stage {stage!r}")
  return PREFIX + stage


class StageClock:
  """with clock: ...  adds the block's wall time to its stage's counter."""

  def __init__(self, stage: str):
    self._counter = beam.metrics.Metrics.counter(METRICS_NAMESPACE, counter_name(stage))
    self._started = []

  def __enter__(self):
    self._started.append(time.perf_counter())
    return self

  def __exit__(self, *_):
    self._counter.inc(int((time.perf_counter() - self._started.pop()) * 1e6))
    return False


def stage_seconds(counters: dict) -> dict:
  """{stage: seconds} from the job's counter values (stages without a counter: 0).

  The handler counts its whole call as tile_outputs; the model's calls inside it are
  taken out, so the stages do not overlap."""
  seconds = {name: counters.get(PREFIX + name, 0) / 1e6 for name in STAGE_NAMES}
  seconds["tile_outputs"] = max(0.0, seconds["tile_outputs"] - seconds["model"])
  return seconds


def stats(counters: dict, tiles: int, wall_seconds: float, in_one_process: bool) -> dict:
  """The --stats_output document: seconds and ms per tile per stage, and the host's share."""
  seconds = stage_seconds(counters)
  per_tile = {name: (1000 * s / tiles if tiles else None) for name, s in seconds.items()}
  outside = sum(s for name, s in seconds.items() if name != "model")
  document = {
      "tiles": tiles, "wall_seconds": round(wall_seconds, 3),
      "stage_seconds": {k: round(v, 4) for k, v in seconds.items()},
      "ms_per_tile": {k: (round(v, 3) if v is not None else None) for k, v in per_tile.items()},
      "outside_model_ms_per_tile": round(1000 * outside / tiles, 3) if tiles else None,
      "stages": dict(STAGES),
      "note": "seconds are summed over every worker process (and thread), so they can add "
              "up to more than the wall time; 'other' is the wall time the stages leave, "
              "reported only when the whole job ran in this process",
  }
  if in_one_process:
    document["stage_seconds"]["other"] = round(max(0.0, wall_seconds - sum(seconds.values())), 4)
  return document


def time_line(document: dict) -> str:
  """One line: each stage's seconds and share, then ms per tile outside the model."""
  seconds = document["stage_seconds"]
  total = sum(seconds.values()) or 1.0
  parts = [f"{name} {s:.1f} s ({100 * s / total:.0f}%)" for name, s in seconds.items()
           if s >= 0.05 or name == "model"]
  line = "hrnet-beam time: " + ", ".join(parts)
  if document["outside_model_ms_per_tile"] is not None:
    line += (f"; {document['outside_model_ms_per_tile']:.1f} ms a tile outside the model "
             f"({document['tiles']} tiles)")
  return line


def timed_iter(clock: StageClock, iterable):
  """Yields what iterable yields, timing only the work between yields: a fused stage runs
  the next DoFns while a yield is pending, and that time is theirs."""
  iterator = iter(iterable)
  while True:
    with clock:
      try:
        item = next(iterator)
      except StopIteration:
        return
    yield item
