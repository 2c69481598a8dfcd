"""The launcher's progress display: inputs done of the total, errors, tiles/s, elapsed, ETA.

On a terminal, one line updated in place (tqdm); elsewhere (CI, Dataflow launcher logs) a
plain line every `interval_s` seconds. Nothing is listed before launch but one file per
pattern: the total is counted as the job lists its patterns (one input per file, plus what
shards and huge rasters turn out to hold), so it reads "1204+" until every pattern has
been listed and every such file opened.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from tqdm import tqdm

from transforms.progress import ProgressCounts

MODES = ("auto", "bar", "lines", "off")
POLL_INTERVAL_S = 0.25


def total_text(patterns: int, counts: ProgressCounts) -> tuple[int, bool]:
  """(inputs known so far, whether more may come) for a job of `patterns` patterns."""
  return counts.total(patterns)


def format_seconds(seconds: Optional[float]) -> str:
  return "?" if seconds is None else tqdm.format_interval(seconds)


def progress_line(patterns: int, counts: ProgressCounts, elapsed: float) -> str:
  """One plain line: 'progress: 70/1204+ inputs, 3 errors, 412 tiles, 1.9 tiles/s, ...'."""
  known, growing = total_text(patterns, counts)
  rate = counts.done / elapsed if elapsed > 0 else 0.0
  eta = (known - counts.done) / rate if rate > 0 and known >= counts.done else None
  return (f"progress: {counts.done}/{known}{'+' if growing else ''} inputs, "
          f"{counts.errors} errors, {counts.tiles} tiles, "
          f"{counts.tiles / max(elapsed, 1e-9):.2f} tiles/s, elapsed "
          f"{format_seconds(elapsed)}, ETA {format_seconds(eta)}{'+' if growing else ''}")


def _bar_format(growing: bool) -> str:
  return ("{desc}: {n_fmt}/{total_fmt}" + ("+" if growing else "") +
          " inputs |{bar}| {elapsed}<{remaining}{postfix}")


def _columns(stream) -> int:
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, OSError, ValueError):
    return 0


class ProgressDisplay:
  """Polls `read_counts` in a thread and shows the result until stop()."""

  def __init__(self, patterns: int, read_counts: Callable[[], ProgressCounts],
               mode: str = "auto", interval_s: float = 10.0, stream: TextIO | None = None):
    self._patterns = patterns
    self._read_counts = read_counts
    self._stream = stream or sys.stderr
    if mode == "auto":
      mode = "bar" if getattr(self._stream, "isatty", lambda: False)() else "lines"
    self.mode = mode
    self._interval_s = interval_s
    self._stop = threading.Event()
    self._thread = None
    self._bar = None
    self._started = time.monotonic()
    self.lines_written = 0
    self._last_written = None

  def start(self) -> "ProgressDisplay":
    if self.mode == "off":
      return self
    self._started = time.monotonic()
    if self.mode == "bar":
      # A terminal that reports no size (some pseudo-terminals) would get an empty bar.
      sized = _columns(self._stream) > 0
      self._bar = tqdm(total=0, unit="input", file=self._stream,
                       dynamic_ncols=sized, ncols=None if sized else 100,
                       nrows=None if sized else 24, desc="hrnet-beam", leave=True,
                       bar_format=_bar_format(True))
    self._thread = threading.Thread(target=self._loop, name="hrnet-beam-progress",
                                    daemon=True)
    self._thread.start()
    return self

  def _loop(self) -> None:
    last_line = time.monotonic()
    while not self._stop.wait(POLL_INTERVAL_S):
      counts = self._read_counts()
      if self._bar is not None:
        self._update_bar(counts)
      elif time.monotonic() - last_line >= self._interval_s:
        last_line = time.monotonic()
        self._write_line(counts)

  def _update_bar(self, counts: ProgressCounts) -> None:
    known, growing = total_text(self._patterns, counts)
    self._bar.total = max(known, counts.done)
    self._bar.n = counts.done
    self._bar.bar_format = _bar_format(growing)
    elapsed = time.monotonic() - self._started
    self._bar.set_postfix_str(f"{counts.errors} errors, "
                              f"{counts.tiles / max(elapsed, 1e-9):.2f} tiles/s",
                              refresh=False)
    self._bar.refresh()

  def _write_line(self, counts: ProgressCounts) -> None:
    print(progress_line(self._patterns, counts, time.monotonic() - self._started),
          file=self._stream, flush=True)
    self.lines_written += 1
    self._last_written = dataclasses.astuple(counts)

  def stop(self) -> None:
    """Stops polling and shows the final counts."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    counts = self._read_counts()
    if self._bar is not None:
      self._update_bar(counts)
      self._bar.close()
    elif self.lines_written and dataclasses.astuple(counts) != self._last_written:
      self._write_line(counts)
