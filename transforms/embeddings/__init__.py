"""Embeddings: patch embeddings on a grid aligned to the image (patches: pure numpy;
embed: the Beam transform)."""
from transforms.embeddings.embed import EmbedPatches

__all__ = ["EmbedPatches"]
