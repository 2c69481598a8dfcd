"""Heads on frozen features: the sampling protocol, training, LogME, and the head saved
with its base model as a new model (fit-head, rank-models)."""
