"""Inference: where a model comes from (sources), what a loaded model can do (model,
head, precision, devices), the RunInference handler (handler) and the SegmentImages
transform that tiles, infers and stitches (segment)."""
from transforms.inference.segment import SegmentImages

__all__ = ["SegmentImages"]
