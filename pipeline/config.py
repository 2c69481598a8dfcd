"""The job's configuration: validated once from the options, before launch, then frozen."""
from __future__ import annotations

import dataclasses

from transforms.config import DecodeConfig, InferenceConfig, ModelConfig, TilingConfig


class ConfigError(ValueError):
  """A flag or input that cannot work; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class JobConfig:
  input_patterns: tuple
  output: str
  errors_output: str
  decode: DecodeConfig
  tiling: TilingConfig
  model: ModelConfig
  inference: InferenceConfig
