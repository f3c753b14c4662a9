"""Modules (``pyseg.nn``): drop-in layers built on pyseg's ops."""
from . import functional
from .patchwise_conv import PatchWiseConv2d

__all__ = ["functional", "PatchWiseConv2d"]
