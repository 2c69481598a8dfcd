"""The segmentation job: its flags (options), frozen config (config), the graph
(`build_pipeline`) and its launch (`run`)."""
from pipeline.job.config import ConfigError, JobConfig
from pipeline.job.graph import build_pipeline
from pipeline.job.launch import EXIT_CONFIG, RunSummary, run

__all__ = ["EXIT_CONFIG", "ConfigError", "JobConfig", "RunSummary", "build_pipeline", "run"]
