"""Segmentation metrics from a confusion matrix accumulated on the device."""
from .confusion import ConfusionMatrix, format_iou_table

__all__ = ["ConfusionMatrix", "format_iou_table"]
