"""Exports: a job's rows streamed into labeling tools' formats (COCO, Label Studio, CVAT
"Segmentation mask 1.1"), one row in memory at a time."""
from transforms.exports.coco import CocoWriter
from transforms.exports.cvat import CvatMaskWriter
from transforms.exports.labelstudio import LabelStudioWriter
from transforms.exports.rows import ExportRow, OutputInfo, export_rows, row_files

__all__ = ["CocoWriter", "CvatMaskWriter", "ExportRow", "LabelStudioWriter", "OutputInfo",
           "export_rows", "row_files"]
