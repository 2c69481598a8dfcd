"""Reusable Beam transforms for HRNet segmentation: read, tile, segment, stitch, write."""
