"""Progress from the workers: inputs finished, errors, tiles, and inputs discovered on the way.

Where the workers run on the launching machine (the local runner), each reporter writes
its running totals to a small file in `ProgressConfig.report_dir`, and the launcher sums
them into one progress display. Elsewhere (Dataflow) each worker logs a plain line every
`log_interval_s` seconds instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid

import apache_beam as beam

from transforms.metrics import METRICS_NAMESPACE

logger = logging.getLogger(__name__)

WRITE_INTERVAL_S = 0.5   # a reporter rewrites its file at most this often (and at flush)


@dataclasses.dataclass(frozen=True)
class ProgressConfig:
  report_dir: str | None = None   # local runs: where reporters write their totals
  log_interval_s: float = 10.0    # other runs: each worker logs a line this often


@dataclasses.dataclass
class ProgressCounts:
  """Running totals, from which the launcher tells the number of inputs and whether it is
  final: the job lists its patterns as it runs, and nothing is counted before launch.

  listed: files the patterns matched so far (a file matched by two patterns twice);
  patterns: patterns listed to the end; checked: listed files seen once per path (after
  the shuffle that drops repeats), duplicates: the repeats among them; expandable: files
  that may hold several inputs (shards, TIFFs), resolved: those whose number is known;
  found: inputs discovered beyond the one file they came from (a shard's records, a huge
  raster's blocks). The total is listed - duplicates + found.
  """
  done: int = 0
  errors: int = 0
  tiles: int = 0
  found: int = 0
  resolved: int = 0
  listed: int = 0
  patterns: int = 0
  checked: int = 0
  duplicates: int = 0
  expandable: int = 0

  def add(self, other: "ProgressCounts") -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

  def total(self, patterns: int) -> tuple[int, bool]:
    """(inputs known so far, whether more may come) for a job of `patterns` patterns."""
    growing = (self.patterns < patterns or self.checked < self.listed or
               self.resolved < self.expandable)
    return self.listed - self.duplicates + self.found, growing


# Counted as Beam metrics too, so a remote job's launcher (and Dataflow's UI) sees them.
COUNTED_FIELDS = ("found", "resolved", "listed", "patterns", "checked", "duplicates",
                  "expandable")


def metric_name(field: str) -> str:
  return f"progress_{field}"


def read_reports(report_dir: str) -> ProgressCounts:
  """The sum of every reporter's totals in the directory (files being rewritten are skipped
  this time and counted next time)."""
  total = ProgressCounts()
  try:
    names = os.listdir(report_dir)
  except OSError:
    return total
  for name in names:
    if not name.endswith(".json"):
      continue
    try:
      with open(os.path.join(report_dir, name), encoding="utf-8") as f:
        total.add(ProgressCounts(**json.load(f)))
    except (OSError, ValueError, TypeError):
      continue
  return total


class ProgressReporter:
  """One DoFn instance's totals; created in setup(), flushed in finish_bundle()."""

  def __init__(self, config: ProgressConfig, stage: str):
    self._config = config
    self._stage = stage
    self.counts = ProgressCounts()
    self._path = None
    if config.report_dir:
      self._path = os.path.join(config.report_dir,
                                f"{stage}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
    self._started = self._last = time.monotonic()
    self._counters = {field: beam.metrics.Metrics.counter(METRICS_NAMESPACE, metric_name(field))
                      for field in COUNTED_FIELDS}

  def add(self, **counts: int) -> None:
    """Adds to the totals: done, errors, tiles, or any other field of ProgressCounts."""
    self.counts.add(ProgressCounts(**counts))
    for field, value in counts.items():
      if value and field in self._counters:
        self._counters[field].inc(value)
    now = time.monotonic()
    if self._path:
      if now - self._last >= WRITE_INTERVAL_S:
        self.flush()
    elif now - self._last >= self._config.log_interval_s and self.counts.done:
      self._last = now
      logger.info("progress (this worker, %s): %d inputs done (%d failed), %d tiles, "
                  "%.2f tiles/s", self._stage, self.counts.done, self.counts.errors,
                  self.counts.tiles, self.counts.tiles / max(now - self._started, 1e-9))

  def flush(self) -> None:
    if not self._path:
      return
    self._last = time.monotonic()
    temporary = f"{self._path}.tmp"
    try:
      with open(temporary, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(self.counts), f)
      os.replace(temporary, self._path)
    except OSError:  # the launcher has gone or cleaned up: progress is a convenience
      pass
