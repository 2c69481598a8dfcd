"""Evaluation: a job's rows against reviewed labels (pure sums in metrics.py, truth
decoders in truth.py, the Beam transform in evaluate.py)."""
from transforms.evaluation.evaluate import EvaluateSegmentations, ReadTruth

__all__ = ["EvaluateSegmentations", "ReadTruth"]
