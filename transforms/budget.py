"""Stops a job early when most of what a worker sees fails (see --max_error_fraction)."""
from __future__ import annotations

import dataclasses
from typing import Optional

# A worker judges only after this many inputs, so a few early failures never abort a job;
# the exact fraction over the whole job is checked again when it ends.
MIN_INPUTS_BEFORE_ABORT = 50


class ErrorBudgetExceeded(RuntimeError):
  """More inputs failed than --max_error_fraction allows."""


@dataclasses.dataclass
class ErrorBudget:
  max_fraction: Optional[float]
  stage: str
  seen: int = 0
  failed: int = 0

  def record(self, failed: bool) -> None:
    """Counts one input; raises once this worker's failures exceed the budget."""
    self.seen += 1
    self.failed += int(failed)
    if (self.max_fraction is not None and self.seen >= MIN_INPUTS_BEFORE_ABORT and
        self.failed > self.max_fraction * self.seen):
      raise ErrorBudgetExceeded(
          f"{self.failed} of the first {self.seen} inputs of a worker failed at the "
          f"{self.stage} stage ({self.failed / self.seen:.0%}), above "
          f"--max_error_fraction={self.max_fraction}: stopping the job")
