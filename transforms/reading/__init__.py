"""Reading and decoding: file patterns and shards (local or gs://) to ImageRecords.

ReadImages is the stage's transform; decode, shards and geotiff are its pure helpers.
"""
from transforms.reading.read import ReadImages

__all__ = ["ReadImages"]
